"""Transformer Engine backend (fp8.backend=te): modules, recipes, capability checks.

Imported only when the backend is chosen; written against TE's documented PyTorch API
(`transformer_engine.pytorch.Linear`, `GroupedLinear`, `autocast` / `fp8_autocast`, and the
recipes of `transformer_engine.common.recipe`). TE's numerics need CUDA and TE: the gpu-marked
tests check them (tests/unit/test_fp8.py). Every line of this file also runs on the CPU in the
suite through a stand-in of that API (tests/te_standin: TE's signatures, parameter names,
device default, init and `_extra_state`, with the emulated FP8 GEMMs), which `check` admits on
a CPU because it carries a marker attribute.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

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


def _is_test_standin() -> bool:
    """Whether the importable TE is moeforge's test stand-in (tests/te_standin), which runs on a CPU."""
    try:
        import transformer_engine
    except Exception:  # absent, or a real TE whose libraries do not load here
        return False
    return bool(getattr(transformer_engine, "IS_MOEFORGE_TEST_STANDIN", False))


def check(recipe: str, device: torch.device) -> None:
    # The one seam for tests: the stand-in (emulated FP8 on any device, tests/te_standin) lets
    # the CPU suite run every line of this backend; a real TE on a CPU is still refused here.
    standin = device.type != "cuda" and _is_test_standin()
    if device.type != "cuda" and not standin:
        raise ConfigError(f"fp8.backend=te: needs an NVIDIA GPU (device is {device.type}); "
                          "fp8.backend=emulated runs here")
    import_te()
    if standin:
        return
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


# TE's FP8 GEMM needs the input's rows (the product of its leading dimensions) to be a multiple
# of 8 (TE utils.assert_dim_for_fp8_exec, checked in Linear's forward since TE 2.2). MTP depth k
# runs on B·(T−k) rows — 2·4095 for a batch of two 4096-token sequences — which TE refuses.
ROW_MULTIPLE = 8
_LINEAR_CLASSES: dict[type, type] = {}  # te.Linear class → its row-padding subclass


def _row_padded(te_linear: type) -> type:
    if te_linear not in _LINEAR_CLASSES:
        class RowPaddedLinear(te_linear):
            """te.Linear whose input rows are zero-padded to TE's FP8 row multiple and cut after.

            Zero rows change no scale (amaxes of whole tensors, rows or tiles along a row, and
            token tiles of the weight gradient only see zeros added) and add nothing to the
            weight gradient; their outputs are dropped. A subclass, not a wrapper, so the
            parameter keeps its name (`….weight`) in every state dict.
            """

            def forward(self, inp: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                rows = math.prod(inp.shape[:-1])
                if rows % ROW_MULTIPLE == 0:
                    return super().forward(inp, *args, **kwargs)
                x = F.pad(inp.reshape(rows, inp.size(-1)), (0, 0, 0, -rows % ROW_MULTIPLE))
                return super().forward(x, *args, **kwargs)[:rows].view(*inp.shape[:-1], -1)

        _LINEAR_CLASSES[te_linear] = RowPaddedLinear
    return _LINEAR_CLASSES[te_linear]


def linear(in_features: int, out_features: int):
    # TE's modules default to device="cuda" and pass it explicitly to their allocations, so under
    # the builders' `with torch.device("meta")` they would allocate (and initialise, with TE's
    # own init_method) every projection in GPU memory — at 671B, far more than one GPU holds.
    # The device the build runs under is passed instead: on meta TE defers its initialisation,
    # and model/init.py initialises by name after `to_empty`.
    return _row_padded(import_te().Linear)(in_features, out_features, bias=False,
                                           device=torch.get_default_device())


def autocast(recipe: str, group=None):
    """The context every forward runs in; amax reductions (delayed scaling) over `group`."""
    te = import_te()
    if recipe is None:
        return contextlib.nullcontext()
    # TE 2.9 renamed fp8_autocast(fp8_recipe, fp8_group) to autocast(recipe, amax_reduction_group)
    # and deprecated the old name; 2.4–2.8 have only the old one.
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=make_recipe(recipe), amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=make_recipe(recipe), fp8_group=group)


