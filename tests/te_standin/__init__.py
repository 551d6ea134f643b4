"""Installing the Transformer Engine stand-in (tests/te_standin/transformer_engine) for a test.

The stand-in is never importable by default: `install(monkeypatch)` puts this folder first on
sys.path and on PYTHONPATH (for subprocesses: the CLI, torchrun workers) for one test, and
`uninstall()` drops the imported stand-in modules afterwards, so no later test sees a TE it did
not ask for. When the real Transformer Engine is installed the stand-in tests skip (the
`gpu`-marked tests exercise the real one).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
MARKER = "IS_MOEFORGE_TEST_STANDIN"


def real_te_installed() -> bool:
    """Whether a transformer_engine other than this stand-in is importable (looked up, not imported)."""
    module = sys.modules.get("transformer_engine")
    if module is not None:
        return not getattr(module, MARKER, False)
    spec = importlib.util.find_spec("transformer_engine")
    return spec is not None and FOLDER not in Path(spec.origin or FOLDER).resolve().parents


def env_with_standin(env: dict) -> dict:
    """`env` with the stand-in first on PYTHONPATH."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(FOLDER), *filter(None, [env.get("PYTHONPATH")])])}


def install(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(FOLDER))
    monkeypatch.setenv("PYTHONPATH", env_with_standin(dict(os.environ))["PYTHONPATH"])


def uninstall() -> None:
    for name in [n for n in sys.modules if n == "transformer_engine" or n.startswith("transformer_engine.")]:
        del sys.modules[name]
