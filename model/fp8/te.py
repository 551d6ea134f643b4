"""Transformer Engine backend (fp8.backend=te): modules, recipes, capability checks.

Imported only when the backend is chosen; written against TE's documented PyTorch API
(`transformer_engine.pytorch.Linear`, `GroupedLinear`, `fp8_autocast`, and the recipes of
`transformer_engine.common.recipe`). It cannot run on machines without CUDA and TE, so it is
exercised by the GPU tests only (tests/unit/test_fp8.py skips them elsewhere, with a reason).
"""

from __future__ import annotations

import contextlib

import torch

from ..config import ConfigError

# recipe → (TE recipe class name, minimum compute capability)
TE_RECIPES = {"blockwise": ("Float8BlockScaling", (9, 0)), "current": ("Float8CurrentScaling", (8, 9)),
              "delayed": ("DelayedScaling", (8, 9)), "mxfp8": ("MXFP8BlockScaling", (10, 0))}


def import_te():
    try:
        import transformer_engine.pytorch as te  # noqa: F401
    except ImportError:
        raise ConfigError("fp8.backend=te: Transformer Engine is not installed (pip install 'moeforge[gpu]' on a "
                          "CUDA machine); fp8.backend=emulated runs the same blockwise recipe anywhere") from None
    return te


def check(recipe: str, device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(f"fp8.backend=te: needs an NVIDIA GPU (device is {device.type}); "
                          "fp8.backend=emulated runs here")
    import_te()
    need = TE_RECIPES[recipe][1]
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        raise ConfigError(f"fp8.recipe={recipe}: needs compute capability {need[0]}.{need[1]}+, this GPU has "
                          f"{cap[0]}.{cap[1]}; fp8.recipe=current or delayed run on SM89/SM90")


def make_recipe(recipe: str, amax_history_len: int = 1024):
    from transformer_engine.common import recipe as R

    if recipe == "delayed":
        return R.DelayedScaling(fp8_format=R.Format.HYBRID, amax_history_len=amax_history_len, amax_compute_algo="max")
    return getattr(R, TE_RECIPES[recipe][0])()


def linear(in_features: int, out_features: int):
    return import_te().Linear(in_features, out_features, bias=False)


def autocast(recipe: str, group=None):
    """The context every forward runs in; amax reductions (delayed scaling) over `group`."""
    te = import_te()
    if recipe is None:
        return contextlib.nullcontext()
    return te.fp8_autocast(enabled=True, fp8_recipe=make_recipe(recipe), fp8_group=group)
