"""Fixtures shared by the integration and distributed tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _runs_outside_the_tree(tmp_path_factory):
    """`python -m train` without hydra.run.dir writes runs/<run.name>: keep the suite's under its tmp dir
    (a developer's own runs/smoke must not be resumed or compared against by a test)."""
    import os

    os.environ["MOEFORGE_RUNS"] = str(tmp_path_factory.mktemp("runs"))
    yield
    os.environ.pop("MOEFORGE_RUNS", None)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A small stdlib corpus prepared with the byte tokenizer, once per test session."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    r = subprocess.run([sys.executable, "-m", "data.prepare", "input=stdlib", f"output={out}", "tokenizer=byte",
                        "max_chars=3000000", "val_fraction=0.05", "progress=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def te_standin(monkeypatch):
    """The Transformer Engine stand-in (tests/te_standin) importable as `transformer_engine` for
    this test, in-process and in subprocesses; skips where the real TE is installed."""
    from tests import te_standin

    if te_standin.real_te_installed():
        pytest.skip("the real Transformer Engine is installed: the gpu-marked tests use it, not the stand-in")
    te_standin.uninstall()
    te_standin.install(monkeypatch)
    import transformer_engine

    assert getattr(transformer_engine, te_standin.MARKER, False), transformer_engine.__file__
    yield transformer_engine
    te_standin.uninstall()
