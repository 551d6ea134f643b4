"""Shared helpers for the data tests: small corpora, prepared datasets, stream readers, CLI runs.

Everything is generated or read from the Python standard library's source (`input=stdlib`):
nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from data.corpus import stdlib_files
from data.prepare import PrepareConfig, prepare
from data.shards import INDEX_DTYPE, read_manifest

REPO = Path(__file__).resolve().parent.parent


def prepare_dataset(out: Path, on_journal=None, **options) -> dict:
    """Run data.prepare in-process (one process unless num_proc is given, no progress bar)."""
    options.setdefault("input", "stdlib")
    options.setdefault("num_proc", 1)
    options.setdefault("progress", False)
    return prepare(PrepareConfig(output=str(out), **options), on_journal=on_journal)


def stdlib_documents(n: int) -> list[str]:
    """The first n documents of input=stdlib, read the way data.corpus reads them."""
    return [f.read_bytes().decode("utf-8", errors="replace") for f in stdlib_files()[:n]]


def generated_documents(n: int, seed: int = 0, max_len: int = 400) -> list[str]:
    """Varied text documents (ASCII words, some non-ASCII, some empty-ish) for input files."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "γάμμα", "delta", "ε", "zeta", "eta", "θ", "iota", "kappa", "λ", "数据",
             "\n", "\t"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, max_len // 4))) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def stream(path: Path, split: str = "train") -> np.ndarray:
    """All tokens of a split, concatenated (int64)."""
    m = read_manifest(path)
    root = Path(m["_path"]).parent
    parts = [np.fromfile(root / s["data"]["file"], dtype=np.dtype(m["dtype"]).newbyteorder("<"))
             for s in m["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def doc_starts(path: Path, split: str = "train") -> np.ndarray:
    """Global start offsets of every document of a split."""
    m = read_manifest(path)
    root = Path(m["_path"]).parent
    out, base = [], 0
    for s in m["splits"][split]["shards"]:
        out.append(np.fromfile(root / s["index"]["file"], dtype=INDEX_DTYPE).astype(np.int64) + base)
        base += s["tokens"]
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def documents(path: Path, split: str = "train") -> list[np.ndarray]:
    """Token ids of each document of a split (each ends with EOS)."""
    toks, starts = stream(path, split), doc_starts(path, split)
    bounds = list(starts) + [len(toks)]
    return [toks[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def resumed(make, take, pos: int, n: int):
    """A loader from `make()` read `pos` batches with `take(loader, k)`, its state through JSON (what
    a checkpoint holds) loaded into a fresh `make()`: (the fresh loader, its next n batches)."""
    ld = make()
    take(ld, pos)
    state = json.loads(json.dumps(ld.state_dict()))
    del ld
    fresh = make()
    fresh.load_state_dict(state)
    return fresh, take(fresh, n)


def batch_digest(batch: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        h.update(key.encode())
        h.update(batch[key].numpy().tobytes())
    return h.hexdigest()


def snapshot(folder: Path) -> dict:
    """relative path → SHA-256 of every file under folder (to prove nothing changed)."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m module args…` from the repository root, with stderr not a terminal."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, one stderr line `error: …` naming every needle, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err
