"""Where documents come from: the built-in `stdlib` corpus, local files, or a Hugging Face hub dataset.

`open_source(spec)` resolves an `input=` value before anything is written, so a missing or
empty input fails first, with one line:

- `stdlib`: the `.py` files of the running Python's standard library (site-packages excluded),
  sorted by relative path, one document each: real code, present on every machine.
- a local file or folder of `.json`/`.jsonl` (optionally `.gz`), `.parquet`, `.txt`/`.text`/`.md`:
  read through Hugging Face `datasets` in streaming mode (nothing goes to its Arrow cache),
  files in sorted order, one stream per file so an error names the file. Text files are one
  document per file by default (`text_sample_by=line|paragraph|document`).
- anything else shaped like `name` or `owner/name`: a hub dataset, streamed (needs the network).

Each source has an `identity()` (what was read, with sizes) that goes into the manifest and
into the run id that decides whether an interrupted preparation may resume.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

BUILDERS = {".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
            ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}


def _builder(path: Path) -> str | None:
    name = path.name.lower()
    for ext in sorted(BUILDERS, key=len, reverse=True):
        if name.endswith(ext):
            return BUILDERS[ext]
    return None


def _looks_local(spec: str) -> bool:
    """A spec that can only be meant as a path (so a missing one is an error, not a hub name)."""
    return (spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec
            or _builder(Path(spec)) is not None)


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by relative path (installed packages pruned)."""
    return [Path(name) for name in _stdlib_names()]


