"""Where documents come from: the built-in `stdlib` corpus, local files, or a Hugging Face dataset.

`open_source(spec)` resolves an `input=` value before anything is written, so a missing or
empty input fails first, with one line. A spec is one of:

- `stdlib`: the `.py` files of the running Python's standard library (site-packages excluded),
  sorted by relative path, one document each: real code, present on every machine.
- a file, a folder (searched recursively), a glob (`corpus/**/*.jsonl.zst`), or a comma list of
  any of these (entries in the order given, each folder's or glob's files sorted by path).
  Formats, by name: `.jsonl`/`.ndjson`/`.json` (JSON lines, or one JSON array of objects: the
  `text_key` field), `.parquet` (the `text_key` column), `.arrow` (Arrow IPC stream or file, as
  `datasets.save_to_disk` and the `datasets` cache write them), and text: `.txt`, `.md` and
  source files (`.py`, `.c`, `.rs`, …: one document per file, or per line / paragraph with
  `text_sample_by`). Stream formats (JSON and text) may be compressed: `.gz`, `.zst`, `.bz2`,
  `.xz`. A `datasets.save_to_disk` folder is an ordinary folder of `.arrow` files here (its
  `state.json`/`dataset_info.json` are metadata); a `DatasetDict` folder (`dataset_dict.json`)
  reads its `hub_split` subfolder.
- anything else shaped like `name` or `owner/name`: a Hugging Face dataset, loaded with
  `datasets.load_dataset` offline (HF_DATASETS_OFFLINE: from a local copy or the `datasets`
  cache; nothing is downloaded), or streamed from the hub with `hub_streaming=true`.

Not data. Inside a folder or glob, files that are not documents are skipped and reported in
one line (`Source.skipped`), never trained on: hidden files and folders (`.gitattributes`,
`.git/`, `.cache/`), licence files (`LICENSE`, `LICENSE-MIT`, `COPYING.txt`, `NOTICE`; never a
JSON, Parquet or Arrow file), the metadata of `datasets` (`dataset_info.json`, `state.json`,
`dataset_dict.json`, `dataset_infos.json`), and,
beside or above files of a structured format (JSON, Parquet, Arrow: in the same folder or one
it contains), the dataset card and its companions (`README*`, `CHANGELOG*`, `CITATION*`, …): a
folder of only `.md`/`.txt` files is text data, README.md included. A file of any other unknown
type is an error naming it, unless `skip_unknown=true` (then it is skipped and reported too).

Readers (data/readers.py, one per format). Files are read by moeforge, not through `datasets`
(as datatrove does: a reader per format over a plain file list; here json/gzip/bz2/lzma/
zstandard and pyarrow): that gives every
document a stable identity, (file number in the listing, row in the file), and lets a reader
start at a row and stop before another without parsing what it skips (JSON lines: the lines are
counted, not parsed; Parquet: whole row groups are skipped). data/prepare.py keys validation
selection and fill-in-the-middle on that identity, so they do not depend on how the input is
split across machines.

Split across machines (`Source.part(i, n)`). The anchors interleave: datatrove gives rank r of
w the files `list_files()[r::w]` of a sorted listing, and Megatron's `preprocess_data.py
--partitions` deals the input's lines round-robin into partition files before tokenizing them
(then `merge_datasets.py` / `merge_file_` concatenates the outputs). Both are deterministic, but
the concatenation of their parts is not the one-machine order. We keep their determinism and
their "cut inside a file too" (Megatron's partitions split one big file) but take contiguous
ranges: the files' bytes are laid end to end and cut at i·total/n; a cut inside a one-document
file moves to the nearer file edge, a cut inside a file of rows falls on the row at the same
fraction of its rows (rows counted only in the two files where this part's cuts fall; JSON lines
are counted, not parsed). So the parts are balanced by size, and part 0, 1, …, n−1 laid end to
end are exactly the whole input in its one-machine order — what lets data/merge.py produce the
same dataset as one preparation.

Each source has an `identity()` (what was read, with sizes) that goes into the manifest and
into the run id that decides whether an interrupted preparation may resume.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import sysconfig
from bisect import bisect_right
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import DataError
from .readers import (arrow_batches, as_utf8, check_text, json_lines, parquet_file, read_arrow, read_bytes, read_json,
                      read_parquet, read_text, read_whole, reason)

# Formats by extension (lower case). JSON and text are stream formats: they may be compressed.
_JSON_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
_TABLE_EXT = {".parquet": "parquet", ".arrow": "arrow"}
_TEXT_EXT = {".txt", ".text", ".md", ".markdown", ".rst"}
_SOURCE_EXT = {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".cuh", ".rs", ".go",
               ".java", ".kt", ".scala", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".sh", ".bash", ".rb", ".php",
               ".cs", ".swift", ".lua", ".sql", ".r", ".jl", ".hs", ".ml", ".pl", ".tex", ".html", ".css",
               ".yaml", ".yml", ".toml", ".zig", ".dart", ".m", ".f90", ".asm", ".s", ".proto"}
_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
STRUCTURED = {"jsonl", "json", "parquet", "arrow"}

_METADATA_NAMES = {"dataset_info.json", "state.json", "dataset_dict.json", "dataset_infos.json"}
_LICENCE_STEMS = ("license", "licence", "copying", "notice")
_CARD_STEMS = ("readme", "changelog", "citation", "contributing", "authors", "changes", "history")
HUB_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def file_format(path: str | Path) -> tuple[str, str] | None:
    """(format, compression) of a file by its name — format jsonl | json | parquet | arrow | text,
    compression "" | gzip | zstd | bz2 | xz — or None when it is not a data file type."""
    name = os.path.basename(str(path)).lower()
    comp = ""
    for ext, kind in _COMPRESSION.items():
        if name.endswith(ext):
            name, comp = name[: -len(ext)], kind
            break
    ext = os.path.splitext(name)[1]
    if ext in _JSON_EXT:
        return _JSON_EXT[ext], comp
    if ext in _TABLE_EXT:
        return (_TABLE_EXT[ext], comp) if not comp else None  # columnar files compress inside
    if ext in _TEXT_EXT or ext in _SOURCE_EXT:
        return "text", comp
    return None


def _not_data(rel: str, data_dirs: set[str], own: str | None = None) -> str | None:
    """Why the file at `rel` (relative, '/'-separated) is not data, or None when it may be.
    `data_dirs`: the folders (relative, '' for the root) holding structured files, and their parents.
    `own`: the file relative to the folder or glob it was listed under (hidden is judged there: an
    entry of a comma list under ~/.cache is not hidden because the entries' common root is ~)."""
    if any(p.startswith(".") for p in (own or rel).split("/")):
        return "hidden"
    name = rel.split("/")[-1].lower()
    if name in _METADATA_NAMES:
        return "datasets metadata"
    stem = name.split(".")[0]
    fmt = (file_format(name) or ("text",))[0]
    # LICENSE, LICENSE-MIT, COPYING.LESSER; not licensed_code.py, noticeboard.md or notices_2020.jsonl
    if fmt == "text" and re.split(r"[-_ ]", stem)[0].rstrip("s") in _LICENCE_STEMS:
        return "licence"
    folder = rel.rpartition("/")[0]
    if folder in data_dirs and stem.startswith(_CARD_STEMS) and fmt == "text":
        return "dataset card"
    return None


def _looks_local(spec: str) -> bool:
    """A spec that can only be meant as a path (so a missing one is an error, not a hub name)."""
    return (spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec
            or file_format(spec) is not None or any(c in spec for c in "*?[,"))


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


# ----------------------------------------------------------------------------- the source
@dataclass
class Source:
    """A resolved input. `documents()` yields the text of each document, in a fixed order;
    `records()` yields (file number, row, text): each document's identity with it."""

    spec: str
    kind: str  # stdlib | files | hub
    files: list = field(default_factory=list)  # Paths (str paths for stdlib: fewer objects to build)
    root: Path | None = None
    text_key: str = "text"
    text_sample_by: str = "document"
    hub_split: str = "train"
    hub_config: str = ""
    hub_streaming: bool = False
    skipped: list = field(default_factory=list)  # (relative name, reason) of files that are not data
    # This machine's share: ((file, row), (file, row)) — from (inclusive) to (exclusive) — of n parts.
    part_range: tuple | None = None
    part_of: tuple[int, int] | None = None  # (index, count)
    _hub = None  # the loaded `datasets.Dataset` (kind hub, not streaming)

    # -- identity
    def _rel(self, name: str) -> str:
        root = str(self.root)
        prefix = root.rstrip(os.sep) + os.sep
        # os.path.relpath, without its cost (~10 µs a file) for the usual case of a plain path under root
        rel = name[len(prefix):] if name.startswith(prefix) and len(prefix) > 1 else os.path.relpath(name, root)
        return rel.replace(os.sep, "/")

    def identity(self) -> dict:
        if self.kind == "hub":
            ident = {"kind": "hub", "name": self.spec, "config": self.hub_config, "split": self.hub_split,
                     "text_key": self.text_key, "streaming": self.hub_streaming}
            if self._hub is not None:
                ident.update(rows=len(self._hub), fingerprint=getattr(self._hub, "_fingerprint", None))
        else:
            h, total = hashlib.sha256(), 0
            for f in self.files:
                name = str(f)
                size = os.stat(name).st_size
                total += size
                h.update(f"{self._rel(name)}\0{size}\0".encode())
            ident = {"kind": self.kind, "path": str(self.root), "files": len(self.files), "bytes": total,
                     "listing_sha256": h.hexdigest()}
            if self.kind == "stdlib":
                ident["python"] = platform.python_version()
            else:
                ident.update(text_key=self.text_key, text_sample_by=self.text_sample_by)
                if self.skipped:
                    ident["skipped"] = len(self.skipped)
        if self.part_of is not None:
            (f0, r0), (f1, r1) = self.part_range
            ident["part"] = {"index": self.part_of[0], "count": self.part_of[1], "from": [f0, r0], "to": [f1, r1]}
        return ident

    def skipped_line(self, key: str = "input") -> str | None:
        """One line naming the files skipped as not data, or None."""
        if not self.skipped:
            return None
        shown = ", ".join(f"{rel} ({why})" for rel, why in self.skipped[:8])
        more = f", and {len(self.skipped) - 8} more" if len(self.skipped) > 8 else ""
        return f"{key}={self.spec}: skipped {len(self.skipped)} files that are not data: {shown}{more}"

    # -- reading
    def _single_document(self, k: int) -> bool:
        if self.kind == "stdlib":
            return True
        if self.kind == "hub":
            return False
        return file_format(self.files[k])[0] == "text" and self.text_sample_by == "document"

    def _segments(self) -> Iterator[tuple[int, int, int | None]]:
        """(file, first row, stop row or None) of what this source reads, in order."""
        n_files = 1 if self.kind == "hub" else len(self.files)
        if self.part_range is None:
            for k in range(n_files):
                yield k, 0, None
            return
        (f0, r0), (f1, r1) = self.part_range
        for k in range(f0, min(f1 + 1, n_files)):
            start = r0 if k == f0 else 0
            stop = r1 if k == f1 else None
            if stop is not None and stop <= start:
                continue
            yield k, start, stop

    def _read(self, k: int, start: int, stop: int | None) -> Iterator[tuple[int, str]]:
        if self.kind == "hub":
            yield from self._read_hub(start, stop)
            return
        path = str(self.files[k])
        fmt, comp = file_format(path)
        if fmt in ("jsonl", "json"):
            yield from read_json(path, comp, self.text_key, start, stop)
        elif fmt == "parquet":
            yield from read_parquet(path, self.text_key, start, stop)
        elif fmt == "arrow":
            yield from read_arrow(path, self.text_key, start, stop)
        else:
            yield from read_text(path, comp, self.text_sample_by, start, stop)

    def count_rows(self, k: int) -> int:
        """Documents in file k (what `_read(k, 0, None)` yields), read as cheaply as the format allows."""
        if self.kind == "hub":
            return len(self._hub)
        if self._single_document(k):
            return 1
        path = str(self.files[k])
        fmt, comp = file_format(path)
        if fmt == "parquet":
            return parquet_file(path, self.text_key).metadata.num_rows
        if fmt == "arrow":
            return sum(b.num_rows for b in arrow_batches(path, self.text_key))
        if fmt in ("jsonl", "json"):
            try:
                return sum(1 for _ in json_lines(path, comp))
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"{path}: unreadable ({reason(exc)})") from None
        return sum(1 for _ in read_text(path, comp, self.text_sample_by, 0, None))

    def records(self) -> Iterator[tuple[int, int, str]]:
        """(file number in the listing, row in the file, text) of each document, in order."""
        if self.kind == "stdlib":  # many small files: reader threads overlap the open/read syscalls
            ks = [k for k, _, _ in self._segments()]
            with ThreadPoolExecutor(4) as pool:
                for i in range(0, len(ks), 256):
                    block = ks[i:i + 256]
                    for k, raw in zip(block, pool.map(read_bytes, [self.files[k] for k in block])):
                        yield k, 0, raw.decode("utf-8", errors="replace")
        elif self.kind == "hub" and self.hub_streaming:
            for r, text in enumerate(self._stream_hub()):
                yield 0, r, text
        else:
            for k, start, stop in self._segments():
                for r, text in self._read(k, start, stop):
                    yield k, r, text

    def records_utf8(self) -> Iterator[tuple[int, int, bytes, int]]:
        """`records()` as (file, row, UTF-8 bytes, number of characters), for consumers of bytes
        (the byte tokenizer) that need no str.

        stdlib files are read in this thread, one after another (for files in the page cache
        that beats reader threads, which fight over the GIL), and a file's bytes are passed on
        as read when they are valid UTF-8 (the usual case), never decoded and re-encoded.
        """
        if self.kind == "stdlib":
            files = self.files
            for k, _, _ in self._segments():
                data, chars = as_utf8(read_whole(str(files[k])))
                yield k, 0, data, chars
        else:
            for k, r, text in self.records():
                yield k, r, text.encode("utf-8"), len(text)

    def documents(self) -> Iterator[str]:
        for _, _, text in self.records():
            yield text

    def documents_utf8(self) -> Iterator[tuple[bytes, int]]:
        """The documents of `documents()` as (UTF-8 bytes, number of characters)."""
        for _, _, data, chars in self.records_utf8():
            yield data, chars

    # -- Hugging Face datasets by name
    def _load_hub(self) -> None:
        import datasets

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(self.spec, self.hub_config or None, split=self.hub_split)
        except Exception as exc:  # not in the cache, unknown split, …
            raise DataError(f"input={self.spec}: cannot open offline (not a local folder and not in the Hugging Face "
                            f"datasets cache: {reason(exc)}); download it first, or set hub_streaming=true") from None
        if self.text_key not in ds.column_names:
            raise DataError(f"input={self.spec}: no field '{self.text_key}' (fields: "
                            f"{', '.join(ds.column_names) or 'none'}); set text_key=…")
        self._hub = ds

    def _read_hub(self, start: int, stop: int | None) -> Iterator[tuple[int, str]]:
        ds = self._hub.select_columns([self.text_key])
        stop = len(ds) if stop is None else min(stop, len(ds))
        for lo in range(start, stop, 4096):
            values = ds[lo:min(lo + 4096, stop)][self.text_key]
            for i, text in enumerate(values):
                yield lo + i, check_text(f"input={self.spec}", lo + i, text, self.text_key)

    def _stream_hub(self) -> Iterator[str]:
        where = f"input={self.spec}"
        try:
            import datasets
        except ImportError:
            raise DataError(f"{where}: streaming a dataset from the hub needs the `datasets` package") from None

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(self.spec, self.hub_config or None, split=self.hub_split, streaming=True)
        except Exception as exc:  # network, auth, unknown dataset: the user's to fix
            raise DataError(f"{where}: cannot open ({reason(exc)})") from None
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
            except Exception as exc:
                raise DataError(f"{where}: unreadable after {i} documents ({reason(exc)})") from None
            yield check_text(where, i, row.get(key), key)
            i += 1

    # -- split across machines
    def part(self, index: int, count: int, key: str = "input") -> "Source":
        """This source restricted to part `index` of `count` (see the module docstring)."""
        if count < 1:
            raise DataError(f"num_shards={count}: must be >= 1")
        if not 0 <= index < count:
            raise DataError(f"shard_index={index}: out of range for num_shards={count} (0…{count - 1})")
        if self.kind == "hub" and self.hub_streaming and count > 1:
            raise DataError(f"{key}={self.spec}: a streamed hub dataset cannot be split (num_shards={count}); "
                            "download it and drop hub_streaming")
        out = replace(self, part_range=(self._cut(index, count), self._cut(index + 1, count)), part_of=(index, count))
        out._hub = self._hub  # not a field: replace() does not carry it
        return out

    def _cut(self, t: int, count: int) -> tuple[int, int]:
        """The (file, row) where part t starts (t = count: the end)."""
        if self.kind == "hub":
            rows = len(self._hub)
            return (0, rows * t // count) if t < count else (1, 0)
        n = len(self.files)
        if t == 0:
            return 0, 0
        if t == count:
            return n, 0
        sizes = [os.stat(str(f)).st_size for f in self.files]
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        at = starts[-1] * t / count  # the cut, in bytes of the files laid end to end
        k = min(bisect_right(starts, at) - 1, n - 1)
        frac = (at - starts[k]) / sizes[k] if sizes[k] else 0.0
        if frac <= 0:
            return k, 0
        if self._single_document(k):
            return (k, 0) if frac < 0.5 else (k + 1, 0)
        rows = self.count_rows(k)
        r = int(rows * frac + 0.5)
        if r <= 0:
            return k, 0
        return (k, r) if r < rows else (k + 1, 0)


@contextlib.contextmanager
def _offline(where: str):
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE for the duration (the environment, and the flags that
    `datasets` and `huggingface_hub` read when imported), restored afterwards: a training process
    that prepares on demand keeps its network for everything else."""
    saved_env = {var: os.environ.get(var) for var in HUB_OFFLINE_ENV}
    for var in HUB_OFFLINE_ENV:
        os.environ[var] = "1"
    try:
        import datasets.config as dconfig
        import huggingface_hub.constants as hconst
    except ImportError:
        raise DataError(f"{where}: loading a dataset by name needs the `datasets` package") from None
    flags = [(m, name) for m, names in ((dconfig, ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")),
                                       (hconst, ("HF_HUB_OFFLINE",))) for name in names if hasattr(m, name)]
    saved = [getattr(m, name) for m, name in flags]
    for m, name in flags:
        setattr(m, name, True)
    try:
        yield
    finally:
        for (m, name), value in zip(flags, saved):
            setattr(m, name, value)
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _list_folder(root: Path, key: str, spec: str, hub_split: str) -> list[Path]:
    """Every file under `root`, sorted by relative path; hidden folders are not entered (they are
    reported as one skipped entry each). Symlinked folders are entered (a corpus assembled from
    links is data), each real folder once (a link back up, or a second link to it, adds nothing)."""
    if (root / "dataset_dict.json").is_file():  # a DatasetDict saved to disk: one split of it
        try:
            splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        except (ValueError, AttributeError):  # not JSON, or not an object
            splits = []
        splits = [str(s) for s in splits] if isinstance(splits, list) else []
        if hub_split not in splits or not (root / hub_split).is_dir():
            raise DataError(f"{key}={spec}: a saved DatasetDict without split '{hub_split}' "
                            f"(has: {', '.join(splits) or 'none'}); set hub_split=…")
        return _list_folder(root / hub_split, key, spec, hub_split)

    def unreadable(exc: OSError):  # os.walk's default skips a folder it cannot list, and its files with it
        raise DataError(f"{key}={spec}: {exc.filename}: cannot list ({exc.strerror or exc})")

    found = []
    entered = {os.path.realpath(root)}
    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        hidden = [d for d in dirs if d.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        real = [os.path.realpath(os.path.join(folder, d)) for d in dirs]
        dirs[:] = [d for d, r in zip(dirs, real) if r not in entered and not entered.add(r)]
        found.extend(Path(folder, d) for d in hidden)  # reported, not entered
        found.extend(Path(folder, f) for f in files)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _resolved(path: Path) -> Path:
    """A folder resolved; a file's folder resolved and its own name kept: a file that links to a
    blob (the Hugging Face hub cache: data/train.parquet -> ../../blobs/<sha>) keeps the name
    its format is read from."""
    if path.is_dir():
        return path.resolve()
    return path.absolute().parent.resolve() / path.name


def _expand(spec: str, key: str, hub_split: str) -> list[tuple[Path, Path]] | None:
    """(file, root it is listed under) for each file named by a local spec, or None when `spec`
    names nothing local."""
    entries = [s.strip() for s in spec.split(",")] if "," in spec and not os.path.exists(spec) else [spec]
    out = []
    for entry in entries:
        if not entry:
            raise DataError(f"{key}={spec}: an empty entry in the comma list")
        path = Path(entry).expanduser()
        if any(c in entry for c in "*?[") and not path.exists():
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise DataError(f"{key}={entry}: the pattern matches nothing")
            for m in matches:
                p = _resolved(Path(m))
                if p.is_dir():
                    out.extend((f, p) for f in _list_folder(p, key, spec, hub_split))
                else:
                    out.append((p, p.parent))
            continue
        if not path.exists():
            if len(entries) == 1 and not _looks_local(entry):
                return None
            raise DataError(f"{key}={entry}: no such file or folder")
        p = _resolved(path)
        if p.is_dir():
            out.extend((f, p) for f in _list_folder(p, key, spec, hub_split))
        else:
            out.append((p, p.parent))
    return out


def open_source(spec: str, *, key: str = "input", text_key: str = "text", text_sample_by: str = "document",
                hub_split: str = "train", hub_config: str = "", hub_streaming: bool = False,
                skip_unknown: bool = False) -> Source:
    """Resolve `input=` (or `val_input=`): DataError naming the value when missing or empty."""
    if not spec:
        raise DataError(f"{key}: required (a file, a folder, a glob, a comma list, 'stdlib', or a dataset name)")
    if text_sample_by not in ("line", "paragraph", "document"):
        raise DataError(f"text_sample_by={text_sample_by!r}: must be line, paragraph or document")
    common = dict(text_key=text_key, text_sample_by=text_sample_by, hub_split=hub_split, hub_config=hub_config,
                  hub_streaming=hub_streaming)
    if spec == "stdlib":
        files = _stdlib_names()  # str paths: Source uses them as names only
        if not files:
            raise DataError(f"{key}=stdlib: no .py files under {sysconfig.get_paths()['stdlib']}")
        return Source(spec, "stdlib", files, Path(sysconfig.get_paths()["stdlib"]), **common)
    listed = _expand(spec, key, hub_split)
    if listed is None:  # a dataset name: offline, from a local copy or the datasets cache
        src = Source(spec, "hub", **common)
        if not hub_streaming:
            with _offline(f"{key}={spec}"):
                src._load_hub()
        return src
    single = "," not in spec and Path(spec).expanduser().is_file()  # one file, named: read as given
    seen, files, skipped = set(), [], []
    roots = sorted({str(r) for _, r in listed})
    root = Path(os.path.commonpath(roots)) if roots else Path(".")
    data_dirs: set[str] = set()  # folders holding structured data files, and every folder above them
    for f, r in listed:  # (not hidden or metadata ones: a .markdownlint.json does not make README.md a card)
        rel = os.path.relpath(f, root).replace(os.sep, "/")
        if (file_format(f) or ("",))[0] in STRUCTURED and not _not_data(rel, set(), os.path.relpath(f, r)):
            folder = rel.rpartition("/")[0]
            while folder not in data_dirs:
                data_dirs.add(folder)
                if not folder:
                    break
                folder = folder.rpartition("/")[0]
    for f, r in listed:
        if f in seen:
            continue
        seen.add(f)
        rel = os.path.relpath(f, root).replace(os.sep, "/")
        why = None if single else _not_data(rel, data_dirs, os.path.relpath(f, r).replace(os.sep, "/"))
        if why is None and f.is_dir():
            why = "hidden"
        if why is None and file_format(f) is None:
            if not skip_unknown:
                raise DataError(f"{key}={spec}: {f}: unknown file type (data: .jsonl, .json, .parquet, .arrow, "
                                ".txt, .md, source files; .gz/.zst/.bz2/.xz for JSON and text); "
                                "set skip_unknown=true to skip such files")
            why = "unknown type"
        if why:
            skipped.append((rel + ("/" if f.is_dir() else ""), why))
        else:
            files.append(f)
    if not files:
        what = "empty file" if single else "empty (no data files: .jsonl, .json, .parquet, .arrow, .txt, .md, …)"
        raise DataError(f"{key}={spec}: {what}")
    if single and files[0].stat().st_size == 0:
        raise DataError(f"{key}={spec}: empty file")
    return Source(spec, "files", files, root, skipped=skipped, **common)
