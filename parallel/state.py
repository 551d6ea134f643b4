"""Layout-independent model and optimizer state: what a checkpoint holds, read back at any layout.

Every tensor is addressed by its single-process name (`layers.3.attn.wq_a.weight`, the names
`model.Transformer` has) and a range of its flattened global shape. Routed experts are one global
tensor per weight (`layers.1.ffn.experts.w1`, shape (E, F, D)); an expert-parallel shard holds
the contiguous rows [expert_offset, expert_offset + n_local). Each rank writes only what it owns —
its ZeRO partition (DeepSpeed's `_hp_mapping` fragments of the fp32 master weights and Adam
moments), or, without ZeRO, whole tensors on one replica — with no collective, and reads back
any range it needs, whatever layout wrote the files.

Followed: torchtitan's / PyTorch DCP's design (per-rank files of named fragments plus a global
index, resharding on load), not DeepSpeed's native `save_checkpoint`: DeepSpeed's files are
pickles (they need `torch.load(weights_only=False)`), are tied to the layout that wrote them
(a full load across a dp or ep change fails, docs/checkpoints.md) and to its MoE module
paths. DeepSpeed still owns the state; this module only reads it out of and writes it into the
engine's own tensors (the lp parameters, the fp32 partitions and the base optimizer's state).
Files are safetensors, so loading never unpickles.
"""

from __future__ import annotations

import json
import math
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data.durable import StreamWriter
from data.errors import UserError
from model.moe import Experts

KINDS = ("param", "exp_avg", "exp_avg_sq")  # AdamW's state; "buffer" for persistent buffers
INDEX = "index.json"  # train/checkpoint_dir.py write_index writes it


class StateError(UserError):
    """A checkpoint's tensors do not fit this model (names the tensor)."""


@dataclass
class Slot:
    """Where a local tensor sits in its global tensor."""

    name: str  # single-process name
    shape: tuple[int, ...]  # global shape
    offset: int  # flat offset of the local tensor in the global tensor (expert shards)
    tensor: torch.Tensor


def _canonical(name: str, module: nn.Module) -> str | None:
    """The single-process name of `name` in `module` (a LossModule, a Transformer or a PipelineModule)."""
    from parallel.pipeline import BlockPipe

    if name.startswith("model."):  # trainer.LossModule
        return name[len("model."):]
    head, _, rest = name.partition(".")
    if head == "tied_modules":  # pipeline: the tied input embedding
        key, _, rest = rest.partition(".")
        return f"{key}.{rest}"
    if head.isdigit() and hasattr(module, "forward_funcs"):  # a PipelineModule layer
        layer = module.get_submodule(head)
        if isinstance(layer, BlockPipe):
            if not rest.startswith("block."):
                return None  # rope tables etc.
            return f"layers.{layer.block.layer_id}.{rest[len('block.'):]}"
        return rest  # OutputPipe: norm., head., mtp.
    return name


def _addresses(module: nn.Module, n_routed_experts: int) -> tuple[list[tuple], list[tuple]]:
    """Where this rank's parameters and persistent buffers live, worked out once per module:
    (single-process name, owning submodule, attribute, expert offset or None) each. The tensors
    themselves are looked up again on every call (`slots`), so a parameter or buffer replaced
    since is never missed; walking the module tree and its state_dict on every save cost ~2 ms
    of an asynchronous save's blocking time at the smoke size."""
    plan = _ADDRESSES.get(module)
    if plan is not None and plan[0] == n_routed_experts:
        return plan[1], plan[2]
    expert_of = {id(p): m.expert_offset for m in module.modules() if isinstance(m, Experts) for p in (m.w1, m.w2, m.w3)}

    def owner(name: str) -> tuple[nn.Module, str]:
        head, _, attr = name.rpartition(".")
        return (module.get_submodule(head) if head else module), attr

    params = []
    for name, p in module.named_parameters():
        cname = _canonical(name, module)
        if cname is None:
            raise StateError(f"{name}: no single-process name for this parameter")
        params.append((cname, *owner(name), expert_of.get(id(p))))
    param_names = {n for n, _ in module.named_parameters()}
    buffers = []
    for name, b in module.state_dict(keep_vars=True).items():
        # `_extra_state` is a module's get_extra_state(): Transformer Engine's FP8 metadata, a
        # pickle whose size changes after the first FP8 forward under delayed scaling (a resume
        # then failed on its shape) and that exists under one precision backend only. It is not
        # model state: TE's stateless recipes (blockwise, current, mxfp8) keep nothing in it, and
        # checkpoints never hold pickles; delayed scaling restarts its amax history on resume.
        if name in param_names or b is None or name.endswith("_extra_state"):
            continue
        cname = _canonical(name, module)
        if cname is not None:
            mod, attr = owner(name)
            if mod._buffers.get(attr) is not b:  # state a module adds to its state_dict by hand
                raise StateError(f"{name}: in the state_dict but not a buffer of its module (not saved)")
            buffers.append((cname, mod, attr))
    _ADDRESSES[module] = (n_routed_experts, params, buffers)
    return params, buffers


