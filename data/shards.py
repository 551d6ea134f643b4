"""The on-disk format of a prepared dataset, its manifest, and `verify` (the writer: data/shard_writer.py).

Layout of a `data.prepare` output folder::

    manifest.json            written last: its presence means the dataset is complete
    train/00000.bin          token ids, little-endian `dtype`, no header (np.memmap-able as is)
    train/00000.idx          uint64 little-endian: offsets, within this shard, of the documents
                             that start in it (sorted)
    train/00001.bin …
    val/00000.bin …          the validation split, same format

A split is one token stream: the concatenation of its `.bin` files in order. Every shard holds
exactly `shard_tokens` tokens except the last of a split (in a merged dataset, data/merge.py:
except the last of each part), so a document may continue into the next shard (its start is
recorded only in the shard where it begins). Readers rely only on each shard's own `tokens`. Every document ends
with the EOS id. Fixed-size shards keep files equal for parallel I/O and let the loader map a
global token offset to (shard, offset) with one division-free bisect.

manifest.json keys (format_version 1):

- `format` ("moeforge-tokens"), `format_version` (readers refuse a newer one), `dtype` ("uint16"
  when vocab_size ≤ 65536, else "uint32"), `vocab_size`, `eos_id`, `pad_id` (or null),
  `bos_id` (or null) and `add_bos` (whether each document starts with it), `shard_tokens`
- `tokenizer`: {kind, name, vocab_size, sha256 of its file (or of the byte tokenizer's spec)}
- `source`, `val_source`: identity of the input(s) read; `config`: the preparation options;
  `run_id`: hash of everything that determines the output (an output folder holds one run)
- `splits.<name>`: {tokens, documents, max_token_id, fingerprint, shards: [{tokens, documents,
  data: {file, bytes, sha256}, index: {file, bytes, sha256}}]}; file paths are relative to the
  folder — in a merged dataset they point into its parts (`part-00000-of-00003/train/00000.bin`,
  possibly `../…`), and `parts` lists {path, run_id, manifest_sha256} of each. `fingerprint` =
  SHA-256 over the format version, dtype, EOS id and every file hash of the split: the loader's
  dataset identity (its order depends on it, its state names it).

Files are written under `<name>.tmp`, fsynced, and renamed when complete; `manifest.json` is
written the same way, last. An interrupted run therefore never leaves a file that looks
complete but is not, and no manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .durable import write_bytes_durable
from .errors import DataError

FORMAT = "moeforge-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_DTYPE = np.dtype("<u8")
HASH_CHUNK = 8 << 20


# ----------------------------------------------------------------------------- small file helpers
def sha256_file(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = limit
        while left is None or left > 0:
            block = f.read(HASH_CHUNK if left is None else min(HASH_CHUNK, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    """`obj` as JSON through `<name>.tmp`, fsync, rename: readers see the old file or the new one."""
    write_bytes_durable(path, (json.dumps(obj, indent=1) + "\n").encode(), best_effort=True)


def fingerprint(dtype: str, eos_id: int, shards: list[dict]) -> str:
    h = hashlib.sha256(f"{FORMAT}|{FORMAT_VERSION}|{dtype}|{eos_id}".encode())
    for s in shards:
        h.update(f"|{s['data']['sha256']}|{s['index']['sha256']}".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading and checking
def manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.name == MANIFEST or p.is_file() else p / MANIFEST


def read_manifest(path: str | os.PathLike) -> dict:
    """Load and structurally check manifest.json (no file hashing). DataError names the file."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        if not mpath.parent.exists():
            raise DataError(f"{mpath.parent}: no such dataset folder")
        hint = (" (its preparation did not finish: re-run the same data.prepare command to resume)"
                if any(mpath.parent.glob(".prepare-*")) else " (not a data.prepare output)")
        raise DataError(f"{mpath}: missing{hint}")
    try:
        m = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{mpath}: not a moeforge token manifest (format is not {FORMAT!r})")
    version = m.get("format_version")
    if not isinstance(version, int):
        raise DataError(f"{mpath}: format_version missing or not an integer")
    if version > FORMAT_VERSION:
        raise DataError(f"{mpath}: format version {version} is newer than this moeforge reads "
                        f"({FORMAT_VERSION}); upgrade moeforge")
    for key in ("dtype", "vocab_size", "eos_id", "splits", "tokenizer"):
        if key not in m:
            raise DataError(f"{mpath}: missing key '{key}'")
    if m["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{mpath}: dtype {m['dtype']!r} is not uint16 or uint32")
    m["_path"] = str(mpath)
    return m


def split_entry(m: dict, split: str) -> dict:
    if split not in m["splits"]:
        raise DataError(f"{m['_path']}: no split '{split}' (has: {', '.join(m['splits']) or 'none'})")
    return m["splits"][split]


def check_sizes(m: dict, split: str | None = None) -> None:
    """Every file of the split(s) present with the manifest's size: O(files) stats, no reading."""
    root = Path(m["_path"]).parent
    item = np.dtype(m["dtype"]).itemsize
    for name in [split] if split else list(m["splits"]):
        for s in split_entry(m, name)["shards"]:
            for key, expect in (("data", s["tokens"] * item), ("index", s["documents"] * INDEX_DTYPE.itemsize)):
                f = root / s[key]["file"]
                if not f.is_file():
                    raise DataError(f"{f}: missing (listed in {m['_path']})")
                size = f.stat().st_size
                if size != s[key]["bytes"] or size != expect:
                    raise DataError(f"{f}: {size} bytes, manifest says {s[key]['bytes']} "
                                    f"(truncated or damaged; re-run data.prepare into a new folder)")


def verify(path: str | os.PathLike, vocab_size: int | None = None, hashes: bool = True, threads: int = 4) -> dict:
    """Check a prepared dataset before training reads it; return its manifest.

    Manifest version and structure, every file's size, and (with `hashes`) every file's SHA-256
    and each split's fingerprint; with `vocab_size`, that every token id fits the model
    (manifest vocab_size and max_token_id against it). Raises DataError naming the file at
    fault. Hashing reads the whole dataset once (threads overlap I/O and hashing): call it on
    one rank per node, before the loader is built.
    """
    m = read_manifest(path)
    check_sizes(m)
    root = Path(m["_path"]).parent
    if hashes:
        jobs = [(root / s[key]["file"], s[key]["sha256"]) for split in m["splits"].values()
                for s in split["shards"] for key in ("data", "index")]
        with ThreadPoolExecutor(max(1, threads)) as pool:
            got = list(pool.map(lambda job: sha256_file(job[0]), jobs))
        for (f, expect), actual in zip(jobs, got):
            if actual != expect:
                raise DataError(f"{f}: SHA-256 mismatch (file is corrupted; manifest {m['_path']} "
                                f"says {expect[:12]}…, file has {actual[:12]}…)")
        for name, split in m["splits"].items():
            if split.get("fingerprint") != fingerprint(m["dtype"], m["eos_id"], split["shards"]):
                raise DataError(f"{m['_path']}: fingerprint of split '{name}' does not match its files")
    if vocab_size is not None:
        max_id = max([s.get("max_token_id", -1) for s in m["splits"].values()] + [-1])
        if m["vocab_size"] > vocab_size or max_id >= vocab_size:
            raise DataError(f"{m['_path']}: token ids up to {max(max_id, m['vocab_size'] - 1)} (tokenizer vocab "
                            f"{m['vocab_size']}) do not fit the model's vocab_size {vocab_size}")
    return m