# Rows per expert must be a multiple of this for TE's FP8 GEMMs (TE's own quantisation
# alignment: 32 for MXFP8's 1×32 scales, 16 otherwise); GroupedExperts pads each segment.
ROW_ALIGN = {"mxfp8": 32}
DEFAULT_ROW_ALIGN = 16


class GroupedExperts:
    """Routed experts under fp8.backend=te: one `te.GroupedLinear` per projection (w1, w3, w2).

    TE's GroupedLinear(num_gemms, in_features, out_features) runs E GEMMs in one call, splitting
    its input rows by `m_splits` (tokens per expert) — the same contiguous per-expert segments
    the dispatchers produce. The weights stay the Experts module's stacked parameters (w1, w3:
    (E, F, D); w2: (E, D, F)) so init, expert-parallel sharding, checkpoints and DeepSpeed see
    the same tensors under every backend: the GroupedLinear modules are built on the meta
    device, their own `weight{i}` parameters dropped, and before each call `weight{i}` is bound
    to the view w[i] (GroupedLinear reads `weight{i}` at every forward), so TE's autograd hands
    each expert's weight gradient back through the view into the stacked parameter.

    A plain object, not a submodule: the TE modules own no parameters, and their FP8 metadata
    (amax histories, scales) is runtime state that TE re-creates, not model state to checkpoint.
    Each expert's rows are zero-padded to the FP8 GEMM's row multiple and the padding dropped
    after; zero rows add nothing to the weight gradients. tests/unit/test_fp8.py's GPU tests
    compare it with the emulated grouped experts; the CPU suite runs it through the TE stand-in.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, recipe: str):
        te = import_te()
        self.n_experts = n_experts
        self.align = ROW_ALIGN.get(recipe, DEFAULT_ROW_ALIGN)
        shapes = {"w1": (dim, inter_dim), "w3": (dim, inter_dim), "w2": (inter_dim, dim)}  # (in, out)
        self.linears = {}
        for name, (k, n) in shapes.items():
            gl = te.GroupedLinear(n_experts, k, n, bias=False, device="meta")
            for i in range(n_experts):
                gl._parameters.pop(f"weight{i}", None)  # the stacked parameter's views take their place
            self.linears[name] = gl

    def _grouped(self, name: str, x: torch.Tensor, m_splits: list[int], w: torch.Tensor) -> torch.Tensor:
        gl = self.linears[name]
        for i, wi in enumerate(w.unbind(0)):  # views of the stacked (E, out, in) parameter
            object.__setattr__(gl, f"weight{i}", wi)
        return gl(x, m_splits)

    def __call__(self, x: torch.Tensor, sizes: list[int], w1: torch.Tensor, w2: torch.Tensor,
                 w3: torch.Tensor) -> torch.Tensor:
        """x (M, D) in expert segments of `sizes` rows → (M, D)."""
        xp, m_splits, rows = pad_segments(x, sizes, self.align)
        h = F.silu(self._grouped("w1", xp, m_splits, w1)) * self._grouped("w3", xp, m_splits, w3)
        out = self._grouped("w2", h, m_splits, w2)
        return out if rows is None else out.index_select(0, rows)


def pad_segments(x: torch.Tensor, sizes: list[int], align: int):
    """Zero-pad every segment of x (M, C) to a multiple of `align` rows.

    Returns (padded x, padded sizes, rows) where padded[rows] == x; rows is None when nothing
    needed padding. Differentiable (index_copy / index_select).
    """
    padded = [-(-n // align) * align for n in sizes]
    if padded == sizes:
        return x, sizes, None
    shift, src, dst = [], 0, 0  # per segment: padded start − start
    for n, p in zip(sizes, padded):
        shift.append(dst - src)
        src, dst = src + n, dst + p
    counts = torch.tensor(sizes, device=x.device)
    rows = torch.arange(x.size(0), device=x.device) + torch.repeat_interleave(
        torch.tensor(shift, device=x.device), counts)
    out = x.new_zeros(sum(padded), x.size(1)).index_copy(0, rows, x)
    return out, padded, rows
