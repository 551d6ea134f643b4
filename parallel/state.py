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
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data.durable import StreamWriter
from data.errors import UserError
from model.moe import Experts

KINDS = ("param", "exp_avg", "exp_avg_sq")  # AdamW's state; "buffer" for persistent buffers
INDEX = "index.json"


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


def slots(module: nn.Module, n_routed_experts: int) -> tuple[list[Slot], list[Slot]]:
    """(parameters, persistent buffers) of this rank's module with their global addresses."""
    expert_of = {}
    for m in module.modules():
        if isinstance(m, Experts):
            for p in (m.w1, m.w2, m.w3):
                expert_of[id(p)] = m.expert_offset
    params = []
    for name, p in module.named_parameters():
        cname = _canonical(name, module)
        if cname is None:
            raise StateError(f"{name}: no single-process name for this parameter")
        shape, offset = tuple(p.shape), 0
        if id(p) in expert_of:
            shape = (n_routed_experts, *p.shape[1:])
            offset = expert_of[id(p)] * math.prod(p.shape[1:])
        params.append(Slot(cname, shape, offset, p))
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


def _layout(frags: list) -> tuple[list[list], bytes, list[tuple[str, torch.Tensor]], int]:
    """A rank file's index rows, its header (length prefix included) and its entries in file
    order: safetensors' layout, every tensor float32 and 1-D, in name order as its own writer
    orders them, the JSON padded with spaces to a multiple of 8; and the bytes of tensor data."""
    rows, entries = [], []
    for kind, name, start, t in frags:
        entries.append((f"{kind}:{name}:{start}", t))
        rows.append([kind, name, start, t.numel()])
    entries.sort(key=lambda e: e[0])
    header, offset = {}, 0
    for key, t in entries:
        header[key] = {"dtype": "F32", "shape": [t.numel()], "data_offsets": [offset, offset + 4 * t.numel()]}
        offset += 4 * t.numel()
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return rows, struct.pack("<Q", len(head)) + head, entries, offset


def write_rank_file(path: Path, frags: list, crash=None) -> tuple[list[list], dict]:
    """Write fragments into one safetensors file, fsynced; returns the index rows [kind, name,
    start, numel] and the file's record {"size", "sha256"} for the manifest.

    The file is streamed tensor by tensor (`_layout`), each tensor's bytes straight from its
    memory, through data/durable.py `StreamWriter` (O_DIRECT where allowed, SHA-256 as the
    bytes go). Nothing is serialised into one buffer first and nothing is read back
    (bench/checkpoint.py). `crash()` runs halfway through the write (fault injection: a rank
    killed mid-write)."""
    rows, head, entries, data_bytes = _layout(frags)
    out = StreamWriter(path)
    try:
        out.write(head)
        written = 0
        for _, t in entries:
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


class RankImage:
    """A rank file laid out in host memory byte for byte as `write_rank_file` writes it: the
    asynchronous save's snapshot (train/checkpoint.py).

    `fill` copies the fragments into it on the training thread — the only part of an
    asynchronous save that blocks training; `write` then streams it to disk from the background
    straight from this memory (page-aligned: O_DIRECT without a staging copy, one thread, so
    that the writer takes at most one host core). The buffer is reused from save to save
    (pinned on a GPU machine, so the device-to-host copies run at full speed)."""

    SHARED_COPY = 1 << 26  # bytes from which a second thread shares the snapshot's copy

    def __init__(self):
        self._img: torch.Tensor | None = None
        self._keep = None  # the mapping behind a CPU image
        self.rows: list[list] = []
        self.size = 0

    def _buffer(self, size: int) -> torch.Tensor:
        if self._img is None or self._img.numel() < size:
            cap = -(-size // StreamWriter.CHUNK) * StreamWriter.CHUNK
            if torch.cuda.is_available():  # cudaHostAlloc memory is page-aligned
                self._img, self._keep = torch.empty(cap, dtype=torch.uint8, pin_memory=True), None
            else:  # an anonymous mapping is page-aligned, as O_DIRECT wants
                import mmap

                self._keep = mmap.mmap(-1, cap)
                self._img = torch.frombuffer(self._keep, dtype=torch.uint8)
        return self._img

    def fill(self, frags: list) -> None:
        rows, head, entries, data_bytes = _layout(frags)
        img = self._buffer(len(head) + data_bytes)
        img[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        pin = img.is_pinned()
        jobs, off = [], len(head)
        for _, t in entries:
            jobs.append((img.narrow(0, off, 4 * t.numel()).view(torch.float32), t.detach().reshape(-1)))
            off += 4 * t.numel()

        def copy(part):
            for dst, src in part:
                dst.copy_(src, non_blocking=pin and src.is_cuda)

        # Training waits for this copy: two threads share it (copy_ releases the GIL), the split
        # by bytes; a helper only where there is enough to share.
        half, cut = (off - len(head)) / 2, 0
        while cut < len(jobs) and half > 0:
            half -= jobs[cut][0].numel() * 4
            cut += 1
        if off - len(head) >= self.SHARED_COPY and 0 < cut < len(jobs):
            helper = threading.Thread(target=copy, args=(jobs[cut:],), name="checkpoint-snapshot")
            helper.start()
            copy(jobs[:cut])
            helper.join()
        else:
            copy(jobs)
        if pin:
            torch.cuda.synchronize()  # complete before the training thread goes on
        self.rows, self.size = rows, off

    def write(self, path: Path, crash=None) -> tuple[list[list], dict]:
        """The file, fsynced: (index rows, record) as `write_rank_file` returns them."""
        view = memoryview(self._img.numpy()).cast("B")[:self.size]
        out = StreamWriter(path, hash_thread=False)
        try:
            if crash is None:
                out.write(view)
            else:  # fault injection: killed halfway
                half = self.size // 2 - self.size // 2 % StreamWriter.ALIGN
                out.write(view[:half])
                out.flush_partial()
                crash()
                out.write(view[half:])
        finally:
            record = out.close()
        return self.rows, record


def write_index(path: Path, shapes: dict, files: dict[str, list[list]]) -> None:
    """index.json: every tensor's global shape and which file holds which range of it."""
    entries: dict[str, dict[str, list]] = {}
    for fname, rows in sorted(files.items()):
        for kind, name, start, numel in rows:
            entries.setdefault(kind, {}).setdefault(name, []).append([start, numel, fname])
    for per_kind in entries.values():
        for frs in per_kind.values():
            frs.sort()
    path.write_text(json.dumps({"format_version": 1, "shapes": {k: list(v) for k, v in shapes.items()},
                                "fragments": entries}, indent=1, sort_keys=True))


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
