"""The streaming loader: fixed-length sequences in a global seeded order, sliced per data-parallel rank.

Sequences. A split is one token stream of T tokens (data/stream.py). Sequence w is the window
[w·L, w·L + L + 1) of it (L = seq_len): `input_ids` are its first L tokens, `labels` its last L
(next-token targets). Windows overlap by one token, so every token is a target exactly once
per epoch; an epoch has N = (T − 1) // L sequences.

Order. Position p of epoch e holds sequence perm_e(p), where perm_e is a keyed bijection of
[0, N) (data/permutation.py) whose key is a hash of (dataset fingerprint, seed, epoch). Nothing
else enters: not dp, not the planned run length, not num_workers. Each epoch uses the first
⌊N / G⌋·G positions (G = global_batch_size), so every rank yields the same number of batches per
epoch, and the next epoch reshuffles with its own key.

Ranks. Global batch b is positions [b·G, (b+1)·G). It is consumed in micro-steps of
micro_batch_size × dp_size positions; at each micro-step rank r takes the micro_batch_size
positions starting at r·micro_batch_size. So the union over ranks of one global batch is the
same set of sequences for every dp dividing G/micro_batch_size, and "sequences consumed" is
always a prefix of the global order. A batch depends only on (dp_rank, dp_size, state): the
first and last stage of a pipeline replica, built with the same dp_rank, get identical batches.

State. `state_dict()` is a small JSON-able dict, identical on every rank: format version, dataset
fingerprint, split, seed, epoch, sequences consumed in the epoch (globally), seq_len,
global_batch_size. Resuming computes the next positions directly: O(1), nothing is replayed,
and a different dp (or global batch) continues the same global order as long as the
consumed count falls on the new micro-step grid. A state of another dataset, seq_len or seed
is refused with a message naming the mismatch.

Document-aware mode adds `position_ids` restarting at 0 at each document start inside a row
(and at the row start, so they stay < seq_len for RoPE), `cu_seqlens` (int32 cumulative
segment lengths over the flattened micro-batch, for varlen attention or a block mask), and
masks with -100 the label of every document's last token, so no label crosses a document.

Prefetch. With num_workers = k > 0, k reader threads each read every k-th batch, up to
prefetch_factor batches ahead, and batches are handed out strictly in order, so the sequence of
batches is identical to num_workers = 0. Threads, not processes: a batch is a few slice copies
(numpy releases the GIL while copying) and needs no pickling; the reading overlaps compute
that releases the GIL (torch ops, CUDA launches and syncs). In a loop that does nothing but
read, threads are slower than reading inline (GIL hand-offs); bench/data.py measures both.

Prior art, and why this design. Megatron-LM (megatron/core/datasets/indexed_dataset.py,
gpt_dataset.py) memory-maps a `.bin` with an `.idx` of document sizes, then builds and caches
three index arrays (document_index, sample_index, shuffle_index) sized by the number of
samples the run will draw — the order depends on the planned run length (the number of epochs,
and a separately shuffled last partial epoch). OLMo-core (src/olmo_core/data/numpy_dataset.py
and data_loader.py) memory-maps per-file uint16/uint32 token arrays, chunks each file into
fixed-length instances, and writes a full `np.arange(n)` permutation per (seed, epoch) to
`global_indices.npy`, which ranks slice; its state is batches processed plus fingerprint,
seed and epoch. We follow OLMo-core's shape — raw memmapped token arrays, a per-epoch seeded
order independent of dp, a tiny global state with a fingerprint check — but replace its
materialised permutation by a bijective index permutation (no O(N) array, no cache files to
build, share or invalidate; O(1) resume), and read windows over the concatenated stream so no
tokens are dropped at file ends.
"""

from __future__ import annotations

import queue
import threading
import weakref
from bisect import bisect_right

import numpy as np
import torch

from .errors import DataError
from .permutation import IndexPermutation, derive_keys
from .stream import TokenStream

STATE_VERSION = 1
IGNORE_INDEX = -100  # labels masked in document-aware mode (model/mtp.py's IGNORE_INDEX, which cross_entropy skips)
# Sequence indices are computed for at least this many micro-steps / sequences per vectorised
# call: numpy's per-call overhead then costs well under a microsecond per batch.
_PLAN_STEPS, _PLAN_SEQUENCES = 64, 4096


