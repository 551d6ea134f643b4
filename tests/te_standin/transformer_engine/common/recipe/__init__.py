"""Transformer Engine STAND-IN (tests only): the FP8 recipes of `transformer_engine.common.recipe`.

Field names, defaults and the environment variables that change defaults follow TE's
common/recipe/__init__.py (2.20.0.dev0): `Format`, `DelayedScaling`, `Float8CurrentScaling`,
`Float8BlockScaling`, `MXFP8BlockScaling`, with the checks TE makes in `__post_init__`. TE
declares them as pydantic dataclasses; plain dataclasses here (no type coercion). NVFP4 and
custom recipes are left out: moeforge does not use them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Callable, NamedTuple, Optional, Union

_BACKWARD_OVERRIDES = (None, "high_precision", "dequantized")


class _FormatHelper(NamedTuple):
    max_fwd: float
    max_bwd: float


class Format(Enum):
    """FP8 formats: E4M3 everywhere, E5M2 everywhere, or HYBRID (E4M3 forward, E5M2 backward)."""

    E4M3 = _FormatHelper(max_fwd=448, max_bwd=448)
    E5M2 = _FormatHelper(max_fwd=57344, max_bwd=57344)
    HYBRID = _FormatHelper(max_fwd=448, max_bwd=57344)


@dataclass(frozen=True)
class MMParams:
    """GEMM options (TE: use_split_accumulator, cuBLAS fast accumulation off when True)."""

    use_split_accumulator: bool = True


@dataclass(frozen=True)
class QParams:
    """Quantisation options of one operand kind."""

    power_2_scale: bool = False
    amax_epsilon: float = 0.0
    random_hadamard_transform: bool = False
    stochastic_rounding: bool = False
    fp4_2d_quantization: bool = False


class Recipe:
    """Base recipe class, with TE's kind predicates."""

    @classmethod
    def mxfp8(cls) -> bool:
        return issubclass(cls, MXFP8BlockScaling)

    @classmethod
    def delayed(cls) -> bool:
        return issubclass(cls, DelayedScaling)

    @classmethod
    def float8_current_scaling(cls) -> bool:
        return issubclass(cls, Float8CurrentScaling)

    @classmethod
    def float8_per_tensor_scaling(cls) -> bool:
        return issubclass(cls, (DelayedScaling, Float8CurrentScaling))

    @classmethod
    def float8_block_scaling(cls) -> bool:
        return issubclass(cls, Float8BlockScaling)

    @classmethod
    def nvfp4(cls) -> bool:
        return False

    @classmethod
    def custom(cls) -> bool:
        return False


def _check_common(recipe) -> None:
    if recipe.fp8_format == Format.E5M2:
        raise AssertionError("Pure E5M2 training is not supported.")
    if recipe.backward_override not in _BACKWARD_OVERRIDES:
        raise AssertionError("NVTE_BACKWARD_OVERRIDE must be unset or one of: 'high_precision', 'dequantized'.")


@dataclass
class DelayedScaling(Recipe):
    """Per-tensor scales from the amax history of earlier iterations (TE's default before MXFP8)."""

    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: Union[str, Callable] = "max"
    scaling_factor_compute_algo: Optional[Callable] = None
    reduce_amax: bool = True
    fp8_dpa: bool = False
    fp8_mha: bool = False
    backward_override: Optional[str] = os.getenv("NVTE_BACKWARD_OVERRIDE", None)

    def __post_init__(self) -> None:
        _check_common(self)
        if self.backward_override is not None:
            raise AssertionError("Delayed scaling only supports backward_override=None.")


@dataclass
class Float8CurrentScaling(Recipe):
    """Per-tensor scales from the tensor itself, computed at every quantisation."""

    use_power_2_scales: bool = os.getenv("NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES", "0") == "1"
    fp8_format: Format = Format.HYBRID
    # TE declares these three without annotations: class attributes, not constructor arguments.
    fp8_quant_fwd_inp = QParams(power_2_scale=use_power_2_scales, amax_epsilon=0.0)
    fp8_quant_fwd_weight = QParams(power_2_scale=use_power_2_scales, amax_epsilon=0.0)
    fp8_quant_bwd_grad = QParams(power_2_scale=use_power_2_scales, amax_epsilon=0.0)
    fp8_gemm_fprop: MMParams = MMParams(use_split_accumulator=False)
    fp8_gemm_dgrad: MMParams = MMParams(use_split_accumulator=True)
    fp8_gemm_wgrad: MMParams = MMParams(use_split_accumulator=True)
    fp8_dpa: bool = False
    fp8_mha: bool = False
    backward_override: Optional[str] = os.getenv("NVTE_BACKWARD_OVERRIDE", None)

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass
class MXFP8BlockScaling(Recipe):
    """1×32 blocks with power-of-two (E8M0) scales, quantised separately in each direction."""

    margin: int = 0
    fp8_format: Format = Format.E4M3
    fp8_dpa: bool = False
    fp8_mha: bool = False
    backward_override: Optional[str] = os.getenv("NVTE_BACKWARD_OVERRIDE", None)
    enable_2d_quantization: bool = False

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass
class Float8BlockScaling(Recipe):
    """DeepSeek-V3-style blocks: 1×128 activation and gradient tiles, 128×128 weight blocks;
    float32 scales rounded to powers of two unless NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1."""

    use_f32_scales: bool = os.getenv("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "0") == "1"
    fp8_format: Format = Format.E4M3
    fp8_quant_fwd_inp = QParams(power_2_scale=not use_f32_scales, amax_epsilon=0.0)
    fp8_quant_fwd_weight = QParams(power_2_scale=not use_f32_scales, amax_epsilon=0.0)
    fp8_quant_bwd_grad = QParams(power_2_scale=not use_f32_scales, amax_epsilon=0.0)
    x_block_scaling_dim: int = 1
    w_block_scaling_dim: int = 2
    grad_block_scaling_dim: int = 1
    fp8_gemm_fprop: MMParams = MMParams(use_split_accumulator=True)
    fp8_gemm_dgrad: MMParams = MMParams(use_split_accumulator=True)
    fp8_gemm_wgrad: MMParams = MMParams(use_split_accumulator=True)
    fp8_dpa: bool = False
    fp8_mha: bool = False
    backward_override: Optional[str] = os.getenv("NVTE_BACKWARD_OVERRIDE", None)

    def __post_init__(self) -> None:
        for what in ("x", "w", "grad"):
            if getattr(self, f"{what}_block_scaling_dim") not in (1, 2):
                raise AssertionError(f"Only 1D or 2D blocks supported for {what}")
        dims = (self.x_block_scaling_dim, self.w_block_scaling_dim, self.grad_block_scaling_dim)
        if sum(d == 2 for d in dims) > 1:
            raise AssertionError("2D by 2D block gemm not supported.")
        for gemm in ("fprop", "dgrad", "wgrad"):
            if not getattr(self, f"fp8_gemm_{gemm}").use_split_accumulator:
                raise AssertionError(f"Split accumulator required for {gemm}.")
        if self.fp8_dpa or self.fp8_mha:
            raise AssertionError("FP8 attention is not supported for Float8BlockScaling.")
        _check_common(self)
