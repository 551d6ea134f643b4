"""Transformer Engine STAND-IN (tests only): `Linear` and `GroupedLinear`.

What follows TE (transformer_engine/pytorch/module/base.py, linear.py, grouped_linear.py at
2.20.0.dev0) because it can bite a caller:

- `device` defaults to "cuda" and is passed explicitly to the parameter allocation, so a module
  built under `with torch.device("meta")` without `device=` is NOT on meta: TE allocates (and
  initialises) GPU memory there; on this CPU-only torch the allocation raises.
- On a real device the weights are initialised at construction by `init_method` (default
  Normal(0, 0.023) from the global RNG, TE's get_default_init_method), biases to zero; on
  "meta" the initialisation is deferred (TE's `reset_parameters(defer_init=True)`), and nothing
  re-runs it after `to_empty`.
- Parameter names: `weight` (+ `bias`) for Linear; `weight0..weight{n-1}` (+ `bias{i}`) for
  GroupedLinear, each (out_features, in_features). Without a bias, `bias` / `bias{i}` is an
  empty plain tensor attribute, not a parameter.
- `state_dict()` carries an `_extra_state` entry (get_extra_state): an empty uint8 tensor until
  the module has run in FP8 with a stateful recipe; with delayed scaling, a uint8 tensor of a
  pickled dict (recipe, scales, amax histories) whose size changes after the first FP8 forward.
- GroupedLinear reads `weight{i}` at every forward and takes `m_splits` (a list or an int64
  tensor of num_gemms row counts).
- FP8 dimension checks: Linear's input and weight need a leading-dimension product divisible by
  8 and a last dimension divisible by 16 (TE's assert_dim_for_fp8_exec, ValueError);
  GroupedLinear's splits must be multiples of TE's quantisation alignment (16, 32 for MXFP8;
  TE's Fp8Padding pads to it), checked here with a ValueError.

Left out (no GPU): TE's "needs CUDA" checks on construction and on the input, tensor/sequence
parallelism, userbuffers, FP8 parameters, weight caching across micro-batches, CUDA graphs.
Numerics: quantization.py.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from model.fp8.gemm import fp8_linear, grouped_fp8_linear

from . import quantization as Q


def _default_init_method() -> Callable:
    return lambda t: torch.nn.init.normal_(t, mean=0.0, std=0.023)


def _check_fp8_dims(*tensors: torch.Tensor) -> None:
    for t in tensors:
        lead = math.prod(t.shape[:-1])
        if lead % 8 or t.shape[-1] % 16:
            raise ValueError("FP8 execution requires the product of all dimensions except the last to be divisible "
                             f"by 8 and the last dimension to be divisible by 16, but got tensor with dims="
                             f"{list(t.shape)} (product of leading dims = {lead}, last dim = {t.shape[-1]})")


class TransformerEngineBaseModule(torch.nn.Module):
    """What TE's base module gives both modules: deferred init, FP8 state, `_extra_state`."""

    def __init__(self, name: Optional[str] = None) -> None:
        super().__init__()
        self.name = name
        self.fp8 = False  # ran in an enabled autocast (TE sets it in prepare_forward)
        self.fp8_meta: dict = {"fp8_checkpoint": False}
        self._init_fns: dict[str, Callable] = {}
        self._amax_history: Optional[dict] = None  # delayed scaling only: {"fwd", "bwd"} → (history, slots)

    def _register(self, name: str, shape: tuple, device, dtype, init_fn: Callable) -> None:
        self.register_parameter(name, torch.nn.Parameter(torch.empty(*shape, device=device, dtype=dtype)))
        self._init_fns[name] = init_fn

    def reset_parameters(self, defer_init: bool = False) -> None:
        """Initialise every parameter with its init function; a no-op when deferred (meta)."""
        if defer_init:
            return
        with torch.no_grad():
            for name, param in self.named_parameters(recurse=False):
                self._init_fns[name](param)

    def _prepare_forward(self, num_gemms: int) -> Optional[object]:
        """The active recipe's emulation spec (None: high precision); records FP8 state as TE does."""
        recipe = Q.active_recipe()
        if recipe is None:
            return None
        self.fp8 = True
        self.fp8_meta["recipe"] = recipe
        if recipe.delayed():
            # TE's delayed-scaling metadata: per GEMM 3 forward slots (input, weight, output) and
            # 2 backward slots (grad output, grad input), each with an amax history and a scale.
            shapes = {"fwd": 3 * num_gemms, "bwd": 2 * num_gemms}
            if self._amax_history is None or self._amax_history["fwd"].shape != (recipe.amax_history_len,
                                                                                  shapes["fwd"]):
                self._amax_history = {k: torch.zeros(recipe.amax_history_len, n) for k, n in shapes.items()}
                self._scale = {k: torch.ones(n) for k, n in shapes.items()}
        return Q.emulation_spec(recipe)

    def _record_amaxes(self, *tensors: torch.Tensor) -> None:
        """Delayed scaling only: this forward's amaxes of its first forward slots, newest row first
        (bookkeeping for `_extra_state`; the emulated scales come from the current amax)."""
        recipe = self.fp8_meta.get("recipe")
        if self._amax_history is None or recipe is None or not recipe.delayed():
            return
        with torch.no_grad():
            hist = torch.roll(self._amax_history["fwd"], 1, 0)
            for slot, t in enumerate(tensors):
                hist[0, slot] = t.detach().abs().amax().float().cpu() if t.numel() else 0.0
            self._amax_history["fwd"] = hist

    def get_extra_state(self) -> torch.Tensor:
        """TE's checkpointed FP8 metadata: empty unless the module ran FP8 with delayed scaling."""
        recipe = self.fp8_meta.get("recipe")
        if not (self.fp8 or self.fp8_meta["fp8_checkpoint"]) or recipe is None or not recipe.delayed():
            return torch.empty(0, dtype=torch.uint8)
        state = {"recipe": recipe, "extra_fp8_variables": {"fp8_checkpoint": True}}
        for k in ("fwd", "bwd"):
            state[f"scale_{k}"] = self._scale[k].clone()
            state[f"amax_history_{k}"] = self._amax_history[k].clone()
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is None:
            return
        if isinstance(state, torch.Tensor):
            if state.numel() == 0:
                return
            state = pickle.loads(state.detach().cpu().numpy().tobytes())
        elif isinstance(state, io.BytesIO):
            raise RuntimeError("TE stand-in: the deprecated io.BytesIO extra state needs unsafe unpickling")
        else:
            raise RuntimeError("Unsupported checkpoint format.")
        self.fp8_meta.update(state["extra_fp8_variables"])
        self.fp8_meta["recipe"] = state["recipe"]
        self._scale = {k: state[f"scale_{k}"].clone() for k in ("fwd", "bwd")}
        self._amax_history = {k: state[f"amax_history_{k}"].clone() for k in ("fwd", "bwd")}