def check_loader_args(seq_len: int, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int,
                      prefetch_factor: int, num_workers: int) -> None:
    """DataError naming the first loader argument out of range."""
    for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                        ("global_batch_size", global_batch_size), ("dp_size", dp_size),
                        ("prefetch_factor", prefetch_factor)):
        if int(value) < 1:
            raise DataError(f"{name}={value}: must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank={dp_rank}: must be in [0, dp_size={dp_size})")
    if global_batch_size % (micro_batch_size * dp_size):
        raise DataError(f"global_batch_size={global_batch_size}: not divisible by micro_batch_size="
                        f"{micro_batch_size} × dp_size={dp_size}")
    if num_workers < 0:
        raise DataError(f"num_workers={num_workers}: must be >= 0")


class LoaderBase:
    """What every loader shares: iteration through _Iterator (one live iterator), close, length."""

    num_batches: int | None
    _active = None  # weakref to the live iterator: loading a state stops it

    def close(self) -> None:
        """Stop and join the live iterator's reader threads (call before the process exits)."""
        it = self._active() if self._active else None
        if it is not None:
            it.close()

    def __iter__(self):
        old = self._active() if self._active else None
        if old is not None:
            old.close()
        it = _Iterator(self)
        self._active = weakref.ref(it)
        return it

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless loader has no length (set num_batches)")
        return self.num_batches


class ShardedTokenLoader(LoaderBase):
    """Iterate dicts of `input_ids`, `labels` (LongTensor[micro_batch_size, seq_len]) and `index`
    (the sequences' positions in the stream, LongTensor[micro_batch_size]), plus `position_ids`
    and `cu_seqlens` when document_aware; endlessly across epochs unless num_batches is set.

    Args:
        path: a data.prepare output folder (or its manifest.json).
        seq_len: tokens per sequence.
        micro_batch_size: sequences per rank per batch.
        global_batch_size: sequences per global batch, over all ranks (a multiple of
            micro_batch_size × dp_size); epochs are cut to whole global batches.
        dp_rank, dp_size: this rank's data-parallel coordinate.
        seed: the order's seed.
        split: "train" or "val".
        num_workers: background reader threads (0 = read in the caller); never changes the order.
        prefetch_factor: batches read ahead per worker.
        document_aware: add position_ids and cu_seqlens; labels never cross a document.
        num_batches: stop each iteration after this many batches (None = endless). The order
            does not depend on it.
    """

    def __init__(self, path, seq_len: int, micro_batch_size: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, *, split: str = "train", num_workers: int = 0,
                 prefetch_factor: int = 2, document_aware: bool = False, num_batches: int | None = None):
        check_loader_args(seq_len, micro_batch_size, global_batch_size, dp_rank, dp_size, prefetch_factor,
                          num_workers)
        self.stream = TokenStream(path, split)
        self.path, self.split = str(path), split
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.global_batch_size, self.dp_rank, self.dp_size = int(global_batch_size), int(dp_rank), int(dp_size)
        self.seed, self.num_workers, self.prefetch_factor = int(seed), int(num_workers), int(prefetch_factor)
        self.document_aware, self.num_batches = bool(document_aware), num_batches
        self.fingerprint = self.stream.fingerprint
        self.num_sequences = max(self.stream.total - 1, 0) // self.seq_len
        if self.num_sequences < self.global_batch_size:
            raise DataError(f"{self.stream.manifest['_path']}: split '{split}' has {self.num_sequences} sequences "
                            f"of seq_len {seq_len}, fewer than one global batch ({global_batch_size})")
        self.epoch = 0
        self.consumed = 0  # sequences of this epoch consumed, over all ranks
        self.sequences_seen = 0  # over all epochs (informational)
        self._perms: dict[int, IndexPermutation] = {}
        self._active = None  # weakref to the live iterator: loading a state stops it

    # ---------------------------------------------------------------- the order
    @property
    def step(self) -> int:
        """Sequences consumed per micro-step, over all ranks."""
        return self.micro_batch_size * self.dp_size

    @property
    def sequences_per_epoch(self) -> int:
        return self.num_sequences // self.global_batch_size * self.global_batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (the same on every rank)."""
        return self.sequences_per_epoch // self.step

    def permutation(self, epoch: int) -> IndexPermutation:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            keys = derive_keys("moeforge-order-v1", self.fingerprint, self.seed, epoch)
            self._perms[epoch] = IndexPermutation(self.num_sequences, keys)
        return self._perms[epoch]

    def _cursor(self) -> tuple[int, int]:
        """Where the next iterator starts (what `_plan` takes)."""
        return self.epoch, self.consumed

    def _commit(self, cursor: tuple[int, int]) -> None:
        """A batch planned up to `cursor` was handed out: advance the state past it."""
        self.epoch, self.consumed = cursor
        self.sequences_seen += self.step
        if self.consumed >= self.sequences_per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0

    def _batches(self, cursor: tuple[int, int]):
        """Yield (cursor after this batch, this rank's sequence indices) from `cursor` (what the iterator walks)."""
        for epoch, consumed, seqs in self._plan(*cursor):
            yield (epoch, consumed), seqs

    def _plan(self, epoch: int, consumed: int):
        """Yield (epoch, consumed after this batch, sequence indices of this rank's batch), endlessly."""
        m, step, per_epoch = self.micro_batch_size, self.step, self.sequences_per_epoch
        offsets = self.dp_rank * m + np.arange(m)
        steps = max(_PLAN_STEPS, _PLAN_SEQUENCES // m)
        while True:
            if consumed >= per_epoch:
                epoch, consumed = epoch + 1, 0
            n = min(steps, (per_epoch - consumed) // step)
            starts = consumed + step * np.arange(n)
            seqs = self.permutation(epoch)((starts[:, None] + offsets[None, :]).ravel()).reshape(n, m)
            for row in seqs:
                consumed += step
                yield epoch, consumed, row

    # ---------------------------------------------------------------- reading
    def read_batch(self, seqs: np.ndarray) -> dict:
        """The batch of the given sequence indices (a pure function: safe from any thread)."""
        m, L = len(seqs), self.seq_len
        x = np.empty((m, L), dtype=np.int64)
        y = np.empty((m, L), dtype=np.int64)
        read_windows(self.stream, seqs, L, x, y)
        batch = {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y), "index": torch.from_numpy(seqs)}
        if self.document_aware:
            document_outputs([self.stream] * m, seqs, x, y, batch)
        return batch

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"format_version": STATE_VERSION, "fingerprint": self.fingerprint, "split": self.split,
                "seed": self.seed, "epoch": self.epoch, "sequences_consumed": self.consumed,
                "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
                "sequences_seen": self.sequences_seen}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (any dp, any micro-batch, any num_workers). DataError names a mismatch."""
        where = f"{self.stream.manifest['_path']} split '{self.split}'"
        if isinstance(state, dict) and state.get("kind") == "mixture":
            raise DataError(f"loader state: a mixture of {len(state.get('sources', []))} sources (data.sources); "
                            f"this run reads one dataset ({where})")
        try:
            version = int(state["format_version"])
            fp, seed, seq_len = state["fingerprint"], int(state["seed"]), int(state["seq_len"])
            epoch, consumed = int(state["epoch"]), int(state["sequences_consumed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"loader state: missing or malformed key {exc}") from None
        if version > STATE_VERSION:
            raise DataError(f"loader state: format version {version} is newer than this moeforge reads "
                            f"({STATE_VERSION})")
        if fp != self.fingerprint:
            raise DataError(f"loader state: dataset fingerprint {fp[:12]}… is not this dataset's "
                            f"{self.fingerprint[:12]}… ({where})")
        check_order_keys(self, seq_len, seed)
        if epoch < 0 or consumed < 0:
            raise DataError(f"loader state: negative epoch {epoch} or sequences_consumed {consumed}")
        if consumed % self.step:
            raise DataError(f"loader state: sequences_consumed {consumed} is not a multiple of micro_batch_size × "
                            f"dp_size = {self.step}; resume from a global-batch boundary")
        if consumed >= self.sequences_per_epoch:  # a smaller global batch cut this epoch shorter
            epoch, consumed = epoch + 1, 0
        old = self._active() if self._active else None
        if old is not None:
            old.close()
        self.epoch, self.consumed = epoch, consumed
        self.sequences_seen = int(state.get("sequences_seen", 0))


class _End:
    """A reader thread's plan ended (a mixture that stops): the consumer stops there too."""


