"""Transformer Engine STAND-IN (tests only): `autocast` / `fp8_autocast` and the recipe → emulation map.

As in TE's quantization.py, the autocast is a global state that modules read when they run
their forward: FP8 GEMMs inside `autocast(enabled=True)`, high-precision GEMMs outside. TE
validates the recipe against the GPU on entry (check_recipe_support) and, for delayed scaling,
all-reduces amaxes over `amax_reduction_group` on exit; there is no GPU here, so neither
happens. `fp8_autocast` is TE's older name, kept (with a DeprecationWarning) by newer releases.

Emulation (moeforge's model/fp8/gemm.py, every GEMM operand quantised along its reduction
dimension, E4M3, values kept in float32):

| TE recipe            | emulated as                                                        |
|----------------------|--------------------------------------------------------------------|
| Float8BlockScaling   | blockwise, 128: 1×128 tiles, 128×128 weight blocks; pow2 scales    |
|                      | unless the recipe asks for float32 scales (TE's default: pow2)     |
| Float8CurrentScaling | tensorwise (one scale per tensor, per expert segment in grouped    |
|                      | GEMMs); pow2 as the recipe says                                    |
| DelayedScaling       | tensorwise from the current amax: the amax history is kept for     |
|                      | `_extra_state` but does not drive the scales                       |
| MXFP8BlockScaling    | blockwise, 32, pow2 scales: 1×32 tiles along the reduction         |
|                      | dimension (MXFP8's blocks, E8M0 = powers of two); weights in 32×32 |
|                      | blocks, i.e. MXFP8's `enable_2d_quantization` layout — the default |
|                      | 1×32 weight rows are approximated by their 32-row maximum          |

Not emulated: E5M2 gradients of the HYBRID format (E4M3 everywhere), the delayed recipe's
margin, cuBLAS accumulation order. The stand-in tests moeforge's use of TE, not TE's numerics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from model.fp8.gemm import Fp8Spec

from ..common.recipe import DelayedScaling, Float8BlockScaling, Float8CurrentScaling, MXFP8BlockScaling, Recipe


@dataclass
class _State:
    enabled: bool = False
    calibrating: bool = False
    recipe: Optional[Recipe] = None
    group: object = None


_STATE = _State()


def get_default_recipe() -> Recipe:
    """TE picks MXFP8 on Blackwell, current scaling on SM120, else delayed scaling (Hopper)."""
    return DelayedScaling()


def fp8_enabled() -> bool:
    return _STATE.enabled


def active_recipe() -> Optional[Recipe]:
    return _STATE.recipe if _STATE.enabled else None


def emulation_spec(recipe: Recipe) -> Fp8Spec:
    """The emulated FP8 GEMM settings standing in for `recipe` (table above)."""
    if isinstance(recipe, Float8BlockScaling):
        if (recipe.x_block_scaling_dim, recipe.w_block_scaling_dim, recipe.grad_block_scaling_dim) != (1, 2, 1):
            raise NotImplementedError("TE stand-in: Float8BlockScaling is emulated only with TE's default "
                                      "1D activations, 2D weights, 1D gradients")
        return Fp8Spec("emulated", "blockwise", 128, recipe.fp8_quant_fwd_weight.power_2_scale)
    if isinstance(recipe, Float8CurrentScaling):
        return Fp8Spec("emulated", "tensorwise", 128, recipe.fp8_quant_fwd_weight.power_2_scale)
    if isinstance(recipe, DelayedScaling):
        return Fp8Spec("emulated", "tensorwise", 128, False)
    if isinstance(recipe, MXFP8BlockScaling):
        return Fp8Spec("emulated", "blockwise", 32, True)
    raise NotImplementedError(f"TE stand-in: no emulation for recipe {type(recipe).__name__}")


def align_size(recipe: Recipe) -> int:
    """Rows per GEMM split that TE's FP8 grouped GEMMs need (TE's get_align_size_for_quantization)."""
    return 32 if recipe.mxfp8() else 16


class autocast:
    """Context in which TE modules run their GEMMs in FP8 with `recipe` (default: delayed scaling)."""

    def __init__(self, enabled: bool = True, calibrating: bool = False, recipe: Optional[Recipe] = None,
                 amax_reduction_group=None, _graph: bool = False) -> None:
        if recipe is not None and not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a transformer_engine.common.recipe.Recipe, got {type(recipe).__name__}")
        self._enabled = enabled
        self._calibrating = calibrating
        self._recipe = recipe
        self._group = amax_reduction_group
        self._saved: Optional[_State] = None

    def __enter__(self) -> "autocast":
        if self._saved is not None:
            raise RuntimeError("autocast context manager cannot be entered more than once concurrently")
        self._saved = _State(**vars(_STATE))
        _STATE.enabled = self._enabled
        _STATE.calibrating = self._calibrating
        _STATE.recipe = get_default_recipe() if self._recipe is None else self._recipe
        _STATE.group = self._group
        return self

    def __exit__(self, *exc) -> None:
        for key, value in vars(self._saved).items():
            setattr(_STATE, key, value)
        self._saved = None


def fp8_autocast(enabled: bool = True, calibrating: bool = False, fp8_recipe: Optional[Recipe] = None,
                 fp8_group=None, _graph: bool = False) -> autocast:
    """TE's older name of `autocast` (deprecated there in favour of it)."""
    warnings.warn("fp8_autocast is deprecated and will be removed in a future release. Use autocast(enabled=..., "
                  "calibrating=..., recipe=..., group=..., _graph=...) instead.", category=DeprecationWarning,
                  stacklevel=2)
    return autocast(enabled=enabled, calibrating=calibrating, recipe=fp8_recipe, amax_reduction_group=fp8_group,
                    _graph=_graph)
