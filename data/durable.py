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
import os
import shutil
import tempfile
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
