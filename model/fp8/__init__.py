"""FP8 GEMMs behind the model's one Linear factory (model/linear.py).

quant.py     quantise / dequantise: 1×128 tiles, 128×128 blocks, rows, whole tensors (E4M3);
             round_to_e4m3, the cast done in float32 arithmetic for the emulated backend
gemm.py      the FP8 (grouped) linear as an autograd function: every GEMM (forward, data
             gradient, weight gradient) sees operands quantised along its reduction dimension,
             scale groups kept inside each expert's segment; `emulated` dequantises and
             multiplies in the compute dtype, `torch` calls torch._scaled_mm on the FP8 operands
grouped.py   routed experts (SwiGLU) over expert segments with the grouped linear
te.py        Transformer Engine modules and recipes, te.GroupedLinear experts (imported only
             when fp8.backend=te)

Imports torch and model/ only (bench/fp8_gemm.py runs on machines without DeepSpeed or Hydra).
"""

from __future__ import annotations

import torch

from ..config import ConfigError, ModelConfig

# Dimension multiples the kernels need, per (backend, recipe); the emulated path needs none.
_MULTIPLE = {("te", "blockwise"): 128, ("te", "mxfp8"): 32, ("te", "current"): 16, ("te", "delayed"): 16,
             ("torch", "rowwise"): 16, ("torch", "tensorwise"): 16}


def check_capability(p, device: torch.device, model_cfg: ModelConfig) -> None:
    """One-line ConfigError when precision `p` cannot run on `device` for this model."""
    if p.backend in ("off", "emulated"):
        return
    if p.backend == "te":
        from . import te

        te.check(p.recipe, device)
    if p.backend == "torch" and not torch_fp8_gemm_works(device):
        raise ConfigError(f"fp8.backend=torch: torch._scaled_mm has no FP8 GEMM on {device} "
                          f"(torch {torch.__version__}); fp8.backend=emulated runs here")
    multiple = _MULTIPLE.get((p.backend, p.recipe))
    if multiple and (p.backend == "te" or device.type == "cuda"):
        for name, k, n in linear_shapes(model_cfg):
            if p.excludes(name):
                continue
            for what, dim in (("in_features", k), ("out_features", n)):
                if dim % multiple:
                    raise ConfigError(f"fp8.backend={p.backend} recipe={p.recipe}: layer {name} {what}={dim} is not "
                                      f"a multiple of {multiple}; add it to fp8.exclude or use fp8.backend=emulated")


def linear_shapes(model_cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, in, out) of every factory-built linear of the model (built on the meta device)."""
    from ..linear import Precision, precision, record_linears
    from ..transformer import Transformer

    with record_linears() as rec, precision(Precision()), torch.device("meta"):
        Transformer(model_cfg)
    return sorted(set(rec))


def torch_fp8_gemm_works(device: torch.device) -> bool:
    if not hasattr(torch, "_scaled_mm"):
        return False
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False
