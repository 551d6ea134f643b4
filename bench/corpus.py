"""The benchmarks' corpus: the Python standard library prepared with the byte tokenizer (nothing downloaded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare_stdlib(out: Path, *options: str) -> Path:
    """`python -m data.prepare input=stdlib tokenizer=byte` into `out` with extra key=value options."""
    subprocess.run([sys.executable, "-m", "data.prepare", "input=stdlib", f"output={out}", "tokenizer=byte",
                    "progress=false", *options], check=True, capture_output=True, cwd=ROOT)
    return out
