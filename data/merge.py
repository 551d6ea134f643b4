"""`python -m data.merge PART… output=…` — one dataset over the parts of a split preparation.

    python -m data.prepare input=corpus/ output=data/c num_shards=3 shard_index=0   # machine 0
    python -m data.prepare input=corpus/ output=data/c num_shards=3 shard_index=1   # machine 1 …
    python -m data.prepare input=corpus/ output=data/c num_shards=3 merge=true      # then, once
    python -m data.merge data/c/part-00000-of-00003 data/c/part-00001-of-00003 \\
        data/c/part-00002-of-00003 output=data/c                                    # the same

Checks first, writes last: every part's manifest and files (sizes and, unless hashes=false,
SHA-256: `data.shards.verify`), then that the parts belong together — the same input listing,
tokenizer, dtype, EOS and options (all but shard_index; the input and the tokenizer are compared
by content — file names relative to the input, sizes, the tokenizer's SHA-256 — not by path, so
each machine may mount them elsewhere), num_shards parts numbered 0…n−1 each
present once, and each part's input range starting where the previous one's ends, from the
first document to the last. Any failure is one line naming the part, key or value, exit 2, and
nothing is written.

The merged manifest copies no token bytes: each split lists the parts' shards in part order,
their file paths made relative to the merged folder (`part-00000-of-00003/train/00000.bin`, or
`../elsewhere/…` for parts outside it), with the parts' sizes and hashes, and a fingerprint over
them; `parts` records each part's folder, run id and manifest SHA-256. The merged folder must
therefore travel with its parts (keep them inside it: the default layout). The readers
(data/stream.py, `data.verify`) need nothing more: shards in a merged split are not all
`shard_tokens` long (each part's last shard is short), and the stream maps offsets through each
shard's own length.

Prior art. Megatron's `tools/preprocess_data.py --partitions` deals the input's lines into
partition files, tokenizes them, and concatenates their `.bin`/`.idx` into new files
(`merge_file_`, as `tools/merge_datasets.py` does: a full copy). Dolma's `dolma tokens` writes
many token files and OLMo's training config simply lists them all: no merge step, and nothing
checks that the list is complete or consistent. We take
OLMo's no-copy side — the merged manifest is a list of the parts' files — and add the checks a
list lacks (every part present once, same tokenizer and options, contiguous ranges, hashes), so
merging a multi-terabyte corpus costs one read for the hashes and no write but the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import cli
from .errors import DataError
from .shards import FORMAT, FORMAT_VERSION, MANIFEST, fingerprint, verify, write_json_atomic

# Manifest keys every part must agree on (config: all but shard_index).
_SAME = ("format_version", "dtype", "vocab_size", "eos_id", "pad_id", "bos_id", "add_bos", "shard_tokens",
         "tokenizer")


@dataclass
class MergeConfig:
    """Options of `python -m data.merge` (parts are bare arguments, or parts=a,b,c)."""

    output: str  # the merged dataset's folder (it may hold the parts)
    parts: str = ""  # comma list of part folders (bare arguments add to it)
    hashes: bool = True  # check every part file's SHA-256 (false: sizes only)


# Compared through content instead (the listing's names and sizes, the tokenizer's SHA-256): each
# machine may see the input and the tokenizer under its own path.
_PATHS = {"shard_index", "input", "val_input", "tokenizer"}


def _strip_part(ident: dict | None) -> dict | None:
    if ident is None:
        return None
    return {k: v for k, v in ident.items() if k != "part"}


def _content(ident: dict | None) -> dict | None:
    if ident is None:
        return None
    return {k: v for k, v in ident.items() if k not in ("part", "path")}


def _same_value(key: str, m: dict):
    """m[key] as the parts must agree on it: the tokenizer without its name (the folder or file it was
    loaded from, which each machine may call differently; its SHA-256 is what it is)."""
    value = m.get(key)
    if key == "tokenizer" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "name"}
    return value


def merge(parts: list[str | os.PathLike], output: str | os.PathLike, hashes: bool = True) -> dict:
    """Check the parts and write the merged manifest into `output`; return it."""
    if not parts:
        raise DataError("parts: none given (the part folders written with shard_index=… num_shards=…)")
    out = Path(output).expanduser()
    manifests = []
    for p in parts:
        m = verify(p, hashes=hashes)
        if not isinstance(m.get("source"), dict) or "part" not in m["source"]:
            raise DataError(f"{m['_path']}: not a part (prepared without num_shards > 1)")
        for key, value, needs in (("config", m.get("config"), set()),
                                  ("source.part", m["source"]["part"], {"index", "count", "from", "to"})):
            if not isinstance(value, dict) or not needs <= set(value):
                raise DataError(f"{m['_path']}: key '{key}' missing or damaged (not a data.prepare part manifest)")
        manifests.append(m)
    first = manifests[0]
    count = first["source"]["part"]["count"]
    by_index: dict[int, dict] = {}
    for m in manifests:
        part = m["source"]["part"]
        if part["count"] != count:
            raise DataError(f"{m['_path']}: part of num_shards={part['count']}, "
                            f"{first['_path']} of num_shards={count}")
        if part["index"] in by_index:
            raise DataError(f"{m['_path']}: part {part['index']} given twice (also {by_index[part['index']]['_path']})")
        by_index[part["index"]] = m
        if set(m["splits"]) != set(first["splits"]):
            raise DataError(f"{m['_path']}: splits {sorted(m['splits'])} differ from {first['_path']}'s "
                            f"{sorted(first['splits'])}")
        for key in _SAME:
            if _same_value(key, m) != _same_value(key, first):
                raise DataError(f"{m['_path']}: {key} {m.get(key)!r} differs from {first['_path']}'s "
                                f"{first.get(key)!r}; prepare every part the same way")
        for key in ("source", "val_source"):
            if _content(m.get(key)) != _content(first.get(key)):
                a, b = _content(first.get(key)) or {}, _content(m.get(key)) or {}
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise DataError(f"{m['_path']}: {key}.{diff[0] if diff else key} {b.get(diff[0]) if diff else b!r} "
                                f"differs from {first['_path']}'s {a.get(diff[0]) if diff else a!r}: "
                                "not parts of the same input")
        ca = {k: v for k, v in first["config"].items() if k not in _PATHS}
        cb = {k: v for k, v in m["config"].items() if k not in _PATHS}
        if ca != cb:
            key = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))[0]
            raise DataError(f"{m['_path']}: option {key}={cb.get(key)!r} differs from {first['_path']}'s "
                            f"{key}={ca.get(key)!r}; prepare every part with the same options")
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        from .prepare import part_name

        raise DataError(f"part {missing[0]} of {count} missing ({part_name(missing[0], count)}; "
                        f"given: {len(by_index)} of {count})")
    ordered = [by_index[i] for i in range(count)]
    for key in ("source", "val_source"):
        if ordered[0].get(key) is None:
            continue
        end = [0, 0]
        for m in ordered:
            part = m[key].get("part")
            if not isinstance(part, dict) or not {"from", "to"} <= set(part):
                raise DataError(f"{m['_path']}: key '{key}.part' missing or damaged (not a data.prepare part manifest)")
            if part["from"] != end:
                raise DataError(f"{m['_path']}: {key} range starts at (file, row) {part['from']}, the previous part "
                                f"ends at {end}: parts of different splits of the input")
            end = part["to"]
        n_files = ordered[0][key].get("files", 1) if ordered[0][key].get("kind") != "hub" else 1
        if end != [n_files, 0]:
            raise DataError(f"{ordered[-1]['_path']}: {key} range ends at {end}, not at the end of the input")

    manifest = _merged_manifest(ordered, out)
    if manifest["splits"]["train"]["documents"] == 0:
        raise DataError(f"input={first['config'].get('input')}: no documents in any of the {count} parts")
    if first.get("val_source") is not None and manifest["splits"]["val"]["documents"] == 0:  # as one preparation
        raise DataError(f"val_input={first['config'].get('val_input')}: no documents in any of the {count} parts")
    mpath = out / MANIFEST
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise DataError(f"{mpath}: unreadable; delete it or choose another output")
        if old.get("run_id") == manifest["run_id"]:
            return old
        raise DataError(f"output={out}: holds another dataset (run {str(old.get('run_id'))[:12]}…); "
                        "choose another output or delete its manifest.json")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(mpath, manifest)
    return manifest


def _merged_manifest(ordered: list[dict], out: Path) -> dict:
    first = ordered[0]
    splits = {}
    out_abs = out.resolve()  # as the parts' paths are: a link in output's path must not make them ../real/…
    for name in first["splits"]:
        shards, tokens, documents, max_id = [], 0, 0, -1
        for m in ordered:
            root = Path(m["_path"]).parent.resolve()
            entry = m["splits"][name]
            tokens += entry["tokens"]
            documents += entry["documents"]
            max_id = max(max_id, entry.get("max_token_id", -1))
            for s in entry["shards"]:
                shards.append({**s, **{key: {**s[key], "file": os.path.relpath(root / s[key]["file"], out_abs)
                                             .replace(os.sep, "/")} for key in ("data", "index")}})
        splits[name] = {"tokens": tokens, "documents": documents, "max_token_id": max_id,
                        "fingerprint": fingerprint(first["dtype"], first["eos_id"], shards), "shards": shards}
    parts = [{"path": os.path.relpath(Path(m["_path"]).parent.resolve(), out_abs).replace(os.sep, "/"),
              "run_id": m["run_id"], "manifest_sha256": hashlib.sha256(Path(m["_path"]).read_bytes()).hexdigest()}
             for m in ordered]
    run_id = hashlib.sha256("|".join(p["run_id"] for p in parts).encode()).hexdigest()
    config = {k: v for k, v in first["config"].items() if k != "shard_index"}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION}
    manifest.update({k: first.get(k) for k in _SAME if k != "format_version"})
    manifest.update(run_id=run_id, source=_strip_part(first["source"]), val_source=_strip_part(first.get("val_source")),
                    config=config, parts=parts, splits=splits, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return manifest


def merge_prepared(cfg) -> dict:
    """`data.prepare … merge=true`: merge the num_shards parts under cfg.output."""
    from .prepare import part_name

    out = Path(cfg.output).expanduser()
    if cfg.num_shards < 2:
        raise DataError(f"merge=true: needs num_shards > 1 (the number of parts under output={out})")
    parts = [out / part_name(i, cfg.num_shards) for i in range(cfg.num_shards)]
    for i, p in enumerate(parts):
        if not p.is_dir():
            raise DataError(f"{p}: part {i} of {cfg.num_shards} missing (prepare it with shard_index={i} "
                            f"num_shards={cfg.num_shards} output={cfg.output})")
    return merge(parts, out)


def merged_line(m: dict, out: str) -> str:
    tr, va = m["splits"]["train"], m["splits"]["val"]
    return (f"merged {len(m['parts'])} parts: {tr['documents'] + va['documents']:,} documents (train "
            f"{tr['documents']:,}, val {va['documents']:,}), {tr['tokens'] + va['tokens']:,} tokens "
            f"in {len(tr['shards']) + len(va['shards'])} shards, no bytes copied -> {Path(out) / MANIFEST}")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(cli.usage(__doc__, MergeConfig))
        return 0
    bare = [a for a in argv if "=" not in a]
    cfg = cli.parse_args([a for a in argv if "=" in a], MergeConfig)
    parts = [p for p in cfg.parts.split(",") if p] + bare
    m = merge(parts, cfg.output, hashes=cfg.hashes)
    print(merged_line(m, cfg.output))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
