"""Weighted mixtures of prepared datasets: one global order that interleaves sources by weight.

Sources. `data.sources` lists prepared datasets (data.prepare outputs, one tokenizer for all) with
a weight each; `data.path` is the one-source shorthand and keeps the plain loader
(data/loader.py), so a single source reads exactly as it always did. A weight of 0 is allowed:
the source is never drawn (it is still validated on). Names default to the folder's basename,
made unique with `-2`, `-3`, … in list order; they name the metrics (`tokens/<name>`,
`val_loss/<name>`) and the state.

Order. The mixture is a map from global position p (the same positions the plain loader slices
into global batches, micro-steps and rank slices) to (source s, k-th draw of s). Positions
come in blocks of BLOCK = 1000. Each weight is rounded once to an integer W_s over 2^40
(largest remainder, Σ W_s = 2^40), so BLOCK·w_s = m_s + f_s exactly, with integer m_s and
fraction f_s. Block b gives source s a quota of m_s or m_s + 1 slots: the R = Σ f_s extra
slots go to the sources whose arcs [F_s, F_s + f_s) (laid end to end on a circle of length R)
hold one of the points u_b + j, j = 0..R−1, with u_b = frac(u_0 + b·φ) (a golden-ratio Weyl
sequence, in exact integer arithmetic; u_0 from the seed). Every arc is shorter than 1, so it
holds at most one point: quotas sum to BLOCK, and every block of 1,000 positions holds
⌊1000·w_s⌋ or ⌈1000·w_s⌉ sequences of each source — within one sequence of its weight. The
points are equidistributed, so a source's extra slots come at rate f_s with a discrepancy
that grows only like log(b): no drift over a run. How many draws of s precede block b is a
floor sum (Σ ⌊(a·i + c)/M⌋, computed in O(log M) by the Euclid-like reduction), so any
position is located in O(1) blocks, never by replaying. Inside a block each source's slots
are spread evenly: its k-th slot is due at (k + ½)/q_s of the block and slots go out in due
order (ties broken by a seeded per-block order of the sources), so any 1,000 consecutive
positions — aligned or straddling two blocks — hold each source within about two sequences of
its share (one for two sources), and every global batch carries the mixture's proportions.
(A seeded shuffle inside each block, the first version, kept the aligned windows exact but let
a window across two blocks drift by tens of sequences; the sequences of each source are
shuffled by its own permutation anyway.) Draws of a source are numbered in position order; its k-th
draw is sequence perm_e(k mod N_s) of epoch e = k // N_s, where perm_e is the source's own
keyed permutation (the plain loader's key: fingerprint, seed, epoch), so each source is read
exactly once per epoch, and a one-source mixture reads the plain loader's order within an
epoch. Nothing else enters: not dp, micro-batch, run length or workers.

Exhaustion. A source may cap its reading at `epochs` (a float: ⌊epochs·N_s⌋ draws). When the
first draw beyond the cap comes up, the source's `on_exhausted` policy (per source) applies,
and the loader logs one line as the iteration passes that point:
- `next_epoch` (default): the cap only marks the point; the source continues into its next
  epoch (reshuffled), as every source does at each epoch end without a cap.
- `stop`: the iteration ends at the last whole global batch before that draw (every rank stops
  at the same batch); the trainer stops there and says why.
- `drop`: from that position on, the mixture is the remaining sources with their weights
  renormalised — a new segment with its own block grid, starting where the source ran out and
  continuing each remaining source's draw count. When no source with a positive weight remains,
  the iteration ends as with `stop`.
Segment boundaries are computed once, from the configuration alone (a binary search over the
closed-form draw counts), so they too are independent of dp and of where a run resumes.

State. `state_dict()` is a small JSON dict, identical on every rank: format version, kind
"mixture", split, seed, seq_len, global batch, sequences consumed (globally: the position), and
per source {name, fingerprint, weight, epochs, on_exhausted, draws}. Only the position is read
back; the draws (tokens per source, `tokens/<name>` in the metrics) are recomputed from it
in closed form, so they survive resume. Loading checks the sources (names, fingerprints,
weights, caps, policies), the seed and the seq_len, and refuses a mismatch with a line naming
it; like the plain loader it continues at any dp whose micro-step grid holds the position.

Prior art, and why this design. Megatron-LM's `BlendedDataset`
(megatron/core/datasets/blended_dataset.py, with `build_blending_indices` in its C++ helpers)
chooses, for each sample i, the dataset with the largest error w_d·i − (samples taken from d),
and materialises two arrays (dataset index, sample index) sized by the number of samples the
run plans to draw, cached on disk: exact shares, but an O(n) build that depends on the planned
run length, and no randomness in the interleaving. OLMo-core's source mixtures
(olmo_core.data.source_mixture) turn target ratios and the requested token count into a
per-source token budget (with a maximum repetition factor), then sample and materialise the
chosen instances: the mixture is fixed by the planned length. We follow Megatron's idea — a
deterministic allocation that keeps every source within one sample of its target — at block
granularity, in closed form, with each block's slots spread evenly, so there is nothing to
build or cache, resume is O(1) from one integer, and the order does not depend on the run's
length or layout; OLMo-core's per-source repetition cap becomes `epochs` with an explicit
policy for what happens when it is reached.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .loader import LoaderBase, check_loader_args, check_order_keys, document_outputs, read_windows
from .permutation import IndexPermutation, derive_keys, mix64
from .stream import TokenStream

STATE_VERSION = 1
BLOCK = 1000  # positions per block: each holds ⌊BLOCK·w⌋ or ⌈BLOCK·w⌉ sequences of a source of weight w
POLICIES = ("next_epoch", "stop", "drop")
_SCALE = 1 << 40  # weights are integers over 2^40
_GOLDEN = int(_SCALE * (math.sqrt(5) - 1) / 2) | 1  # φ⁻¹·2^40, odd: the Weyl step of the extra slots
_BLOCK_CACHE = 64


@dataclass(frozen=True)
class Source:
    """One source of a mixture (data.sources entry). epochs = 0: no cap."""

    path: str
    weight: float = 1.0
    name: str = ""
    epochs: float = 0.0
    on_exhausted: str = "next_epoch"


def check_sources(sources: list, key: str = "data.sources") -> list[Source]:
    """Sources with names filled in (basename, deduplicated), or DataError naming the key and value."""
    if not sources:
        raise DataError(f"{key}: empty (list at least one prepared dataset)")
    out, used = [], set()
    explicit = [str(getattr(s, "name", "") or "") for s in sources]
    for i, s in enumerate(sources):
        where = f"{key}[{i}]"
        path = str(getattr(s, "path", "") or "")
        if not path:
            raise DataError(f"{where}.path: required (a data.prepare output folder)")
        try:
            weight = float(s.weight)
        except (TypeError, ValueError):
            raise DataError(f"{where}.weight={s.weight!r}: not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise DataError(f"{where}.weight={weight}: must be a finite number >= 0")
        epochs = float(getattr(s, "epochs", 0.0) or 0.0)
        if not math.isfinite(epochs) or epochs < 0:
            raise DataError(f"{where}.epochs={epochs}: must be a finite number >= 0 (0 = no cap)")
        policy = str(getattr(s, "on_exhausted", "next_epoch"))
        if policy not in POLICIES:
            raise DataError(f"{where}.on_exhausted={policy!r}: must be one of {', '.join(POLICIES)}")
        name = explicit[i]
        if name:
            if name in used:
                raise DataError(f"{where}.name={name!r}: another source has this name")
        else:
            base = Path(path).expanduser().name or "source"
            name, n = base, 1
            while name in used or name in explicit:
                n += 1
                name = f"{base}-{n}"
        if "/" in name or not name.strip():
            raise DataError(f"{where}.name={name!r}: must be non-empty and hold no '/'")
        used.add(name)
        out.append(Source(path, weight, name, epochs, policy))
    if not any(s.weight > 0 for s in out):
        raise DataError(f"{key}: every weight is 0 (at least one source must be drawn)")
    return out


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """Σ_{i=0}^{n-1} ⌊(a·i + b) / m⌋ for n ≥ 0, m ≥ 1 and any integers a, b: O(log m) steps."""
    if n <= 0:
        return 0
    total = 0
    q, a = divmod(a, m)
    total += q * (n * (n - 1) // 2)
    q, b = divmod(b, m)
    total += q * n
    while True:
        if a >= m:
            total += (n - 1) * n // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y_max = a * n + b
        if y_max < m:
            return total
        n, b, m, a = y_max // m, y_max % m, a, m


def integer_weights(weights: list[float]) -> list[int]:
    """Non-negative integers proportional to `weights`, summing to 2^40 (largest remainder, exact)."""
    exact = [Fraction(w) for w in weights]
    total = sum(exact)
    shares = [w * _SCALE / total for w in exact]
    ints = [math.floor(s) for s in shares]
    short = _SCALE - sum(ints)
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - ints[i]), i))
    for i in order[:short]:
        ints[i] += 1
    return ints


class _Segment:
    """The mixture from global position `start` on, over the sources with a positive weight here."""

    def __init__(self, start: int, weights: list[float], offsets: list[int], key_parts: tuple, index: int):
        self.start, self.offsets, self.index = start, np.asarray(offsets, dtype=np.int64), index
        self.ints = integer_weights(weights)
        self.m = [BLOCK * w // _SCALE for w in self.ints]  # whole slots per block
        self.r = [BLOCK * w % _SCALE for w in self.ints]  # the fraction, over 2^40
        digest = hashlib.sha256("|".join(map(str, ("moeforge-mixture-v1", *key_parts, self.ints, index))).encode())
        u0 = int.from_bytes(digest.digest()[:8], "little") % _SCALE
        arc = np.cumsum([0] + self.r[:-1]).tolist()
        # Source s takes an extra slot in block b iff (c_s + b·G) mod 2^40 < r_s.
        self.c = [(u0 - a) % _SCALE for a in arc]
        self.keys = derive_keys("moeforge-mixture-slots-v1", *key_parts, self.ints, index)
        self._blocks: dict[int, tuple] = {}

    def counts(self, b: int) -> np.ndarray:
        """Draws of each source in this segment's blocks [0, b)."""
        out = []
        for m, r, c in zip(self.m, self.r, self.c):
            extra = floor_sum(b, _SCALE, _GOLDEN, c) - floor_sum(b, _SCALE, _GOLDEN, c - r) if r else 0
            out.append(b * m + extra)
        return np.asarray(out, dtype=np.int64)

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source of each slot, its draw number within the block, draws before the block) of block b."""
        got = self._blocks.get(b)
        if got is not None:
            return got
        quota = np.asarray([m + int((c + b * _GOLDEN) % _SCALE < r) for m, r, c in zip(self.m, self.r, self.c)],
                           dtype=np.int64)
        assert quota.sum() == BLOCK
        first = np.concatenate([[0], np.cumsum(quota)])
        # Spread each source's slots evenly over the block: its k-th slot is due at (k + ½)/q_s of
        # the block, and slots go out in due order (ties: a per-block seeded order of the sources).
        # Any window of consecutive positions, inside a block or across two, then holds within
        # about two sequences of its share, and every global batch carries the mixture's mix.
        owner = np.repeat(np.arange(len(quota)), quota)
        k = np.arange(BLOCK) - first[owner]
        due = (2 * k + 1) / (2.0 * quota[owner])  # distinct rationals ≥ 1/(2·BLOCK)² apart: exact order
        keys = mix64(self.keys ^ mix64(np.full(len(self.keys), b, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
        tie = mix64(np.arange(len(quota), dtype=np.uint64) ^ keys[0])
        src = owner[np.lexsort((tie[owner], due))]
        order = np.argsort(src, kind="stable")  # slots of each source in position order
        occ = np.empty(BLOCK, dtype=np.int64)
        occ[order] = np.arange(BLOCK) - first[src[order]]
        if len(self._blocks) >= _BLOCK_CACHE:
            self._blocks.clear()
        got = self._blocks[b] = (src, occ, self.counts(b))
        return got

    def draws_before(self, local: int) -> np.ndarray:
        """Draws of each source at segment positions [0, local)."""
        b, j = divmod(local, BLOCK)
        src, _, before = self.block(b)
        return before + np.bincount(src[:j], minlength=len(self.m))

    def position_of(self, s: int, k: int) -> int:
        """Segment position of source s's draw number k (0-based) in this segment."""
        lo, hi = 0, 1
        while self.counts(hi)[s] <= k:  # the first block boundary past draw k
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # counts(lo)[s] <= k < counts(hi)[s]
            mid = (lo + hi) // 2
            if self.counts(mid)[s] <= k:
                lo = mid
            else:
                hi = mid
        src, occ, before = self.block(lo)
        j = int(np.flatnonzero((src == s) & (occ == k - before[s]))[0])
        return lo * BLOCK + j


