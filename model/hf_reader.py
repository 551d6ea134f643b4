"""A Hugging Face folder read as ranges of our global tensors: what `checkpoint.init_from` needs.

`HFRangeReader` has the interface of parallel/state.py's `Reader` (`root`, `shapes`, `has`,
`read(kind, name, start, numel)`), over a deepseek_v3 / deepseek_v2 folder that model/hf.py
`load` reads, so `parallel.state.restore` fills any layout's shard of the model from it: each
rank reads only the tensors it holds, and of the routed experts only the experts its range
covers (per-expert files, or slices of the fused layout). Names map through model/hf_names.py;
the V2 folder without correction bias reads zeros, a tied head reads the embedding, and
rotate-half rotary rows (rope_interleave false) are permuted as `load` does.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import ModelConfig
from .hf import _Checkpoint
from .hf_config import HFCheckpointError, parse_config, read_config
from .hf_names import hf_name

# The fields that must agree between a folder's config.json and the model it initializes (the
# rest — sequence length and YaRN, MTP depth, init_std — may differ: a run may fine-tune at
# another length, or with fewer MTP layers than the folder has).
SAME = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
        "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
        "score_func", "route_scale", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
        "v_head_dim", "rope_theta", "norm_eps")


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "index.json").is_file()


def check_compatible(root: Path, model: ModelConfig):
    """Raise HFCheckpointError naming the first architecture key where the folder's config.json
    differs from `model`; returns the folder's tensor layout. Reads config.json only."""
    hf_cfg, layout = parse_config(read_config(root), str(root / "config.json"))
    for f in SAME:
        a, b = getattr(hf_cfg, f), getattr(model, f)
        if a != b:
            raise HFCheckpointError(f"{root / 'config.json'}: model.{f} is {a!r} there but {b!r} in this "
                                    "run's model config")
    return layout


class HFRangeReader:
    def __init__(self, folder: str | Path, model: ModelConfig):
        self.root = Path(folder)
        self.layout = check_compatible(self.root, model)
        self.cfg = model
        self._ckpt = _Checkpoint(self.root)
        from .transformer import Transformer

        with torch.device("meta"):
            meta = Transformer(model)
        params = {n for n, _ in meta.named_parameters()}
        self.shapes = {n: tuple(t.shape) for n, t in meta.state_dict().items() if not n.endswith("_extra_state")}
        self._kinds = {"param": params, "buffer": set(self.shapes) - params}
        self._cache: tuple[str, torch.Tensor] | None = None

    def has(self, kind: str, name: str) -> bool:
        return name in self._kinds.get(kind, ())

    def names(self, kind: str = "param") -> list[str]:
        return sorted(self._kinds.get(kind, ()))

    def _whole(self, name: str) -> torch.Tensor:
        """One non-expert tensor of ours, as float32 (the last one is kept: restore reads it twice)."""
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        cfg, shape, hf = self.cfg, self.shapes[name], hf_name(self.cfg, name)
        if hf.endswith("e_score_correction_bias") and self.layout.model_type == "deepseek_v2" and hf not in self._ckpt:
            t = torch.zeros(shape)
        elif hf == "lm_head.weight" and hf not in self._ckpt and self.layout.tie_word_embeddings:
            t = self._ckpt.get("model.embed_tokens.weight", shape)
        else:
            t = self._ckpt.get(hf, shape)
        t = t.to(torch.float32)
        rotary = ("attn.wq.weight", "attn.wq_b.weight", "attn.wkv_a.weight")
        if not self.layout.rope_interleave and name.endswith(rotary):
            C, R = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
            perm = torch.arange(R).view(2, R // 2).t().flatten()
            t = t.clone()
            if name.endswith("wkv_a.weight"):
                t[cfg.kv_lora_rank:] = t[cfg.kv_lora_rank:][perm]
            else:
                q = t.view(cfg.n_heads, C + R, -1)
                q[:, C:] = q[:, C:][:, perm]
        self._cache = (name, t)
        return t

    def _experts(self, name: str, first: int, last: int) -> torch.Tensor:
        """Experts first..last-1 of a stacked expert weight, (last-first, ·, ·) float32."""
        prefix, proj = hf_name(self.cfg, name)
        E, A, B = self.shapes[name]
        fused = prefix + ("mlp.experts.down_proj" if proj == "down_proj" else "mlp.experts.gate_up_proj")
        if fused in self._ckpt:
            want = (E, A, B) if proj == "down_proj" else (E, 2 * A, B)
            handle = self._ckpt._open(self._ckpt.files[fused])
            actual = tuple(handle.get_slice(fused).get_shape())
            if actual != want:
                raise HFCheckpointError(f"{self._ckpt.files[fused]}: tensor {fused} has shape {actual}, "
                                        f"expected {want}")
            self._ckpt.used.add(fused)
            part = handle.get_slice(fused)[first:last]
            if proj != "down_proj":
                part = part[:, :A] if proj == "gate_proj" else part[:, A:]
            return part.to(torch.float32)
        return torch.stack([self._ckpt.get(f"{prefix}mlp.experts.{j}.{proj}.weight", (A, B)).to(torch.float32)
                            for j in range(first, last)])

    def read(self, kind: str, name: str, start: int = 0, numel: int | None = None) -> torch.Tensor:
        """Elements [start, start + numel) of our flattened global tensor `name`, as float32."""
        if not self.has(kind, name):
            raise HFCheckpointError(f"{self.root}: no {kind} for {name} in this model")
        shape = self.shapes[name]
        total = math.prod(shape)
        numel = total - start if numel is None else numel
        if numel == 0:
            return torch.empty(0)
        if isinstance(hf_name(self.cfg, name), tuple):
            per = math.prod(shape[1:])
            first, last = start // per, (start + numel - 1) // per + 1
            flat = self._experts(name, first, last).reshape(-1)
            return flat[start - first * per:start - first * per + numel].clone()
        return self._whole(name).reshape(-1)[start:start + numel].clone()

    def close(self) -> None:
        self._cache = None
        self._ckpt.close()