def check_order_keys(loader, seq_len: int, seed: int) -> None:
    """A saved state's seq_len and seed against the loader's: DataError naming the mismatch."""
    if seq_len != loader.seq_len:
        raise DataError(f"loader state: seq_len {seq_len} differs from this loader's seq_len {loader.seq_len}")
    if seed != loader.seed:
        raise DataError(f"loader state: seed {seed} differs from this loader's seed {loader.seed}")


class _Iterator:
    """Hands out batches in order, advancing the loader's state as each batch is handed out.

    With num_workers = k > 0, reader thread i produces batches i, i+k, i+2k, … of the plan (each
    thread walks its own copy of the deterministic plan) into its own bounded queue, and
    `__next__` takes from the queues round-robin: the order cannot depend on k or on timing.
    The loader provides `_cursor()` (where to start), `_batches(cursor)` (the plan: (cursor after
    the batch, what to read)), `read_batch(what)` and `_commit(cursor)` (a batch was handed out);
    a plan that ends (a mixture's `stop`) ends the iteration there.
    """

    def __init__(self, loader):
        self.loader = loader
        self.start = loader._cursor()
        self.plan = loader._batches(self.start)
        self.limit = loader.num_batches
        self.count = 0
        self.closed = False
        self.stop = threading.Event()
        k = loader.num_workers
        self.queues = [queue.Queue(maxsize=loader.prefetch_factor) for _ in range(k)]
        # The threads hold the queues and the stop flag, never this iterator: an iterator the
        # caller drops (a `break` out of an evaluation loop) is collected, and its __del__ stops them.
        self.threads = [threading.Thread(target=_produce, args=(loader, self.start, self.limit, i, k, self.queues[i],
                                                                self.stop), daemon=True, name=f"moeforge-loader-{i}")
                        for i in range(k)]
        for t in self.threads:
            t.start()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.closed or (self.limit is not None and self.count >= self.limit):
            self.close()
            raise StopIteration
        ld = self.loader
        if not self.threads:
            try:
                cursor, seqs = next(self.plan)
            except StopIteration:
                self.close()
                raise
            batch = ld.read_batch(seqs)
        else:
            cursor, batch = self.queues[self.count % len(self.queues)].get()
            if isinstance(batch, BaseException):
                self.close()
                raise batch
            if batch is _End:
                self.close()
                raise StopIteration
        self.count += 1
        ld._commit(cursor)
        return batch

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        for q in self.queues:  # unblock producers waiting on a full queue
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        # Join the readers: a daemon thread still inside a torch op when the interpreter exits is
        # killed by a forced unwind through C++ frames, and the process aborts ("terminate called
        # without an active exception"). A reader notices `stop` within one batch read + 0.1 s.
        me = threading.current_thread()
        for t in self.threads:
            if t is not me and t.is_alive():
                t.join(timeout=30)

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the queue module may already be torn down
            pass


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _produce(loader, start, limit: int | None, i: int, k: int, q: queue.Queue, stop: threading.Event) -> None:
    """Reader thread i of k: batches i, i+k, … of the plan from `start`, into `q`, until stopped."""
    try:
        n = -1
        for n, (cursor, seqs) in enumerate(loader._batches(start)):
            if stop.is_set() or (limit is not None and n >= limit):
                return
            if n % k != i:
                continue
            _put(q, (cursor, loader.read_batch(seqs)), stop)
        # The plan ended: the consumer reaches this queue next at batch n + 1 + ((i − n − 1) mod k).
        _put(q, (None, _End), stop)
    except BaseException as exc:  # handed to the consumer, raised there
        q.put((None, exc))


