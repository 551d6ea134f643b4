"""The one Linear factory of the model.

Every projection that may run in a low-precision GEMM is built here, so a precision backend
changes this file only: `off` (nn.Linear), `emulated` and `torch` (model/fp8/gemm.py), `te`
(Transformer Engine, model/fp8/te.py). Modules kept in high precision as in DeepSeek-V3
(embedding, output head, router, norms, attention core) do not use it. The backend is chosen
for a model build with `with precision(...)`; names matching `exclude` stay in high precision.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Precision:
    backend: str = "off"  # off | emulated | torch | te
    recipe: str = "blockwise"
    block: int = 128
    pow2: bool = False
    exclude: tuple[str, ...] = field(default_factory=tuple)  # fnmatch patterns over linear names

    def excludes(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)


_CURRENT = Precision()
_RECORD: list | None = None  # (name, in_features, out_features) of every linear built, when recording


@contextlib.contextmanager
def precision(p: Precision):
    """Build the modules created inside with backend `p`."""
    global _CURRENT
    old, _CURRENT = _CURRENT, p
    try:
        yield p
    finally:
        _CURRENT = old


def current_precision() -> Precision:
    return _CURRENT


def linear(in_features: int, out_features: int, name: str = "") -> nn.Module:
    """A bias-free projection y = x W^T with W of shape (out_features, in_features).

    `name` is the module's dotted path inside a block (e.g. "attn.wq_b"); `exclude` patterns
    match it.
    """
    p = _CURRENT
    if _RECORD is not None:
        _RECORD.append((name, in_features, out_features))
    if p.backend == "off" or p.excludes(name):
        return nn.Linear(in_features, out_features, bias=False)
    if p.backend in ("emulated", "torch"):
        from .fp8.gemm import Fp8Linear, Fp8Spec

        return Fp8Linear(in_features, out_features, Fp8Spec(p.backend, p.recipe, p.block, p.pow2))
    if p.backend == "te":
        from .fp8 import te

        return te.linear(in_features, out_features)
    raise ValueError(f"precision backend {p.backend!r}: must be off, emulated, torch or te")


@contextlib.contextmanager
def record_linears():
    """Collect (name, in_features, out_features) of the linears built inside (capability checks)."""
    global _RECORD
    old, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = old