def _print_rank0(message: str) -> None:
    print(f"data: {message}", file=sys.stderr, flush=True)


class MixtureLoader(LoaderBase):
    """The plain loader's interface (batches, micro-steps, rank slices, prefetch, state) over a
    weighted mixture of prepared datasets. Batches add `source` (LongTensor[micro_batch_size], the
    source's position in `sources`); `index` is the sequence's index within its source.

    Args: as ShardedTokenLoader, with `sources` (a list of Source, or of objects with path,
    weight, name, epochs, on_exhausted) for its path, and `log` (one line per exhaustion event;
    default: stderr on dp_rank 0).
    """

    def __init__(self, sources: list, seq_len: int, micro_batch_size: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, *, split: str = "train", num_workers: int = 0,
                 prefetch_factor: int = 2, document_aware: bool = False, num_batches: int | None = None,
                 log=None):
        check_loader_args(seq_len, micro_batch_size, global_batch_size, dp_rank, dp_size, prefetch_factor,
                          num_workers)
        self.sources = check_sources(list(sources))
        self.split = split
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.global_batch_size, self.dp_rank, self.dp_size = int(global_batch_size), int(dp_rank), int(dp_size)
        self.seed, self.num_workers, self.prefetch_factor = int(seed), int(num_workers), int(prefetch_factor)
        self.document_aware, self.num_batches = bool(document_aware), num_batches
        self.log = log if log is not None else (_print_rank0 if self.dp_rank == 0 else (lambda message: None))
        self.streams = []
        for i, s in enumerate(self.sources):
            try:
                self.streams.append(TokenStream(Path(s.path).expanduser(), split))
            except DataError as exc:
                raise DataError(f"data.sources[{i}] ({s.name}): {exc}") from None
        first = self.streams[0].manifest
        for i, st in enumerate(self.streams[1:], 1):
            m = st.manifest
            for key in ("sha256", "vocab_size"):
                a, b = first["tokenizer"].get(key), m["tokenizer"].get(key)
                if a != b:
                    raise DataError(f"data.sources[{i}] ({self.sources[i].name}): prepared with another tokenizer "
                                    f"than data.sources[0] ({self.sources[0].name}): tokenizer {key} {b} vs {a}")
            if m["eos_id"] != first["eos_id"]:
                raise DataError(f"data.sources[{i}] ({self.sources[i].name}): eos_id {m['eos_id']} differs from "
                                f"data.sources[0]'s {first['eos_id']}")
        self.fingerprints = [st.fingerprint for st in self.streams]
        self.num_sequences = [max(st.total - 1, 0) // self.seq_len for st in self.streams]
        for i, (s, n) in enumerate(zip(self.sources, self.num_sequences)):
            if n < 1:
                raise DataError(f"data.sources[{i}] ({s.name}): {self.streams[i].manifest['_path']} split '{split}' "
                                f"has {self.streams[i].total} tokens, no sequence of seq_len {self.seq_len}")
        self.caps = []
        for i, (s, n) in enumerate(zip(self.sources, self.num_sequences)):
            cap = math.floor(s.epochs * n) if s.epochs > 0 else None
            if cap is not None and cap < 1:
                raise DataError(f"data.sources[{i}].epochs={s.epochs}: less than one of its {n} sequences")
            self.caps.append(cap)
        self.consumed = 0  # global mixture position: sequences consumed over all ranks
        self._perms: dict[tuple[int, int], IndexPermutation] = {}
        self._active = None
        self._logged: set[int] = set()
        self._schedule()

    # ---------------------------------------------------------------- the order
    def _schedule(self) -> None:
        """Segments (a new one at each `drop`), exhaustion events and the end (a `stop`), from the config."""
        key_parts = (self.seed, *self.fingerprints)
        weights = [s.weight for s in self.sources]
        offsets = [0] * len(self.sources)
        self.segments: list[_Segment] = []
        self.events: list[tuple[int, str]] = []  # (global position of the first draw beyond a cap, log line)
        self.end: int | None = None  # the first position not drawn (stop, or every source dropped)
        self.end_reason = ""
        passed: set[int] = set()
        start = 0
        while True:
            seg = _Segment(start, weights, offsets, key_parts, len(self.segments))
            self.segments.append(seg)
            hits = sorted((start + seg.position_of(i, self.caps[i] - offsets[i]), i)
                          for i in range(len(self.sources))
                          if self.caps[i] is not None and weights[i] > 0 and i not in passed)
            turn = next(((pos, i) for pos, i in hits if self.sources[i].on_exhausted != "next_epoch"), None)
            for pos, i in hits:
                if turn is not None and pos >= turn[0]:
                    break
                passed.add(i)
                self.events.append((pos, self._cap_line(i, pos, "continues into its next epoch")))
            if turn is None:
                return
            pos, i = turn
            passed.add(i)
            s = self.sources[i]
            if s.on_exhausted == "stop":
                self.end, self.end_reason = pos, self._cap_line(i, pos, "the mixture stops here")
                self.events.append((pos, self.end_reason))
                return
            offsets = (np.asarray(offsets) + seg.draws_before(pos - start)).tolist()
            weights = [0.0 if j == i else w for j, w in enumerate(weights)]
            if not any(w > 0 for w in weights):
                self.end, self.end_reason = pos, self._cap_line(i, pos, "dropped; no source with a weight > 0 "
                                                                 "remains, the mixture stops here")
                self.events.append((pos, self.end_reason))
                return
            rest = sum(weights)
            shares = ", ".join(f"{t.name} {w / rest:.4g}" for t, w in zip(self.sources, weights) if w > 0)
            self.events.append((pos, self._cap_line(i, pos, f"dropped; the rest renormalised: {shares}")))
            start = pos

    def _cap_line(self, i: int, pos: int, what: str) -> str:
        s = self.sources[i]
        return (f"source '{s.name}' reached its cap of {s.epochs:g} epochs ({self.caps[i]} sequences) at mixture "
                f"sequence {pos} (on_exhausted={s.on_exhausted}): {what}")

    @property
    def step(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def stop_position(self) -> int | None:
        """The position the iteration ends at: the last whole global batch before `end` (None: endless)."""
        if self.end is None:
            return None
        return self.end // self.global_batch_size * self.global_batch_size

    @property
    def exhausted(self) -> str | None:
        """Why the iteration has ended (None while it has not)."""
        stop = self.stop_position
        return self.end_reason if stop is not None and self.consumed >= stop else None

    def permutation(self, s: int, epoch: int) -> IndexPermutation:
        """Source s's order of `epoch`: the plain loader's (same key), so one source reads as data.path does."""
        perm = self._perms.get((s, epoch))  # reader threads share the cache: never read it back after a write
        if perm is None:
            if len(self._perms) > 4 * len(self.sources):
                self._perms.clear()
            keys = derive_keys("moeforge-order-v1", self.fingerprints[s], self.seed, epoch)
            perm = self._perms[(s, epoch)] = IndexPermutation(self.num_sequences[s], keys)
        return perm

    def _segment_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted([seg.start for seg in self.segments], positions, side="right") - 1

    def draws(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, draw number k of that source) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        src = np.empty(positions.shape, dtype=np.int64)
        k = np.empty(positions.shape, dtype=np.int64)
        seg_of = self._segment_of(positions)
        for g in np.unique(seg_of).tolist():
            seg = self.segments[g]
            sel = np.flatnonzero(seg_of == g)
            local = positions[sel] - seg.start
            blocks = local // BLOCK
            for b in np.unique(blocks).tolist():
                rows = sel[blocks == b]
                slot_src, occ, before = seg.block(b)
                j = positions[rows] - seg.start - b * BLOCK
                s = slot_src[j]
                src[rows] = s
                k[rows] = seg.offsets[s] + before[s] + occ[j]
        return src, k

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, sequence index within the source) of each global position."""
        src, k = self.draws(positions)
        idx = np.empty_like(k)
        n = np.asarray(self.num_sequences, dtype=np.int64)[src]
        epoch = k // n
        for s, e in sorted(set(zip(src.tolist(), epoch.tolist()))):
            rows = np.flatnonzero((src == s) & (epoch == e))
            idx[rows] = self.permutation(s, e)(k[rows] - e * self.num_sequences[s])
        return src, idx

    def draws_at(self, position: int) -> list[int]:
        """Sequences drawn from each source at global positions [0, position)."""
        g = int(self._segment_of(np.asarray([position]))[0])
        seg = self.segments[g]
        return (seg.offsets + seg.draws_before(position - seg.start)).tolist()

    def tokens_per_source(self) -> dict[str, int]:
        """Input tokens read from each source so far (all ranks), derived from the position."""
        return {s.name: d * self.seq_len for s, d in zip(self.sources, self.draws_at(self.consumed))}

    @property
    def source_weights(self) -> dict[str, float]:
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}

    # ---------------------------------------------------------------- the iterator's interface
    def _cursor(self) -> int:
        return self.consumed

    def _batches(self, consumed: int):
        m, step, stop = self.micro_batch_size, self.step, self.stop_position
        offsets = self.dp_rank * m + np.arange(m)
        steps = max(64, 4096 // m)
        while stop is None or consumed < stop:
            n = steps if stop is None else min(steps, (stop - consumed) // step)
            starts = consumed + step * np.arange(n)
            src, idx = self.locate((starts[:, None] + offsets[None, :]).ravel())
            for r in range(n):
                consumed += step
                yield consumed, (src[r * m:(r + 1) * m], idx[r * m:(r + 1) * m])

    def _commit(self, consumed: int) -> None:
        old, self.consumed = self.consumed, consumed
        for n, (pos, line) in enumerate(self.events):
            if old <= pos < consumed and n not in self._logged:
                self._logged.add(n)
                self.log(line)
        stop = self.stop_position
        if stop is not None and old < stop <= consumed and -1 not in self._logged:
            self._logged.add(-1)
            self.log(f"end of the mixture after {stop} sequences: {self.end_reason}")

    def read_batch(self, planned) -> dict:
        src, idx = planned
        m, L = len(idx), self.seq_len
        x = np.empty((m, L), dtype=np.int64)
        y = np.empty((m, L), dtype=np.int64)
        for s in np.unique(src).tolist():
            rows = np.flatnonzero(src == s)
            read_windows(self.streams[s], idx[rows], L, x, y, rows)
        batch = {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y), "index": torch.from_numpy(idx),
                 "source": torch.from_numpy(src)}
        if self.document_aware:
            document_outputs([self.streams[s] for s in src.tolist()], idx, x, y, batch)
        return batch

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        draws = self.draws_at(self.consumed)
        return {"format_version": STATE_VERSION, "kind": "mixture", "split": self.split, "seed": self.seed,
                "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
                "sequences_consumed": self.consumed, "sequences_seen": self.consumed,
                "sources": [{"name": s.name, "fingerprint": fp, "weight": s.weight, "epochs": s.epochs,
                             "on_exhausted": s.on_exhausted, "draws": d}
                            for s, fp, d in zip(self.sources, self.fingerprints, draws)]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (any dp, micro-batch, num_workers). DataError names a mismatch."""
        try:
            version, kind = int(state["format_version"]), state.get("kind")
            seed, seq_len, consumed = int(state["seed"]), int(state["seq_len"]), int(state["sequences_consumed"])
            saved = list(state["sources"]) if kind == "mixture" else None
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"loader state: missing or malformed key {exc}") from None
        if kind != "mixture":
            raise DataError(f"loader state: a single dataset's (fingerprint {str(state.get('fingerprint'))[:12]}…); "
                            f"this run reads a mixture of {len(self.sources)} sources (data.sources)")
        if version > STATE_VERSION:
            raise DataError(f"loader state: mixture format version {version} is newer than this moeforge reads "
                            f"({STATE_VERSION})")
        if len(saved) != len(self.sources):
            raise DataError(f"loader state: a mixture of {len(saved)} sources; data.sources lists {len(self.sources)}")
        for i, (old, s, fp) in enumerate(zip(saved, self.sources, self.fingerprints)):
            now = {"name": s.name, "fingerprint": fp, "weight": s.weight, "epochs": s.epochs,
                   "on_exhausted": s.on_exhausted}
            for key, value in now.items():
                if old.get(key) != value:
                    raise DataError(f"loader state: data.sources[{i}] {key} {old.get(key)!r} differs from this "
                                    f"run's {value!r}")
        check_order_keys(self, seq_len, seed)
        if consumed < 0:
            raise DataError(f"loader state: negative sequences_consumed {consumed}")
        if consumed % self.step:
            raise DataError(f"loader state: sequences_consumed {consumed} is not a multiple of micro_batch_size × "
                            f"dp_size = {self.step}; resume from a global-batch boundary")
        old_it = self._active() if self._active else None
        if old_it is not None:
            old_it.close()
        self.consumed = consumed
        self._logged = {n for n, (pos, _) in enumerate(self.events) if pos < consumed}
        stop = self.stop_position
        if stop is not None and consumed >= stop:
            self._logged.add(-1)