_ADDRESSES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def slots(module: nn.Module, n_routed_experts: int) -> tuple[list[Slot], list[Slot]]:
    """(parameters, persistent buffers) of this rank's module with their global addresses."""
    params, buffers = [], []
    where_params, where_buffers = _addresses(module, n_routed_experts)
    for cname, mod, attr, expert in where_params:
        p = mod._parameters[attr]
        if expert is None:
            params.append(Slot(cname, tuple(p.shape), 0, p))
        else:
            params.append(Slot(cname, (n_routed_experts, *p.shape[1:]), expert * math.prod(p.shape[1:]), p))
    for cname, mod, attr in where_buffers:
        b = mod._buffers.get(attr)
        if b is not None:
            buffers.append(Slot(cname, tuple(b.shape), 0, b))
    return params, buffers


# --------------------------------------------------------------------- reading the engine
def _flat_state(optimizer, group_index: int) -> tuple[torch.Tensor, dict]:
    """The fp32 partition of a ZeRO / BF16_Optimizer param group and its base optimizer state."""
    base = optimizer.optimizer
    flat = base.param_groups[group_index]["params"][0]
    return flat, base.state.setdefault(flat, {})


def _plain_optimizer(optimizer):
    """The torch optimizer holding per-parameter state (stage 0 without a wrapper)."""
    return getattr(optimizer, "optimizer", optimizer) if not hasattr(optimizer, "state") else optimizer


def _partitioned(optimizer) -> bool:
    """ZeRO-1/2 or DeepSpeed's BF16_Optimizer: fp32 master weights and moments live in flat
    partitions; a parameter without `_hp_mapping` has its fragment on another rank."""
    return hasattr(optimizer, "single_partition_of_fp32_groups") or hasattr(optimizer, "fp32_groups_flat_partition")


def adam_step(optimizer) -> int:
    """The optimizer's step count (every parameter group steps together)."""
    base = getattr(optimizer, "optimizer", optimizer)
    for state in base.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def fragments(module: nn.Module, optimizer, n_routed_experts: int, owner: bool, expert_owner: bool):
    """This rank's share of the state: [(kind, name, global_start, 1-D tensor)] and global shapes.

    ZeRO: the rank's fp32 fragments. Without ZeRO every replica holds everything and only the
    owner writes (dp rank 0 of its stage; for expert shards the expert-data-parallel rank 0).
    Tied pipeline replicas (`ds_pipe_replicated`) are written by the first stage only.
    """
    params, buffers = slots(module, n_routed_experts)
    out, shapes = [], {}
    plain, partitioned = None, _partitioned(optimizer)
    for s in params:
        p = s.tensor
        shapes[s.name] = s.shape
        if getattr(p, "ds_pipe_replicated", False):
            continue
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            if lp.numel == 0:
                continue
            flat, state = _flat_state(optimizer, mapping.param_group_index)
            start = s.offset + lp.start
            out.append(("param", s.name, start, flat.narrow(0, hp.start, hp.numel)))
            for kind in KINDS[1:]:
                if kind in state:
                    out.append((kind, s.name, start, state[kind].narrow(0, hp.start, hp.numel)))
            continue
        if partitioned:
            continue  # another rank of its (expert-)data-parallel group holds this parameter's fragment
        is_expert = getattr(p, "allreduce", True) is False
        if not (expert_owner if is_expert else owner):
            continue
        plain = plain or _plain_optimizer(optimizer)
        out.append(("param", s.name, s.offset, p.detach().reshape(-1)))
        state = plain.state.get(p, {})
        for kind in KINDS[1:]:
            if kind in state:
                out.append((kind, s.name, s.offset, state[kind].reshape(-1)))
    if owner:
        for s in buffers:
            shapes[s.name] = s.shape
            out.append(("buffer", s.name, 0, s.tensor.detach().reshape(-1)))
    return out, shapes


