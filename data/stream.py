"""One split of a prepared dataset as a single memory-mapped token stream.

Shards are opened with `np.memmap` (read-only) and never read whole: a window is a slice
that copies (and widens to int64) only the tokens asked for. Global token offsets map to
(shard, offset) by bisecting the shards' start offsets; a window that crosses a shard
boundary is read in two pieces. Document starts come from the shards' `.idx` files, also
memory-mapped and binary-searched, so document-aware batches cost O(log documents) per row.
"""

from __future__ import annotations

from bisect import bisect_right
from pathlib import Path

import numpy as np

from .errors import DataError
from .shards import INDEX_DTYPE, check_sizes, read_manifest, split_entry


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:  # np.memmap refuses empty files
        return np.empty(0, dtype=dtype)
    # A plain ndarray view of the map: slicing np.memmap itself runs Python (__array_finalize__)
    # on every slice, which costs more than copying a 4096-token window. The view keeps the map alive.
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)).view(np.ndarray)


class TokenStream:
    """The tokens of `split` as one stream, [0, total)."""

    def __init__(self, path, split: str = "train"):
        self.manifest = m = read_manifest(path)
        entry = split_entry(m, split)
        check_sizes(m, split)  # a truncated shard fails here, before any read
        self.split = split
        self.root = Path(m["_path"]).parent
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        self.eos_id = int(m["eos_id"])
        self.fingerprint = entry["fingerprint"]
        self.documents = int(entry["documents"])
        self.shards = [_map(self.root / s["data"]["file"], self.dtype, s["tokens"]) for s in entry["shards"]]
        self.doc_offsets = [_map(self.root / s["index"]["file"], INDEX_DTYPE, s["documents"]) for s in entry["shards"]]
        self.starts = [0]
        for s in self.shards:
            self.starts.append(self.starts[-1] + len(s))
        self.total = self.starts[-1]
        if self.total != entry["tokens"]:
            raise DataError(f"{m['_path']}: split '{split}' lists {entry['tokens']} tokens, "
                            f"its shards hold {self.total}")

    def read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` (any integer dtype) with tokens [start, start + len(out))."""
        n = len(out)
        k = bisect_right(self.starts, start) - 1
        done = 0
        while done < n:
            local = start + done - self.starts[k]
            take = min(n - done, len(self.shards[k]) - local)
            out[done:done + take] = self.shards[k][local:local + take]
            done += take
            k += 1

    def read_pair(self, start: int, n: int, x: np.ndarray, y: np.ndarray) -> None:
        """x ← tokens [start, start+n), y ← tokens [start+1, start+n+1): inputs and next-token labels."""
        k = bisect_right(self.starts, start) - 1
        local = start - self.starts[k]
        shard = self.shards[k]
        if local + n + 1 <= len(shard):  # the common case: one shard, two direct slices
            x[:] = shard[local:local + n]
            y[:] = shard[local + 1:local + n + 1]
            return
        buf = np.empty(n + 1, dtype=np.int64)
        self.read(start, buf)
        x[:] = buf[:n]
        y[:] = buf[1:]

    def doc_starts(self, lo: int, hi: int) -> np.ndarray:
        """Global offsets of the documents that start in [lo, hi)."""
        found = []
        k = bisect_right(self.starts, lo) - 1
        while k < len(self.shards) and self.starts[k] < hi:
            base = self.starts[k]
            offs = self.doc_offsets[k]
            a, b = np.searchsorted(offs, np.array([max(lo - base, 0), hi - base], dtype=INDEX_DTYPE))
            if b > a:
                found.append(offs[a:b].astype(np.int64) + base)
            k += 1
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)
