"""Fixtures shared by the integration and distributed tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A small stdlib corpus prepared with the byte tokenizer, once per test session."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    r = subprocess.run([sys.executable, "-m", "data.prepare", "input=stdlib", f"output={out}", "tokenizer=byte",
                        "max_chars=3000000", "val_fraction=0.05", "progress=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out