def file_layout(frags: list) -> tuple[list[list], bytes, list[int], int]:
    """A rank file's index rows, its header (length prefix included) and the order of the
    fragments in the file: safetensors' layout, every tensor float32 and 1-D, in name order as
    its own writer orders them, the JSON padded with spaces to a multiple of 8; and the bytes of
    tensor data."""
    rows = [[kind, name, start, t.numel()] for kind, name, start, t in frags]
    keys = [f"{kind}:{name}:{start}" for kind, name, start, _ in rows]
    order = sorted(range(len(frags)), key=keys.__getitem__)
    header, offset = {}, 0
    for i in order:
        n = rows[i][3]
        header[keys[i]] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return rows, struct.pack("<Q", len(head)) + head, order, offset


def write_rank_file(path: Path, frags: list, crash=None) -> tuple[list[list], dict]:
    """Write fragments into one safetensors file, fsynced; returns the index rows [kind, name,
    start, numel] and the file's record {"size", "sha256"} for the manifest.

    The file is streamed tensor by tensor (`file_layout`), each tensor's bytes straight from its
    memory, through data/durable.py `StreamWriter` (O_DIRECT where allowed, SHA-256 as the
    bytes go). Nothing is serialised into one buffer first and nothing is read back
    (bench/checkpoint.py). `crash()` runs halfway through the write (fault injection: a rank
    killed mid-write)."""
    rows, head, order, data_bytes = file_layout(frags)
    out = StreamWriter(path)
    try:
        out.write(head)
        written = 0
        for t in (frags[i][3] for i in order):
            flat = t.detach().reshape(-1).to("cpu", torch.float32).contiguous()
            out.write(memoryview(flat.numpy()).cast("B"))
            written += 4 * flat.numel()
            if crash is not None and written * 2 >= data_bytes:
                out.flush_partial()
                crash()
                crash = None
    finally:
        record = out.close()
    return rows, record


