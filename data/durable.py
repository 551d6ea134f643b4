"""Durable writes: a reader, or a restart after a crash or power loss, sees a file (or folder) whole.

The guarantee: a path written here holds either its old contents or the new ones, never half
of the new. The recipe, the same everywhere: write the data under a temporary name, flush and
fsync it, rename it over the final name (atomic within a filesystem), then fsync the directory
so that the rename itself survives a power loss. A temporary left by a crash is never mistaken
for a finished file: its name says what it is, and its owner removes or resumes it.

Users: data/shards.py and data/shard_writer.py (dataset shards and manifest), train/checkpoint_dir.py
(the `latest` pointer and checkpoint files), parallel/state.py (per-rank tensor files) and
model/hf.py (a Hugging Face folder, committed by renaming a temporary folder). Standard library
only, so every package can import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


def sync_file(f) -> None:
    """Flush an open binary file's buffers and fsync it (its bytes are on disk when this returns)."""
    f.flush()
    os.fsync(f.fileno())


def fsync_path(path: str | os.PathLike, *, best_effort: bool = False) -> None:
    """fsync a file or a directory (a directory: so that a rename or a new file inside it survives).

    `best_effort=True` ignores an OSError (a platform or filesystem that cannot open or fsync a
    directory); the default raises it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)


def write_file_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` in place and fsync it. Not atomic by itself: for a file inside a
    temporary folder that is committed later by a rename (`fsync_path` the folder before that)."""
    with open(path, "wb") as f:
        f.write(data)
        sync_file(f)