def _stdlib_names() -> list[str]:
    """`stdlib_files()` as strings (str(path) of each), without building 1,800 Path objects."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        found.extend((f if rel == "." else f"{rel}/{f}") for f in files if f.endswith(".py"))
    base = str(Path(root))  # what str(Path(root, rel)) starts with
    sep = "" if base.endswith(os.sep) else os.sep
    return [f"{base}{sep}{rel}".replace("/", os.sep) for rel in sorted(found)]


def _as_utf8(raw: bytes) -> tuple[bytes, int]:
    """(bytes, characters) of `raw.decode("utf-8", errors="replace")` re-encoded, without the
    round trip when `raw` is already valid UTF-8 (then it is `raw` itself)."""
    if raw.isascii():
        return raw, len(raw)
    try:
        return raw, len(raw.decode("utf-8"))
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text.encode("utf-8"), len(text)


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_whole(name: str) -> bytes:
    """A file's bytes through os.open/os.read: one read of the size fstat gives (the buffered
    file object costs more than the read for a small file)."""
    fd = os.open(name, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) != size:  # grew, shrank, or a short read: read to the end
            parts = [data]
            while more := os.read(fd, 1 << 20):
                parts.append(more)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


@dataclass
class Source:
    """A resolved input. `documents()` yields the text of each document, in a fixed order."""

    spec: str
    kind: str  # stdlib | files | hub
    files: list[Path] = field(default_factory=list)  # (str paths for stdlib: fewer objects to build)
    root: Path | None = None
    text_key: str = "text"
    text_sample_by: str = "document"
    hub_split: str = "train"
    hub_config: str = ""

    def identity(self) -> dict:
        if self.kind == "hub":
            return {"kind": "hub", "name": self.spec, "config": self.hub_config, "split": self.hub_split,
                    "text_key": self.text_key}
        h, total, root = hashlib.sha256(), 0, str(self.root)
        prefix = root.rstrip(os.sep) + os.sep
        for f in self.files:
            name = str(f)
            size = os.stat(name).st_size
            total += size
            # os.path.relpath, without its cost (~10 µs a file) for the usual case of a plain path under root
            rel = name[len(prefix):] if name.startswith(prefix) and len(prefix) > 1 else os.path.relpath(name, root)
            h.update(f"{rel}\0{size}\0".encode())
        ident = {"kind": self.kind, "path": root, "files": len(self.files), "bytes": total,
                 "listing_sha256": h.hexdigest()}
        if self.kind == "stdlib":
            ident["python"] = platform.python_version()
        else:
            ident.update(text_key=self.text_key, text_sample_by=self.text_sample_by)
        return ident

    def documents(self) -> Iterator[str]:
        if self.kind == "stdlib":  # many small files: reader threads overlap the open/read syscalls
            with ThreadPoolExecutor(4) as pool:
                for i in range(0, len(self.files), 256):
                    for raw in pool.map(_read_bytes, self.files[i:i + 256]):
                        yield raw.decode("utf-8", errors="replace")
        elif self.kind == "files":
            for f in self.files:
                yield from self._stream(f)
        else:
            yield from self._stream(None)

    def documents_utf8(self) -> Iterator[tuple[bytes, int]]:
        """The documents of `documents()` as (UTF-8 bytes, number of characters): `text.encode()`
        and `len(text)`, for consumers of bytes (the byte tokenizer) that need no str.

        stdlib files are read in this thread, one after another (for files in the page cache
        that beats reader threads, which fight over the GIL), and a file's bytes are passed on
        as read when they are valid UTF-8 (the usual case), never decoded and re-encoded.
        """
        if self.kind == "stdlib":
            for name in map(str, self.files):
                yield _as_utf8(_read_whole(name))
        else:
            for text in self.documents():
                yield text.encode("utf-8"), len(text)

    def _stream(self, file: Path | None) -> Iterator[str]:
        where = str(file) if file is not None else f"input={self.spec}"
        # Imported here, not at the top: the stdlib corpus and prepared shards need no `datasets`,
        # and a GPU image without it must still prepare the smoke corpus and train.
        try:
            import datasets
        except ImportError:
            raise DataError(f"{where}: reading files and hub datasets needs the `datasets` package "
                            "(pip install datasets); input=stdlib does not") from None

        datasets.disable_progress_bars()
        try:
            if file is None:
                ds = datasets.load_dataset(self.spec, self.hub_config or None, split=self.hub_split, streaming=True)
            else:
                builder = _builder(file)
                extra = {"sample_by": self.text_sample_by} if builder == "text" else {}
                ds = datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=True, **extra)
        except Exception as exc:  # network, auth, unknown dataset, unreadable file: the user's to fix
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{where}: cannot open ({reason})") from None
        key = self.text_key
        features = getattr(ds, "features", None)
        if features is not None and key not in features:
            raise DataError(f"{where}: no field '{key}' (fields: {', '.join(features) or 'none'}); set text_key=…")
        rows = iter(ds)
        i = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as exc:  # malformed JSON/parquet inside the file
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DataError(f"{where}: unreadable after {i} documents ({reason})") from None
            text = row.get(key)
            if not isinstance(text, str):
                what = "has no" if text is None else f"has a non-text ({type(text).__name__})"
                raise DataError(f"{where}: document {i} {what} '{key}' field")
            i += 1
            yield text


def open_source(spec: str, *, key: str = "input", text_key: str = "text", text_sample_by: str = "document",
                hub_split: str = "train", hub_config: str = "") -> Source:
    """Resolve `input=` (or `val_input=`): DataError naming the value when missing or empty."""
    if not spec:
        raise DataError(f"{key}: required (a file, a folder, 'stdlib', or a hub dataset name)")
    if text_sample_by not in ("line", "paragraph", "document"):
        raise DataError(f"text_sample_by={text_sample_by!r}: must be line, paragraph or document")
    common = dict(text_key=text_key, text_sample_by=text_sample_by, hub_split=hub_split, hub_config=hub_config)
    if spec == "stdlib":
        files = _stdlib_names()  # str paths: Source uses them as names only
        if not files:
            raise DataError(f"{key}=stdlib: no .py files under {sysconfig.get_paths()['stdlib']}")
        return Source(spec, "stdlib", files, Path(sysconfig.get_paths()["stdlib"]), **common)
    path = Path(spec).expanduser()
    if path.exists():
        root = path.resolve()
        if root.is_dir():
            files = sorted((p for p in root.rglob("*") if p.is_file() and _builder(p)),
                           key=lambda p: p.relative_to(root).as_posix())
            if not files:
                raise DataError(f"{key}={spec}: empty (no .json, .jsonl, .parquet or .txt files in this folder)")
            return Source(spec, "files", files, root, **common)
        if _builder(root) is None:
            raise DataError(f"{key}={spec}: unsupported file type (use .json, .jsonl, .parquet or .txt)")
        if root.stat().st_size == 0:
            raise DataError(f"{key}={spec}: empty file")
        return Source(spec, "files", [root], root.parent, **common)
    if _looks_local(spec):
        raise DataError(f"{key}={spec}: no such file or folder")
    return Source(spec, "hub", **common)