class Linear(TransformerEngineBaseModule):
    """y = x Wᵀ (+ b); TE's drop-in nn.Linear (stand-in: emulated FP8 inside an enabled autocast)."""

    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, rng_tracker_name: Optional[str] = None,
                 init_method: Optional[Callable] = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 parameters_split=None, device: Union[torch.device, str] = "cuda", ub_overlap_ag: bool = False,
                 ub_overlap_rs: bool = False, ub_overlap_rs_dgrad: bool = False, ub_bulk_dgrad: bool = False,
                 ub_bulk_wgrad: bool = False, ub_name: Optional[str] = None, delay_wgrad_compute: bool = False,
                 symmetric_ar_type: Optional[str] = None, save_original_input: bool = False,
                 name: Optional[str] = None) -> None:
        super().__init__(name)
        unsupported = {"sequence_parallel": sequence_parallel, "fuse_wgrad_accumulation": fuse_wgrad_accumulation,
                       "tp_group": tp_group is not None, "tp_size": tp_size != 1, "parallel_mode": parallel_mode,
                       "parameters_split": parameters_split, "return_bias": return_bias,
                       "get_rng_state_tracker": get_rng_state_tracker, "delay_wgrad_compute": delay_wgrad_compute,
                       "userbuffers": any((ub_overlap_ag, ub_overlap_rs, ub_overlap_rs_dgrad, ub_bulk_dgrad,
                                           ub_bulk_wgrad)), "symmetric_ar_type": symmetric_ar_type}
        used = [k for k, v in unsupported.items() if v]
        if used:
            raise NotImplementedError(f"TE stand-in: Linear options not emulated: {', '.join(used)}")
        dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.in_features, self.out_features = in_features, out_features
        self.use_bias = bias
        self._register("weight", (out_features, in_features), device, dtype, init_method or _default_init_method())
        if bias:
            self._register("bias", (out_features,), device, dtype, torch.nn.init.zeros_)
        else:
            self.bias = torch.Tensor().to(dtype=dtype, device=device)
        self.reset_parameters(defer_init=torch.device(device).type == "meta")

    def forward(self, inp: torch.Tensor, is_first_microbatch: Optional[bool] = None, fp8_output: bool = False,
                fp8_grad: bool = False) -> torch.Tensor:
        if inp.size(-1) != self.in_features:
            raise AssertionError("GEMM not possible")
        spec = self._prepare_forward(1)
        if spec is None:
            out = F.linear(inp, self.weight.to(inp.dtype))
        else:
            _check_fp8_dims(inp, self.weight)
            self._record_amaxes(inp, self.weight)
            out = fp8_linear(inp, self.weight.to(inp.dtype), spec)
        return out + self.bias.to(out.dtype) if self.use_bias else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.use_bias} [TE stand-in]"