def write_bytes_durable(path: str | os.PathLike, data: bytes, *, tmp: str | os.PathLike | None = None,
                        best_effort: bool = False) -> None:
    """Replace `path` with `data` atomically and durably: write `tmp` (default `<name>.tmp` next to
    it), fsync, rename over `path`, fsync the directory (`best_effort` as in `fsync_path`)."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    write_file_synced(tmp, data)
    os.replace(tmp, path)
    fsync_path(path.parent, best_effort=best_effort)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root`, and `root` itself (deepest first)."""
    for here, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(here, name))
        fsync_path(here)


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike, aside: str | os.PathLike | None) -> None:
    """Rename the finished folder `tmp` to `target` and fsync their parent.

    An existing `target` is first renamed to `aside` (a free path on the same filesystem),
    renamed back if the rename of `tmp` fails, and deleted once `tmp` is in place: a crash
    leaves the old folder (at `target` or at `aside`) or the new one, never a mix. `aside` may be
    None when `target` does not exist.
    """
    tmp, target = Path(tmp), Path(target)
    if not target.exists():
        os.rename(tmp, target)
        fsync_path(target.parent)
        return
    if aside is None:
        raise FileExistsError(f"{target}: exists and no path to move it aside was given")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    fsync_path(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def durable_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A new temporary folder next to `target` (`.<name>.<random>.tmp`) for the caller to fill.

    On a clean exit everything in it is fsynced and it replaces `target` (`replace_dir`; the
    old folder waits in `.<name>.<random>.old/` meanwhile); on an error it is deleted and
    `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)) \
            if target.exists() else None
        try:
            replace_dir(tmp, target, aside=old / "x" if old else None)
        finally:
            if old:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class StreamWriter:
    """Write one file as a stream of byte chunks, hashing them (SHA-256) as they go, then fsync.

    Large checkpoint files go through here (parallel/state.py `write_rank_file`). The bytes are
    copied into a page-aligned staging buffer and written with O_DIRECT where the filesystem
    allows it, as DeepSpeed's FastPersist writes checkpoints: no page-cache copy of the data,
    which on this project's VM costs more than the disk (bench/checkpoint.py, bench/RESULTS.md).
    Where O_DIRECT is refused (tmpfs, some network filesystems) the same buffer is written
    through the page cache. Bytes are hashed when they are written out, a whole staging buffer
    (or an aligned piece written straight from its memory) at a time, on a helper thread while
    this thread writes them (hashlib and os.write both release the GIL): a file of many small
    tensors costs the larger of the hash and the write, not their sum. `hash_thread=False`
    hashes on the calling thread instead, for a writer beside training that should take at most
    one core (the asynchronous checkpoint's writer process).
    """

    CHUNK = 1 << 24  # staging buffer and write size (a multiple of any block size O_DIRECT asks)
    ALIGN = 4096
    THREADED = 1 << 20  # pieces at least this large are written straight from aligned memory

    def __init__(self, path: str | os.PathLike, hash_thread: bool = True):
        import hashlib
        from concurrent.futures import ThreadPoolExecutor

        self.path = os.fspath(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(self.path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError:
            self.direct = False
            self.fd = os.open(self.path, flags, 0o644)
        self.buf = _staging_take(self.CHUNK)
        self._buf_addr = _address(self.buf)
        self.fill = self.size = 0
        self.digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="stream-hash") if hash_thread else None

    def write(self, data) -> None:
        """Stage and write `data` (bytes-like); what is staged is written (and hashed) when the
        staging buffer is full, and by `close`."""
        view = memoryview(data).cast("B")
        self.size += len(view)
        src = _address(view) if len(view) >= self.THREADED else None
        done = 0
        if src is not None and self.fill == 0 and src % self.ALIGN == 0:
            # Aligned memory at an aligned file offset (an asynchronous save's file image,
            # parallel/snapshot.py RankImage): written straight from it, no staging copy.
            done = len(view) - len(view) % self.ALIGN
            self._write_out(view[:done], done)
        while done < len(view):
            n = min(len(view) - done, self.CHUNK - self.fill)
            if src is None:
                self.buf[self.fill:self.fill + n] = view[done:done + n]
            else:  # ctypes.memmove releases the GIL: a slice assignment holds it for the whole copy
                ctypes.memmove(self._buf_addr + self.fill, src + done, n)
            self.fill += n
            done += n
            if self.fill == self.CHUNK:
                self._flush(self.CHUNK, self.CHUNK)

    def _flush(self, n: int, data: int) -> None:
        """Write the first `n` staged bytes, of which the first `data` are the file's (the rest: padding)."""
        out = memoryview(self.buf)[:n]
        try:
            self._write_out(out, data)
        finally:
            out.release()
        self.fill = 0

    def _write_out(self, out: memoryview, data: int) -> None:
        """Write `out`, hashing its first `data` bytes meanwhile."""
        hashed = None
        if self._hasher is None:
            self.digest.update(out[:data])
        else:
            hashed = self._hasher.submit(self.digest.update, out[:data])
        try:
            done = 0
            while done < len(out):
                try:
                    done += os.write(self.fd, out[done:done + self.CHUNK])
                except OSError:
                    if not self.direct:
                        raise
                    self._buffered()  # the filesystem took the open but refuses direct writes
        finally:
            if hashed is not None:
                hashed.result()

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def flush_partial(self) -> None:
        """Push what is staged to the file (fault injection: a process killed mid-write leaves
        the bytes so far on disk); with O_DIRECT only whole blocks, the rest stays staged."""
        n = self.fill - (self.fill % self.ALIGN if self.direct else 0)
        if n:
            tail = bytes(self.buf[n:self.fill])
            self._flush(n, n)
            self.buf[:len(tail)] = tail
            self.fill = len(tail)

    def close(self) -> dict:
        """Write the rest, fsync, close; returns {"size", "sha256"} of the whole file."""
        try:
            if self.fill:
                n = self.fill
                if self.direct:  # the last write is padded to the block size, the file cut back after
                    padded = -(-n // self.ALIGN) * self.ALIGN
                    self.buf[n:padded] = bytes(padded - n)
                    self._flush(padded, n)
                else:
                    self._flush(n, n)
            if self.direct:
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            if self._hasher is not None:
                self._hasher.shutdown()
            _staging_give(self.buf)
        return {"size": self.size, "sha256": self.digest.hexdigest()}


def _address(buf) -> int | None:
    """The address of a writable buffer's first byte (None for a read-only one, e.g. bytes)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except TypeError:
        return None


# Staging buffers are reused from file to file: a fresh mapping is first-touch page faults
# on every write (on this project's VM they cost as much as the disk write of a small file).
_STAGING: list = []
_STAGING_LOCK = threading.Lock()


def _staging_take(size: int):
    import mmap

    with _STAGING_LOCK:
        for i, buf in enumerate(_STAGING):
            if len(buf) == size:
                return _STAGING.pop(i)
    return mmap.mmap(-1, size)  # anonymous mappings are page-aligned, as O_DIRECT needs


def _staging_give(buf) -> None:
    with _STAGING_LOCK:
        if len(_STAGING) < 2:
            _STAGING.append(buf)
            return
    buf.close()