# ---------------------------------------------------------------- reading (shared with data/mixture.py)
def read_windows(stream: TokenStream, seqs: np.ndarray, L: int, x: np.ndarray, y: np.ndarray,
                 rows: np.ndarray | None = None) -> None:
    """x[row], y[row] ← inputs and labels of sequence seqs[j] of `stream` (row = rows[j], default j)."""
    starts, shards = stream.starts, stream.shards
    for j, w in enumerate(seqs.tolist()):  # the hot loop: two slice copies per row
        r = j if rows is None else int(rows[j])
        s = w * L
        k = bisect_right(starts, s) - 1
        local = s - starts[k]
        shard = shards[k]
        if local + L + 1 <= len(shard):
            x[r] = shard[local:local + L]
            y[r] = shard[local + 1:local + L + 1]
        else:  # the window crosses into the next shard
            stream.read_pair(s, L, x[r], y[r])


def document_outputs(streams: list[TokenStream], seqs: np.ndarray, x: np.ndarray, y: np.ndarray,
                     batch: dict) -> None:
    """Document-aware outputs of rows read from streams[j] (the row's own stream) at sequence seqs[j]."""
    m, L = x.shape
    rows, cols = [], []
    for j, w in enumerate(seqs.tolist()):
        rel = streams[j].doc_starts(w * L + 1, w * L + L + 1) - w * L  # documents starting at 1..L
        rows.append(np.full(len(rel), j))
        cols.append(rel)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    y[rows, cols - 1] = IGNORE_INDEX  # a document's last token: its label would cross a document
    inner = cols < L
    rows, cols = rows[inner], cols[inner]
    seg_start = np.zeros((m, L), dtype=np.int64)
    seg_start[rows, cols] = cols
    np.maximum.accumulate(seg_start, axis=1, out=seg_start)
    batch["position_ids"] = torch.from_numpy(np.arange(L, dtype=np.int64) - seg_start)
    bounds = np.concatenate([np.arange(m) * L, rows * L + cols, [m * L]])
    batch["cu_seqlens"] = torch.from_numpy(np.sort(bounds).astype(np.int32))
