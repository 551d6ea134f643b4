"""The shard writer: documents in, fixed-size `.bin` / `.idx` shards out (format: data/shards.py).

A shard's files are written as `<name>.tmp`, hashed as they are written, fsynced and renamed
when the shard is full (`.idx` first, `.bin` last: the `.bin` marks it complete). `state()`
describes the bytes on disk so that a run killed at any point resumes exactly
(data/prepare.py's journal).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from pathlib import Path

import numpy as np

from .durable import fsync_path, sync_file
from .errors import DataError
from .shards import HASH_CHUNK, INDEX_DTYPE, fingerprint

_BACKGROUND_BYTES = 64 << 20  # bytes handed to a background writer and not yet written (memory bound)
_BACKGROUND_SYNC = 16 << 20  # a background writer fdatasyncs each file after this many bytes
_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class _BackgroundIO:
    """Threads that write, hash and sync the pieces a ShardWriter hands them, in order.

    File writes and SHA-256 over large buffers release the GIL, so the caller keeps producing
    tokens while the previous ones go to disk. Every `_BACKGROUND_SYNC` bytes of a file, a
    second thread fdatasyncs it (through a duplicate of its descriptor) while writing goes on,
    so the disk works during the run instead of all at the shard's final fsync. The pieces are
    the caller's arrays (no copy); `put` waits while more than `_BACKGROUND_BYTES` are not yet
    written. An error in a thread is raised in the caller at its next `put` or `drain`.
    """

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._syncs: queue.Queue = queue.Queue()  # duplicated descriptors to fdatasync, then close
        self._room = threading.Condition()
        self._pending = 0  # bytes put and not yet written
        self._error: BaseException | None = None
        self._unsynced: dict[int, int] = {}  # fileno → bytes written since its last fdatasync
        self._threads = [threading.Thread(target=self._write_loop, name="ShardWriter-write", daemon=True),
                         threading.Thread(target=self._sync_loop, name="ShardWriter-sync", daemon=True)]
        for t in self._threads:
            t.start()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    f, h, buf = item
                    f.write(buf)
                    h.update(buf)
                    fd = f.fileno()
                    n = self._unsynced.get(fd, 0) + len(buf)
                    if n >= _BACKGROUND_SYNC:
                        f.flush()
                        self._syncs.put(os.dup(fd))
                        n = 0
                    self._unsynced[fd] = n
            except BaseException as exc:  # kept for the caller; later pieces are dropped
                self._error = exc
            finally:
                if item is not None:
                    with self._room:
                        self._pending -= len(item[2])
                        self._room.notify_all()
                self._queue.task_done()

    def _sync_loop(self) -> None:
        while True:
            fd = self._syncs.get()
            try:
                if fd is None:
                    return
                try:
                    if self._error is None:
                        _fdatasync(fd)
                finally:
                    os.close(fd)
            except BaseException as exc:
                self._error = exc
            finally:
                self._syncs.task_done()

    def _raise(self) -> None:
        if self._error is not None:  # stays failed: nothing more is written
            raise self._error

    def put(self, f, h, buf: memoryview) -> None:
        self._raise()
        with self._room:
            while self._pending and self._pending + len(buf) > _BACKGROUND_BYTES:
                self._room.wait()
            self._pending += len(buf)
        self._queue.put((f, h, buf))

    def drain(self) -> None:
        """Wait until everything put so far is written, hashed and its syncs done (the files are the
        caller's again)."""
        self._queue.join()
        self._syncs.join()
        self._unsynced.clear()
        self._raise()

    def stop(self) -> None:
        self._queue.put(None)
        self._threads[0].join()
        self._syncs.put(None)
        self._threads[1].join()


class ShardWriter:
    """Appends documents to one split as fixed-size shards, hashing as it writes.

    `state()` (after `sync()`) is a small dict from which a new writer resumes exactly: the
    completed shards and the byte lengths of the in-progress `.tmp` files, which a resumed
    writer truncates to (discarding anything written after the state was taken).

    With `background=True` the writes and hashing run in a thread (`_BackgroundIO`), overlapping
    the caller's work; the bytes, hashes and states are the same. `append` then keeps
    references to the arrays it is given until they are written: do not modify them afterwards.
    """

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int, eos_id: int,
                 state: dict | None = None, background: bool = False):
        self.root, self.split, self.dtype = root, split, np.dtype(dtype).newbyteorder("<")  # little-endian on disk
        self.shard_tokens, self.eos_id = int(shard_tokens), int(eos_id)
        self.dir = root / split
        self.created: list[Path] = []  # every path this writer made, for cleanup after a user error
        self.shards: list[dict] = []
        self.tokens = self.documents = 0
        self.max_token_id = -1
        self._files: list | None = None  # open .bin.tmp and .idx.tmp of the shard in progress
        self._cur_tokens = self._cur_docs = 0
        self._background = background
        self._io: _BackgroundIO | None = None  # started at the first write
        if state:
            self._resume(state)

    # file names
    def _name(self, i: int, ext: str) -> str:
        return f"{self.split}/{i:05d}.{ext}"

    def _open(self, resume_lengths: tuple[int, int] | None = None) -> None:
        if not self.dir.exists():
            self.dir.mkdir(parents=True)
            self.created.append(self.dir)
        i = len(self.shards)
        paths = [self.root / (self._name(i, ext) + ".tmp") for ext in ("bin", "idx")]
        self._hashes = [hashlib.sha256(), hashlib.sha256()]
        if resume_lengths is None:
            self._files = [open(p, "wb") for p in paths]
            self.created.extend(paths)
            return
        self._files = []
        for p, n, h in zip(paths, resume_lengths, self._hashes):
            final = p.with_name(p.name[: -len(".tmp")])
            if not p.exists() and final.exists():  # renamed after the journal was written: reopen it
                os.replace(final, p)
            if not p.exists() or p.stat().st_size < n:
                raise DataError(f"{p}: shorter than the progress journal says; delete {self.root} and re-run")
            with open(p, "r+b") as f:
                f.truncate(n)
            with open(p, "rb") as f:  # re-hash the kept prefix
                while block := f.read(HASH_CHUNK):
                    h.update(block)
            self._files.append(open(p, "ab"))

    def _resume(self, state: dict) -> None:
        self.shards = list(state["shards"])
        self.tokens, self.documents = state["tokens"], state["documents"]
        self.max_token_id = state["max_token_id"]
        cur = state.get("current")
        if cur:
            self._cur_tokens, self._cur_docs = cur["tokens"], cur["documents"]
            self._open((cur["tokens"] * self.dtype.itemsize, cur["documents"] * INDEX_DTYPE.itemsize))

    def append(self, tokens: np.ndarray, lengths: np.ndarray, max_token_id: int | None = None) -> None:
        """Add whole documents: `tokens` back to back, `lengths[i]` tokens for document i.

        `max_token_id`, when the caller knows it, saves a pass over the tokens.
        """
        if len(tokens) == 0:
            return
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        top = int(tokens.max()) if max_token_id is None else int(max_token_id)
        self.max_token_id = max(self.max_token_id, top)
        self.tokens += len(tokens)
        self.documents += len(lengths)
        pos = 0
        while pos < len(tokens):
            if self._files is None:
                self._open()
            take = min(self.shard_tokens - self._cur_tokens, len(tokens) - pos)
            lo, hi = np.searchsorted(starts, [pos, pos + take])
            local = (starts[lo:hi] - pos + self._cur_tokens).astype(INDEX_DTYPE)
            self._write(0, tokens[pos:pos + take])
            self._write(1, local)
            self._cur_tokens += take
            self._cur_docs += int(hi - lo)
            pos += take
            if self._cur_tokens == self.shard_tokens:
                self._close_shard()

    def _write(self, which: int, arr: np.ndarray) -> None:
        buf = memoryview(np.ascontiguousarray(arr)).cast("B")
        if self._background:
            if self._io is None:
                self._io = _BackgroundIO()
            self._io.put(self._files[which], self._hashes[which], buf)
            return
        self._files[which].write(buf)
        self._hashes[which].update(buf)

    def _drain(self) -> None:
        if self._io is not None:
            self._io.drain()

    def _stop_io(self) -> None:
        if self._io is not None:
            io, self._io = self._io, None
            io.stop()

    def _close_shard(self) -> None:
        self._drain()
        i = len(self.shards)
        entry = {"tokens": self._cur_tokens, "documents": self._cur_docs}
        for which, ext, key in ((1, "idx", "index"), (0, "bin", "data")):  # .bin last: it marks completion
            f = self._files[which]
            sync_file(f)
            f.close()
            name = self._name(i, ext)
            final = self.root / name
            os.replace(self.root / (name + ".tmp"), final)
            self.created.append(final)
            entry[key] = {"file": name, "bytes": final.stat().st_size, "sha256": self._hashes[which].hexdigest()}
        self.shards.append({k: entry[k] for k in ("tokens", "documents", "data", "index")})
        fsync_path(self.dir, best_effort=True)
        self._files = None
        self._cur_tokens = self._cur_docs = 0

    def sync(self) -> None:
        """Make everything written so far durable (so `state()` describes bytes on disk)."""
        self._drain()
        for f in self._files or []:
            sync_file(f)

    def state(self) -> dict:
        cur = {"tokens": self._cur_tokens, "documents": self._cur_docs} if self._files else None
        return {"shards": list(self.shards), "tokens": self.tokens, "documents": self.documents,
                "max_token_id": self.max_token_id, "current": cur}

    def finish(self) -> dict:
        """Close the last (short) shard; the split's manifest entry."""
        if self._files:
            self._close_shard()
        self._stop_io()
        return {"tokens": self.tokens, "documents": self.documents, "max_token_id": self.max_token_id,
                "fingerprint": fingerprint(self.dtype.name, self.eos_id, self.shards), "shards": list(self.shards)}

    def abort(self) -> None:
        if self._io is not None:  # let the thread finish with the files before closing them
            with contextlib.suppress(Exception):
                self._io.drain()
            self._stop_io()
        for f in self._files or []:
            f.close()
        self._files = None