# --------------------------------------------------------------------- reading a checkpoint
class Reader:
    """Ranges of the global tensors of a checkpoint directory (any layout wrote it)."""

    def __init__(self, root: Path):
        from safetensors import safe_open

        self.root = Path(root)
        try:
            index = json.loads((self.root / INDEX).read_text())
            self.shapes = {k: tuple(v) for k, v in index["shapes"].items()}
            self.fragments = index["fragments"]
        except (OSError, ValueError, KeyError) as exc:
            raise StateError(f"{self.root / INDEX}: unreadable index ({exc})") from None
        self._open = safe_open
        self._handles = {}
        self._check_coverage()

    def _check_coverage(self) -> None:
        for kind, per_name in self.fragments.items():
            for name, frs in per_name.items():
                total = math.prod(self.shapes.get(name, (0,)))
                pos = 0
                for start, numel, fname in frs:
                    if start != pos:
                        raise StateError(f"{self.root / INDEX}: {kind} of {name} has a gap or overlap at "
                                         f"element {pos} (next fragment starts at {start}, file {fname})")
                    pos = start + numel
                if pos != total:
                    raise StateError(f"{self.root / INDEX}: {kind} of {name} covers {pos} of {total} elements")

    def has(self, kind: str, name: str) -> bool:
        return name in self.fragments.get(kind, {})

    def names(self, kind: str = "param") -> list[str]:
        return sorted(self.fragments.get(kind, {}))

    def _file(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = self._open(str(self.root / fname), framework="pt")
        return self._handles[fname]

    def read(self, kind: str, name: str, start: int = 0, numel: int | None = None) -> torch.Tensor:
        """Elements [start, start + numel) of the flattened global tensor, as float32."""
        frs = self.fragments.get(kind, {}).get(name)
        if frs is None:
            raise StateError(f"{self.root}: no {kind} for {name} in the checkpoint")
        total = math.prod(self.shapes[name])
        numel = total - start if numel is None else numel
        if start < 0 or start + numel > total:
            raise StateError(f"{self.root}: range [{start}, {start + numel}) is outside {name} ({total} elements)")
        out = torch.empty(numel, dtype=torch.float32)
        for f_start, f_numel, fname in frs:
            lo, hi = max(start, f_start), min(start + numel, f_start + f_numel)
            if lo >= hi:
                continue
            piece = self._file(fname).get_slice(f"{kind}:{name}:{f_start}")[lo - f_start:hi - f_start]
            out[lo - start:hi - start] = piece
        return out


class WeightsOnly:
    """A reader's parameters and buffers, none of its optimizer state: `restore` through it sets
    the weights (and the fp32 master weights) and leaves the Adam moments as they are (fresh)."""

    def __init__(self, reader):
        self.reader, self.root, self.shapes = reader, reader.root, reader.shapes

    def has(self, kind: str, name: str) -> bool:
        return kind in ("param", "buffer") and self.reader.has(kind, name)

    def read(self, kind: str, name: str, start: int = 0, numel: int | None = None) -> torch.Tensor:
        return self.reader.read(kind, name, start, numel)


def check_shapes(reader: Reader, module: nn.Module, n_routed_experts: int) -> None:
    """Every parameter and buffer of this rank exists in the checkpoint with the same global shape."""
    params, buffers = slots(module, n_routed_experts)
    for s, kind in [(s, "param") for s in params] + [(s, "buffer") for s in buffers]:
        if not reader.has(kind, s.name):
            raise StateError(f"{reader.root}: the checkpoint has no {s.name} (this model has it, shape {list(s.shape)})")
        if reader.shapes[s.name] != s.shape:
            raise StateError(f"{reader.root}: {s.name} has shape {list(reader.shapes[s.name])} in the checkpoint, "
                             f"{list(s.shape)} in this model")


@torch.no_grad()
def restore(reader: Reader, module: nn.Module, optimizer, n_routed_experts: int, step: int,
            with_optimizer: bool = True) -> None:
    """Load this rank's parameters, buffers and (optionally) optimizer state from `reader`."""
    check_shapes(reader, module, n_routed_experts)
    params, buffers = slots(module, n_routed_experts)
    plain, partitioned = None, _partitioned(optimizer)
    for s in params:
        p = s.tensor
        p.copy_(reader.read("param", s.name, s.offset, p.numel()).view_as(p))
        if not with_optimizer:
            continue
        has_state = all(reader.has(k, s.name) for k in KINDS[1:])
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            flat, state = _flat_state(optimizer, mapping.param_group_index)
            start = s.offset + lp.start
            flat.narrow(0, hp.start, hp.numel).copy_(reader.read("param", s.name, start, lp.numel))
            if not has_state:
                continue
            if "exp_avg" not in state:
                state.update(step=torch.tensor(float(step)), exp_avg=torch.zeros_like(flat),
                             exp_avg_sq=torch.zeros_like(flat))
            state["step"] = torch.tensor(float(step))
            for kind in KINDS[1:]:
                state[kind].narrow(0, hp.start, hp.numel).copy_(reader.read(kind, s.name, start, lp.numel))
        elif has_state and not partitioned:
            plain = plain or _plain_optimizer(optimizer)
            plain.state[p] = {"step": torch.tensor(float(step)),
                              **{k: reader.read(k, s.name, s.offset, p.numel()).view_as(p).to(p.dtype).clone()
                                 for k in KINDS[1:]}}
    for s in buffers:
        s.tensor.copy_(reader.read("buffer", s.name).view(s.shape))
