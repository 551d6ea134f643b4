"""Per-format document readers for data/corpus.py: JSON lines and JSON arrays, text (whole file,
line or paragraph), Parquet and Arrow, and the compressed streams (.gz, .zst, .bz2, .xz).

Each `read_*` yields (row, text) for rows [start, stop) of one file, so a reader can start at a
row and stop before another without parsing what it skips (JSON lines are counted, not parsed;
Parquet skips whole row groups): the (file, row) identity data/corpus.py gives every document
comes from here. Errors are `DataError`s naming the file and the row.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError


def as_utf8(raw: bytes) -> tuple[bytes, int]:
    """(bytes, characters) of `raw.decode("utf-8", errors="replace")` re-encoded, without the
    round trip when `raw` is already valid UTF-8 (then it is `raw` itself)."""
    if raw.isascii():
        return raw, len(raw)
    try:
        return raw, len(raw.decode("utf-8"))
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text.encode("utf-8"), len(text)


def read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_whole(name: str) -> bytes:
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


class _ZstdReader(io.RawIOBase):
    """A .zst file's decompressed bytes, every frame (files written by `zstd -T`, or concatenated,
    hold several), and an error on a frame cut short — zstandard's `stream_reader` ends quietly
    there, which would train on a truncated file without a word."""

    def __init__(self, path: str):
        import zstandard

        self._zstd = zstandard.ZstdDecompressor()
        self._obj = self._zstd.decompressobj()
        self._file = open(path, "rb")
        self._buf = b""
        self._pos = 0
        self._in_frame = False  # bytes of a frame fed and the frame not complete
        self._done = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self._buf and not self._done:
            data = self._file.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd stream ends inside a frame (truncated file)")
                self._done = True
                return
            out = []
            while data:
                out.append(self._obj.decompress(data))
                self._in_frame = True
                if self._obj.eof:  # a frame ended: what follows starts the next one
                    data = self._obj.unused_data
                    self._obj = self._zstd.decompressobj()
                    self._in_frame = False
                else:
                    data = b""
            self._buf = b"".join(out)

    def readinto(self, b) -> int:
        if self._pos == len(self._buf):
            self._buf, self._pos = b"", 0
            self._fill()
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = memoryview(self._buf)[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def open_stream(path: str, comp: str):
    """A binary file object over the decompressed bytes."""
    if comp == "gzip":
        return gzip.open(path, "rb")
    if comp == "bz2":
        return bz2.open(path, "rb")
    if comp == "xz":
        return lzma.open(path, "rb")
    if comp == "zstd":
        try:
            import zstandard  # noqa: F401  (used by _ZstdReader)
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the `zstandard` package (pip install zstandard)") from None
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    return open(path, "rb")


def reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- per-format readers
# Each yields (row, text) for rows [start, stop) of one file (stop None: to the end); rows are
# counted from 0 in the file. `count_rows` agrees with them.
def check_text(where: str, row: int, text, key: str) -> str:
    if isinstance(text, str):
        return text
    what = "has no" if text is None else f"has a non-text ({type(text).__name__})"
    raise DataError(f"{where}: document {row} {what} '{key}' field")


def json_lines(path: str, comp: str) -> Iterator[bytes]:
    """The non-blank lines of a JSON-lines file (a JSON array file: its elements, re-encoded)."""
    with open_stream(path, comp) as f:
        first = f.peek(64)[:64] if hasattr(f, "peek") else b""
        if first.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"[":  # a UTF-8 byte-order mark may lead
            try:
                rows = json.loads(f.read())
            except ValueError as exc:
                raise DataError(f"{path}: unreadable after 0 documents ({reason(exc)})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: not a JSON array of objects")
            for row in rows:
                yield row  # already parsed (a dict), see read_json
            return
        for line in f:
            if line.strip():
                yield line


def read_json(path: str, comp: str, key: str, start: int, stop: int | None) -> Iterator[tuple[int, str]]:
    row = 0
    try:
        for line in json_lines(path, comp):
            if stop is not None and row >= stop:
                return
            if row >= start:
                if isinstance(line, bytes):
                    try:
                        obj = json.loads(line)
                    except ValueError as exc:
                        raise DataError(f"{path}: unreadable after {row} documents ({reason(exc)})") from None
                else:
                    obj = line
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: document {row} is not a JSON object")
                yield row, check_text(path, row, obj.get(key), key)
            row += 1
    except (OSError, EOFError, lzma.LZMAError) as exc:  # a damaged compressed stream
        raise DataError(f"{path}: unreadable after {row} documents ({reason(exc)})") from None
    except Exception as exc:  # zstandard.ZstdError and friends
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: unreadable after {row} documents ({reason(exc)})") from None


def _text_pieces(raw: bytes, sample_by: str) -> list[str]:
    text = raw.decode("utf-8", errors="replace")
    if sample_by == "document":
        return [text]
    if sample_by == "line":
        return [line for line in text.splitlines() if line.strip()]
    return [p.strip("\r\n") for p in re.split(r"\n[ \t\r]*\n", text) if p.strip()]  # \r: CRLF files too


def read_text(path: str, comp: str, sample_by: str, start: int, stop: int | None) -> Iterator[tuple[int, str]]:
    try:
        with open_stream(path, comp) as f:
            raw = f.read()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: unreadable ({reason(exc)})") from None
    pieces = _text_pieces(raw, sample_by)
    for row in range(start, len(pieces) if stop is None else min(stop, len(pieces))):
        yield row, pieces[row]


def parquet_file(path: str, key: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot open ({reason(exc)})") from None
    names = pf.schema_arrow.names
    if key not in names:
        raise DataError(f"{path}: no field '{key}' (fields: {', '.join(names) or 'none'}); set text_key=…")
    return pf


def read_parquet(path: str, key: str, start: int, stop: int | None) -> Iterator[tuple[int, str]]:
    pf = parquet_file(path, key)
    md = pf.metadata
    base = 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        lo, hi = max(start - base, 0), n if stop is None else min(stop - base, n)
        if lo < hi:
            try:
                values = pf.read_row_group(g, columns=[key]).column(0).slice(lo, hi - lo).to_pylist()
            except Exception as exc:
                raise DataError(f"{path}: unreadable after {base + lo} documents ({reason(exc)})") from None
            for i, text in enumerate(values):
                yield base + lo + i, check_text(path, base + lo + i, text, key)
        base += n
        if stop is not None and base >= stop:
            return


def arrow_batches(path: str, key: str) -> Iterator:
    import pyarrow as pa

    try:
        source = pa.memory_map(path, "r")
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
            schema = reader.schema
        except pa.ArrowInvalid:
            source = pa.memory_map(path, "r")
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = reader.schema
    except Exception as exc:
        raise DataError(f"{path}: cannot open as Arrow ({reason(exc)})") from None
    if key not in schema.names:
        raise DataError(f"{path}: no field '{key}' (fields: {', '.join(schema.names) or 'none'}); set text_key=…")
    rows = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # a file cut short or damaged after its schema
            raise DataError(f"{path}: unreadable after {rows} documents ({reason(exc)})") from None
        rows += batch.num_rows
        yield batch


def read_arrow(path: str, key: str, start: int, stop: int | None) -> Iterator[tuple[int, str]]:
    base = 0
    for batch in arrow_batches(path, key):
        n = batch.num_rows
        lo, hi = max(start - base, 0), n if stop is None else min(stop - base, n)
        if lo < hi:
            values = batch.column(batch.schema.get_field_index(key)).slice(lo, hi - lo).to_pylist()
            for i, text in enumerate(values):
                yield base + lo + i, check_text(path, base + lo + i, text, key)
        base += n
        if stop is not None and base >= stop:
            return
