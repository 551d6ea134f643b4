"""`python -m data.prepare input=… output=… tokenizer=…` — raw text to tokenized shards.

    python -m data.prepare input=stdlib output=data/stdlib tokenizer=byte
    python -m data.prepare input=corpus/ output=data/c tokenizer=tok/ fim_rate=0.5 num_proc=16

Documents are read in a fixed order (data/corpus.py), tokenized in parallel by `num_proc`
processes in chunks (order kept, at most two chunks in flight per process so memory stays
flat), each followed by EOS, with fill-in-the-middle where drawn (data/fim.py), and appended
by the main process to the train or validation writer (data/shard_writer.py). Validation takes
`val_fraction` of the documents, evenly spread (row r of file k goes to val when
round((k+r+1)·f) > round((k+r)·f): `val_mask`), or all of `val_input` when given. Validation and
FIM are keyed on a document's (file, row) identity from data/corpus.py, never on how many
documents came before it, so they come out the same when the input is split across machines.

Split across machines (`shard_index=i num_shards=n`): this run prepares part i of the input
(data/corpus.py `Source.part`: a contiguous range of the one-machine order, balanced by bytes,
cut between files or between rows of a file) into `output/part-0000i-of-0000n/`, a complete
dataset of its own; `merge=true` (or `python -m data.merge`) then checks the n parts and writes
`output/manifest.json` over their shards (data/merge.py). The merged splits hold the same
tokens, in the same order, as one preparation of the whole input.

The byte tokenizer without FIM takes a shorter path with the same output: its "encoding" is a
copy of the UTF-8 bytes, cheaper than shipping text to a worker and ids back, so the main
process encodes each chunk itself (one join, one widening copy, EOS scattered in), from the
bytes as read (no decode/encode round trip for valid UTF-8), while a thread per split writes,
hashes and fdatasyncs the shards (data/shard_writer.py, `background=True`). num_proc is unused there.

Atomicity and resume: shards are written as .tmp and renamed when complete; after each
completed shard a journal (`.prepare-progress.json`) records where the input stands and the
writers' states. An output folder holds one run, identified by a hash of the input's identity,
the tokenizer's identity and the options that shape the output (not num_proc):

- output has manifest.json of the same run: nothing to do; of another run: refused.
- output has a journal of the same run: resumed from the last completed shard (the input is
  re-read up to that point, not re-tokenized); of another run: refused, naming what differs.
- a bad input (DataError) in a fresh run removes everything this run created.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import cli
from .corpus import Source, open_source
from .errors import DataError
from .shard_writer import ShardWriter
from .shards import FORMAT, FORMAT_VERSION, MANIFEST, write_json_atomic
from .tokenizer import encode_documents, load_tokenizer, token_dtype

JOURNAL = ".prepare-progress.json"
# Options that do not change the bytes written; everything else is part of the run id.
_NOT_IN_RUN_ID = {"num_proc", "progress", "chunk_chars", "output", "merge"}
# Validation selection and FIM are keyed on each document's (file, row) identity (data/corpus.py),
# not on its running index: part of the run id, so a journal of the older keying is not resumed.
DOCUMENT_KEYS = "file-row"


@dataclass
class PrepareConfig:
    """Options of `python -m data.prepare` (key=value)."""

    input: str  # a file, a folder, 'stdlib', or a hub dataset name
    output: str  # folder to create (or an empty one, or this run's unfinished one to resume)
    tokenizer: str = "byte"  # byte | path to tokenizer.json | folder holding one
    text_key: str = "text"  # field holding the document text (json, parquet, hub)
    text_sample_by: str = "document"  # text files: document | paragraph | line
    hub_split: str = "train"
    hub_config: str = ""
    val_fraction: float = 0.01  # share of documents for validation (unused when val_input is set)
    val_input: str = ""  # a separate validation input
    shard_tokens: int = 1 << 27  # tokens per shard (256 MiB as uint16)
    fim_rate: float = 0.0  # share of documents turned into fill-in-the-middle (PSM)
    seed: int = 0  # FIM draws
    max_docs: int = 0  # stop after this many documents per input (0 = all)
    max_chars: int = 0  # stop once this many characters were read per input (0 = all)
    num_proc: int = 0  # tokenizer processes (0 = one per CPU)
    chunk_chars: int = 1 << 20  # characters per unit of work sent to a process
    progress: bool = True  # progress bar on stderr (when it is a terminal)
    skip_unknown: bool = False  # skip (and report) files of an unknown type instead of failing
    hub_streaming: bool = False  # stream a hub dataset over the network instead of loading it offline
    add_bos: str = "auto"  # BOS before each document: auto (as the tokenizer's config says) | true | false
    shard_index: int = 0  # this machine's part of the input, 0 … num_shards-1
    num_shards: int = 1  # parts the input is split into (> 1: writes output/part-IIIII-of-NNNNN)
    merge: bool = False  # merge the num_shards parts under output into one dataset (prepares nothing)

    def validate(self) -> "PrepareConfig":
        if not self.output:
            raise DataError("output: required (a folder to write the shards into)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction={self.val_fraction}: must be in [0, 1)")
        if not 0.0 <= self.fim_rate <= 1.0:
            raise DataError(f"fim_rate={self.fim_rate}: must be in [0, 1]")
        for name in ("shard_tokens", "chunk_chars"):
            if getattr(self, name) < 1:
                raise DataError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("max_docs", "max_chars", "num_proc"):
            if getattr(self, name) < 0:
                raise DataError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.num_shards < 1:
            raise DataError(f"num_shards={self.num_shards}: must be >= 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise DataError(f"shard_index={self.shard_index}: out of range for num_shards={self.num_shards} "
                            f"(0…{self.num_shards - 1})")
        if self.add_bos.lower() not in ("auto", "true", "false"):
            raise DataError(f"add_bos={self.add_bos!r}: must be auto, true or false")
        if self.num_shards > 1:
            for name in ("max_docs", "max_chars"):
                if getattr(self, name):
                    raise DataError(f"{name}={getattr(self, name)}: counts from the first document of the whole "
                                    f"input, which a part does not know (num_shards={self.num_shards}); drop it")
        return self

    def part_output(self) -> Path:
        """Where this preparation writes: output, or output/part-IIIII-of-NNNNN for one of n parts."""
        out = Path(self.output).expanduser()
        return out / part_name(self.shard_index, self.num_shards) if self.num_shards > 1 else out


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


# ----------------------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(tokenizer: str, dtype: str, fim_rate: float, seed: int, add_bos: str = "auto",
                 in_worker: bool = True) -> None:
    if in_worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (one line)
    _WORKER.update(tok=load_tokenizer(tokenizer, add_bos=add_bos), dtype=np.dtype(dtype), fim_rate=fim_rate,
                   seed=seed)


def _encode_chunk(job: tuple) -> tuple:
    first, texts, files, rows = job
    tok = _WORKER["tok"]
    tokens, lengths = encode_documents(tok, texts, fim_keys(files, rows), _WORKER["dtype"], _WORKER["fim_rate"],
                                       _WORKER["seed"])
    if tok.kind == "byte":  # document bytes = tokens minus EOS and FIM sentinels
        nbytes = len(tokens) - int(np.count_nonzero(tokens >= 256))
    else:
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return first, tokens, lengths, nbytes, files, rows


class _Workers:
    """A process pool (or the calling process when num_proc is 1) mapping in order with bounded memory."""

    def __init__(self, num_proc: int, initargs: tuple):
        self.num_proc, self.pool = num_proc, None
        if num_proc <= 1:
            _init_worker(*initargs, in_worker=False)
        else:  # fork: workers start in milliseconds (they only tokenize; no CUDA, no collectives)
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self.pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=initargs)

    def map(self, fn, jobs: Iterator) -> Iterator:
        """fn over jobs, results in order; at most 2 jobs in flight per process."""
        if self.pool is None:
            for job in jobs:
                yield fn(job)
            return
        pending: deque = deque()
        for job in jobs:
            pending.append(self.pool.apply_async(fn, (job,)))
            if len(pending) >= 2 * self.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _chunks(docs: Iterator[tuple], skip: int, cfg: PrepareConfig) -> Iterator[tuple]:
    """(index of first document, documents, their file numbers, their rows) of about chunk_chars
    characters, from document `skip` on (indices count this run's documents, for resume).

    `docs` yields (file, row, document, its number of characters): (…, text, len(text)), or
    (…, UTF-8 bytes, characters) on the byte path, which chunks exactly as the text path does.
    The caps (max_docs, max_chars) count from the first document, skipped ones included, so a
    resumed run stops exactly where the uninterrupted one would.
    """
    index = seen_chars = batch_chars = 0
    batch: list = []
    files: list = []
    rows: list = []
    for k, r, doc, chars in docs:
        if (cfg.max_docs and index >= cfg.max_docs) or (cfg.max_chars and seen_chars >= cfg.max_chars):
            break
        index += 1
        seen_chars += chars
        if index <= skip:
            continue
        batch.append(doc)
        files.append(k)
        rows.append(r)
        batch_chars += chars
        if batch_chars >= cfg.chunk_chars or len(batch) >= 4096:
            yield index - len(batch), batch, np.asarray(files, dtype=np.int64), np.asarray(rows, dtype=np.int64)
            batch, files, rows, batch_chars = [], [], [], 0
    if batch:
        yield index - len(batch), batch, np.asarray(files, dtype=np.int64), np.asarray(rows, dtype=np.int64)


def _with_chars(records: Iterator[tuple[int, int, str]]) -> Iterator[tuple[int, int, str, int]]:
    for k, r, text in records:
        yield k, r, text, len(text)


def fim_keys(files: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The FIM key of each document: file · 2³² + row, unique per document and independent of how
    the input is split (consecutive rows of a file get consecutive keys)."""
    return (files.astype(np.uint64) << np.uint64(32)) + rows.astype(np.uint64)


def val_mask(files: np.ndarray, rows: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents go to validation: row r of file k when round((k+r+1)·f) > round((k+r)·f).

    Evenly spread within each file (exactly f of a large file's rows), and for one-document
    files (stdlib, text files) exactly the former rule on the document index, k. It depends only
    on the document's (file, row), never on what was read before it: the same on one machine
    and split across many."""
    idx = (files + rows).astype(np.float64)
    return np.floor((idx + 1) * fraction + 0.5) > np.floor(idx * fraction + 0.5)


def _byte_fast_path(tok, cfg: PrepareConfig) -> bool:
    """The byte tokenizer without FIM needs no worker processes: its encoding is a copy of the
    documents' UTF-8 bytes, cheaper than pickling them to a worker and the ids back."""
    return tok.kind == "byte" and cfg.fim_rate <= 0 and not tok.add_bos


def _encode_utf8_chunks(tok, src: Source, skip: int, cfg: PrepareConfig,
                        dtype: np.dtype) -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    """The byte path in this process: what `_encode_chunk` returns for the same chunks (same ids,
    lengths and byte counts), from the documents' bytes as read (no str, no pickling)."""
    for first, docs, files, rows in _chunks(src.records_utf8(), skip, cfg):
        tokens, lengths = tok.encode_utf8_documents(docs, dtype)
        yield first, tokens, lengths, len(tokens) - len(lengths), files, rows


# ----------------------------------------------------------------------------- output folder
def _diff(old: dict, new: dict) -> str:
    keys = [k for k in ("source", "val_source", "tokenizer", "config") if old.get(k) != new.get(k)]
    parts = []
    for k in keys:
        a, b = old.get(k) or {}, new.get(k) or {}
        sub = [s for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)] if isinstance(a, dict) else []
        parts.append(f"{k}.{sub[0]}: {a.get(sub[0])!r} → {b.get(sub[0])!r}" if sub else k)
    return "; ".join(parts) or "different run id"


def _claim(out: Path, ident: dict) -> str | dict:
    """'fresh', 'done', or the journal to resume from. DataError when the folder holds another run."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output={out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    manifest, journal = out / MANIFEST, out / JOURNAL
    for path, what in ((manifest, "a prepared dataset"), (journal, "an unfinished preparation")):
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                raise DataError(f"{path}: unreadable; delete {out} or choose another output") from None
            if old.get("run_id") != ident["run_id"]:
                raise DataError(f"output={out}: holds {what} of a different run ({_diff(old, ident)}); "
                                "choose another output or delete it")
            return "done" if path == manifest else old
    raise DataError(f"output={out}: not empty and not a data.prepare output; choose a new or empty folder")


def _identity(cfg: PrepareConfig, source: Source, val_source: Source | None, tok) -> dict:
    options = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_RUN_ID}
    ident = {"source": source.identity(), "val_source": val_source.identity() if val_source else None,
             "tokenizer": tok.identity(), "config": options}
    blob = json.dumps({"format_version": FORMAT_VERSION, "document_keys": DOCUMENT_KEYS, **ident},
                      sort_keys=True).encode()
    ident["run_id"] = hashlib.sha256(blob).hexdigest()
    return ident


# ----------------------------------------------------------------------------- the run
class _Progress:
    def __init__(self, enabled: bool):
        self.start = time.perf_counter()
        self.docs = self.tokens = self.bytes = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread (we fork workers)
            self.bar = tqdm(unit=" docs", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                            disable=None)  # None: only on a terminal, so logs and errors stay clean

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens:,} tokens, {self.bytes / 1e6 / elapsed:.1f} MB/s", refresh=False)
            self.bar.update(docs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare(cfg: PrepareConfig, on_journal: Callable[[dict], None] | None = None) -> dict:
    """Run a preparation; return its manifest (or the existing one when already done).

    `on_journal` is called after each journal write (tests use it to simulate a crash).
    """
    cfg.validate()
    if cfg.merge:
        from .merge import merge_prepared

        return merge_prepared(cfg)
    out = cfg.part_output()
    common = dict(text_key=cfg.text_key, text_sample_by=cfg.text_sample_by, hub_split=cfg.hub_split,
                  hub_config=cfg.hub_config, hub_streaming=cfg.hub_streaming, skip_unknown=cfg.skip_unknown)
    source = open_source(cfg.input, **common)
    val_source = open_source(cfg.val_input, key="val_input", **common) if cfg.val_input else None
    for key, src in (("input", source), ("val_input", val_source)):
        line = src.skipped_line(key) if src is not None else None
        if line:
            print(f"note: {line}", file=sys.stderr)
    if cfg.num_shards > 1:
        source = source.part(cfg.shard_index, cfg.num_shards)
        val_source = val_source.part(cfg.shard_index, cfg.num_shards, "val_input") if val_source else None
    tok = load_tokenizer(cfg.tokenizer, add_bos=cfg.add_bos)
    if cfg.fim_rate > 0 and tok.fim is None:
        raise DataError(f"fim_rate={cfg.fim_rate}: tokenizer={cfg.tokenizer} has no FIM sentinel tokens "
                        "(<|fim_prefix|>, <|fim_middle|>, <|fim_suffix|>)")
    ident = _identity(cfg, source, val_source, tok)
    created_root = not out.exists()
    parent = Path(cfg.output).expanduser()
    created_parent = cfg.num_shards > 1 and not parent.exists()
    try:
        with _exclusive(out, created_root):
            return _run(cfg, out, created_root, source, val_source, tok, ident, on_journal)
    except DataError:
        if created_parent and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        raise


@contextlib.contextmanager
def _exclusive(out: Path, created_root: bool):
    """Hold an exclusive lock on the output folder: a second data.prepare into it is refused."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output={out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataError(f"output={out}: another data.prepare is writing into it") from None
        try:
            yield
        except DataError:
            if created_root and out.exists() and not any(out.iterdir()):
                out.rmdir()
            raise
    finally:
        os.close(fd)


def _run(cfg: PrepareConfig, out: Path, created_root: bool, source: Source, val_source: Source | None, tok,
         ident: dict, on_journal) -> dict:
    claim = _claim(out, ident)
    if claim == "done":
        return json.loads((out / MANIFEST).read_text())
    resume = claim if isinstance(claim, dict) else None
    dtype = token_dtype(tok.vocab_size)
    fast = _byte_fast_path(tok, cfg)
    # The byte path tokenizes in this process; a thread per split then writes and hashes the shards.
    writers = {s: ShardWriter(out, s, dtype, cfg.shard_tokens, tok.eos_id, background=fast,
                              state=resume["writers"][s] if resume else None) for s in ("train", "val")}
    progress = _Progress(cfg.progress)
    workers = None if fast else _Workers(cfg.num_proc or os.cpu_count() or 1,
                                         (cfg.tokenizer, dtype.name, cfg.fim_rate, cfg.seed, cfg.add_bos))
    # Every document ends with EOS, the byte tokenizer's largest id in a shard (pad never appears).
    max_id = tok.eos_id if fast else None
    try:
        position = resume["position"] if resume else {"phase": "input", "next_doc": 0}
        if resume is None:  # from the first byte on, the folder says which run it belongs to
            _journal(out, ident, writers, position)
        phases = [("input", source)] + ([("val_input", val_source)] if val_source else [])
        first_phase = [name for name, _ in phases].index(position["phase"])
        shards_done = sum(len(w.shards) for w in writers.values())
        for phase, src in phases[first_phase:]:
            skip = position["next_doc"] if phase == position["phase"] else 0
            if fast:
                encoded = _encode_utf8_chunks(tok, src, skip, cfg, dtype)
            else:
                encoded = workers.map(_encode_chunk, _chunks(_with_chars(src.records()), skip, cfg))
            for first, tokens, lengths, nbytes, files, rows in encoded:
                _route(writers, phase, files, rows, tokens, lengths, 0.0 if val_source else cfg.val_fraction, max_id)
                progress.update(len(lengths), len(tokens), nbytes)
                done = sum(len(w.shards) for w in writers.values())
                if done > shards_done:  # a shard completed: record where we stand
                    shards_done = done
                    state = _journal(out, ident, writers, {"phase": phase, "next_doc": first + len(lengths)})
                    if on_journal:
                        on_journal(state)
            # A part may be empty (more parts than documents); data.merge checks the whole.
            if phase == "input" and writers["train"].documents == 0 and cfg.num_shards == 1:
                raise DataError(f"input={cfg.input}: no documents")
            if phase == "val_input" and writers["val"].documents == 0 and cfg.num_shards == 1:
                raise DataError(f"val_input={cfg.val_input}: no documents")
        splits = {s: w.finish() for s, w in writers.items()}
    except BaseException as exc:
        for w in writers.values():
            w.abort()
        if isinstance(exc, DataError) and resume is None:  # a fresh run that fails leaves nothing behind
            _remove_created(out, created_root, writers.values())
        raise  # anything else (an interrupt, a crash) keeps the journal: re-running resumes
    finally:
        if workers is not None:
            workers.close()
        progress.close()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype.name,
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                "bos_id": tok.bos_id, "add_bos": tok.add_bos,
                "shard_tokens": cfg.shard_tokens, "tokenizer": ident["tokenizer"], "run_id": ident["run_id"],
                "source": ident["source"], "val_source": ident["val_source"], "config": ident["config"],
                "splits": splits, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(out / MANIFEST, manifest)
    (out / JOURNAL).unlink(missing_ok=True)
    manifest["_summary"] = {"elapsed_s": time.perf_counter() - progress.start, "docs": progress.docs,
                            "tokens": progress.tokens, "bytes": progress.bytes}
    return manifest


def _remove_created(out: Path, created_root: bool, writers) -> None:
    if created_root:
        shutil.rmtree(out, ignore_errors=True)
        return
    for w in writers:
        for p in reversed(w.created):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    (out / JOURNAL).unlink(missing_ok=True)


def _route(writers: dict, phase: str, files: np.ndarray, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray,
           fraction: float, max_id: int | None = None) -> None:
    """Send each document of a chunk to train or val (order within each split kept; `val_mask`).

    `max_id`: the largest id in any document, when known (passed on to the writers)."""
    if phase == "val_input":
        writers["val"].append(tokens, lengths, max_id)
        return
    if fraction <= 0:
        writers["train"].append(tokens, lengths, max_id)
        return
    is_val = val_mask(files, rows, fraction)
    if not is_val.any():
        writers["train"].append(tokens, lengths, max_id)
        return
    token_is_val = np.repeat(is_val, lengths)
    writers["train"].append(tokens[~token_is_val], lengths[~is_val], max_id)
    writers["val"].append(tokens[token_is_val], lengths[is_val], max_id)


def _journal(out: Path, ident: dict, writers: dict, position: dict) -> dict:
    for w in writers.values():
        w.sync()
    state = {**ident, "position": position, "writers": {s: w.state() for s, w in writers.items()}}
    write_json_atomic(out / JOURNAL, state)
    return state


def summary_line(m: dict, out: str) -> str:
    s = m.get("_summary", {})
    tr, va = m["splits"]["train"], m["splits"]["val"]
    n_shards = len(tr["shards"]) + len(va["shards"])
    size = sum(x["data"]["bytes"] + x["index"]["bytes"] for sp in (tr, va) for x in sp["shards"])
    el = s.get("elapsed_s", 0.0)
    rate = (f" in {el:.1f} s: {s['tokens'] / max(el, 1e-9) / 1e6:.2f}M tokens/s, "
            f"{s['bytes'] / max(el, 1e-9) / 1e6:.1f} MB/s of text") if s else " (already complete)"
    return (f"prepared {tr['documents'] + va['documents']:,} documents (train {tr['documents']:,}, "
            f"val {va['documents']:,}), {tr['tokens'] + va['tokens']:,} tokens ({m['dtype']}, vocab "
            f"{m['vocab_size']}) in {n_shards} shards, {size / 1e6:.1f} MB{rate} -> {Path(out) / MANIFEST}")


def main(argv: list[str]) -> int:
    cfg = cli.start(argv, __doc__, PrepareConfig)
    if cfg is None:
        return 0
    manifest = prepare(cfg)
    if cfg.merge:
        from .merge import merged_line

        print(merged_line(manifest, cfg.output))
    else:
        print(summary_line(manifest, str(cfg.part_output())))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