class GroupedLinear(TransformerEngineBaseModule):
    """num_gemms linears over consecutive row splits of one input: y[split i] = x[split i] W_iᵀ."""

    def __init__(self, num_gemms: int, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, rng_tracker_name: Optional[str] = None,
                 init_method: Optional[Callable] = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 device: Union[torch.device, str] = "cuda", ub_overlap_rs: bool = False,
                 ub_overlap_ag: bool = False, ub_name: Optional[str] = None, delay_wgrad_compute: bool = False,
                 save_original_input: bool = False, single_grouped_weight: bool = False,
                 single_grouped_bias: bool = False, name: Optional[str] = None,
                 use_grouped_tensor: Optional[bool] = None) -> None:
        super().__init__(name)
        if ub_overlap_rs or ub_overlap_ag:
            raise ValueError("GroupedLinear doesn't support Userbuffer overlap.")
        unsupported = {"sequence_parallel": sequence_parallel, "fuse_wgrad_accumulation": fuse_wgrad_accumulation,
                       "tp_group": tp_group is not None, "tp_size": tp_size != 1, "parallel_mode": parallel_mode,
                       "return_bias": return_bias, "get_rng_state_tracker": get_rng_state_tracker,
                       "delay_wgrad_compute": delay_wgrad_compute, "single_grouped_weight": single_grouped_weight,
                       "single_grouped_bias": single_grouped_bias}
        used = [k for k, v in unsupported.items() if v]
        if used:
            raise NotImplementedError(f"TE stand-in: GroupedLinear options not emulated: {', '.join(used)}")
        dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.num_gemms, self.in_features, self.out_features = num_gemms, in_features, out_features
        self.use_bias = bias
        for i in range(num_gemms):
            self._register(f"weight{i}", (out_features, in_features), device, dtype,
                           init_method or _default_init_method())
            if bias:
                self._register(f"bias{i}", (out_features,), device, dtype, torch.nn.init.zeros_)
            else:
                setattr(self, f"bias{i}", torch.Tensor().to(dtype=dtype, device=device))
        self.reset_parameters(defer_init=torch.device(device).type == "meta")

    def forward(self, inp: torch.Tensor, m_splits, is_first_microbatch: Optional[bool] = None,
                out: Optional[torch.Tensor] = None, dgrad_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is not None or dgrad_out is not None:
            raise NotImplementedError("TE stand-in: preallocated out / dgrad_out buffers are not emulated")
        splits = m_splits.tolist() if isinstance(m_splits, torch.Tensor) else list(m_splits)
        if len(splits) != self.num_gemms:
            raise ValueError(f"Shape of splits tensor ({(len(splits),)}) does not match number of GEMMs "
                             f"({self.num_gemms}).")
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]  # re-read every call, as TE
        if inp.size(-1) != self.in_features:
            raise ValueError(f"Input tensor (shape={tuple(inp.size())}) is not compatible with weight tensor "
                             f"(shape={tuple(weights[0].size())})")
        x = inp.reshape(-1, self.in_features)
        if sum(splits) != x.size(0):
            raise ValueError(f"m_splits sum to {sum(splits)}, the input has {x.size(0)} rows")
        w = torch.stack([wi.to(x.dtype) for wi in weights])  # (E, N, K); gradients flow back to each weight{i}
        spec = self._prepare_forward(self.num_gemms)
        if spec is None:
            y = torch.cat([F.linear(xs, w[i]) for i, xs in enumerate(x.split(splits))]) if x.size(0) else \
                x.new_zeros(0, self.out_features)
        else:
            align = Q.align_size(self.fp8_meta["recipe"])
            if any(n % align for n in splits):
                raise ValueError(f"FP8 grouped GEMM: every m_split must be a multiple of {align} "
                                 f"(pad with Fp8Padding), got {splits}")
            self._record_amaxes(x)
            y = grouped_fp8_linear(x, w, splits, spec)
        if self.use_bias:
            y = y + torch.repeat_interleave(torch.stack([getattr(self, f"bias{i}") for i in range(self.num_gemms)]),
                                            torch.tensor(splits), dim=0).to(y.dtype)
        return y.view(*inp.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"num_gemms={self.num_gemms}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.use_bias} [TE stand-in]")
