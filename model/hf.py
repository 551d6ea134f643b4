"""Hugging Face interop: read and write DeepSeek-V3 (and V2-style softmax) checkpoint folders.

`load(path)` builds our Transformer from a transformers checkpoint folder (config.json plus
model.safetensors, or shards listed by model.safetensors.index.json); `save(model, path)` writes
one that `transformers.AutoModelForCausalLM.from_pretrained` runs with the same logits. Neither
imports transformers: it is only the external reference of the parity tests (tests/unit/test_hf.py).
The mappings live beside this module: model/hf_config.py (config.json ↔ ModelConfig, which
model type a model is written as) and model/hf_names.py (tensor names, the table of them).

Deviations of transformers from DeepSeek's reference (inference/model.py); we follow the reference:
- deepseek_v2 group_limited_greedy scores a group by its best expert, as DeepSeek's reference and
  we do for softmax routing, but zero-fills dropped groups where we mask them with -inf. Softmax
  scores are positive, so the two agree whenever the correction bias is zero (the next point).
- deepseek_v2 has no e_score_correction_bias. `save` still writes it (transformers reports it as
  unexpected and ignores it) so that `load` restores it, and warns when it is non-zero, because
  transformers then routes differently. A V2 folder without it loads with a zero bias.
- YaRN: transformers multiplies cos/sin by attention_factor = m(factor, mscale) / m(factor,
  mscale_all_dim) and the softmax scale by m(factor, mscale_all_dim)², with m(s, c) = 0.1·c·ln s + 1;
  the reference only has the latter, with our `mscale`. We write mscale = mscale_all_dim (as the
  released configs do, so attention_factor = 1) and refuse to load configs where attention_factor
  != 1, or with `truncate: false`. transformers applies YaRN whenever rope_type is "yarn", we when
  max_seq_len > original_seq_len: a yarn config with max_position_embeddings <= its
  original_max_position_embeddings (and factor > 1) is refused. A missing `factor` is
  max_position_embeddings / original_max_position_embeddings, as in transformers.
- transformers' deepseek_v3 router adds 1e-20 to the top-k normalizer; negligible.
- rope_interleave false (a non-interleaved layout some conversions use) is read by permuting
  the rotary rows of wq/wq_b and wkv_a into DeepSeek's interleaved pairs; `save` always writes
  rope_interleave true.

MTP and transformers: its forward never runs MTP layers, and from_pretrained ignores only the
released layer index (`_keys_to_ignore_on_load_unexpected = model\\.layers\\.61.*`); for other
depths its load report lists our MTP tensors as unexpected, a warning, and the model loads.
Its save_pretrained drops them: `load` of such a folder (num_nextn_predict_layers > 0, no MTP
tensors) warns and builds a model without MTP. Like transformers' generate(use_mtp=True) (and
vLLM), our training feeds depth 1 the main model's hidden state after its final norm and each
next depth the previous depth's normed output.

Checked against transformers 5.24.0 (torch 2.13, safetensors 0.8): parity of logits both ways
within 1e-4 in float32 (tests/unit/test_hf.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data.durable import durable_folder

from .hf_config import HFCheckpointError, parse_config, read_config, to_hf_config
from .hf_names import MTP_SHARED, TOP_NAMES, hf_name, hf_state_dict
from .mla import MLA
from .transformer import Transformer


# ---------------------------------------------------------------------------------------------
# Reading


class _Checkpoint:
    """The tensors of a folder by name, opened lazily; records which names were read."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._handles: dict[str, object] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = str(index)
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFCheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            self.files = {name: folder / f for name, f in weight_map.items()}
            for name, f in self.files.items():
                if not f.is_file():
                    raise HFCheckpointError(f"{index}: shard {f.name} (holding {name}) does not exist")
        else:
            self.where = str(folder)
            single = folder / "model.safetensors"
            paths = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
            if not paths:
                extra = " (pytorch_model.bin is not read: convert to safetensors)" if any(folder.glob("*.bin")) else ""
                raise HFCheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{extra}")
            self.files = {name: p for p in paths for name in self._open(p).keys()}
        self.used: set[str] = set()

    def _open(self, path: Path):
        key = str(path)
        if key not in self._handles:
            try:
                self._handles[key] = safe_open(key, framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise HFCheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        return self._handles[key]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `name`, which must have `shape` (what config.json implies)."""
        shape = tuple(shape)
        if name not in self.files:
            raise HFCheckpointError(f"{self.where}: missing tensor {name} (expected shape {shape} from config.json)")
        path = self.files[name]
        handle = self._open(path)
        try:
            actual = tuple(handle.get_slice(name).get_shape())
        except SafetensorError:
            raise HFCheckpointError(f"{path}: missing tensor {name} listed in the index") from None
        if actual != shape:
            raise HFCheckpointError(f"{path}: tensor {name} has shape {actual}, expected {shape} from config.json")
        self.used.add(name)
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def _deinterleave_rope_rows(model: Transformer) -> None:
    """Turn rotate-half rotary rows (pairs i, i+R/2) into DeepSeek's interleaved pairs (2i, 2i+1)."""
    cfg = model.cfg
    C, R = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    perm = torch.arange(R).view(2, R // 2).t().flatten()  # ours[2i] = theirs[i], ours[2i+1] = theirs[i+R/2]
    for m in model.modules():
        if isinstance(m, MLA):
            wq = m.wq.weight if cfg.q_lora_rank == 0 else m.wq_b.weight
            q = wq.view(cfg.n_heads, C + R, -1)  # (H, C+R, in)
            q[:, C:] = q[:, C:][:, perm]
            k = m.wkv_a.weight[cfg.kv_lora_rank:]  # (R, D)
            k.copy_(k[perm])


@torch.no_grad()
def load(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Transformer:
    """Our Transformer from a Hugging Face deepseek_v3 or deepseek_v2 checkpoint folder.

    Reads per-expert and fused expert layouts, single-file and sharded folders. MTP depths come
    from the tensors present (see the module docstring). `dtype` casts the model (default float32);
    the router bias stays float32. The model comes back in eval mode, as from_pretrained's.
    Raises HFCheckpointError, one line, for anything that does not map exactly: a missing,
    misshapen or unexpected tensor, or a config with no equivalent.
    """
    folder = Path(path)
    config_path = folder / "config.json"
    raw = read_config(folder)
    cfg, layout = parse_config(raw, str(config_path))
    ckpt = _Checkpoint(folder)
    try:
        n = cfg.n_layers
        present = 0
        while f"model.layers.{n + present}.eh_proj.weight" in ckpt:
            present += 1
        if present == 0 and cfg.n_mtp_layers > 0:
            warnings.warn(f"{folder}: config.json declares {cfg.n_mtp_layers} MTP layer(s) but the folder has no MTP "
                          "weights (transformers' save_pretrained drops them); loading without MTP", stacklevel=2)
        elif present < cfg.n_mtp_layers:
            ckpt.get(f"model.layers.{n + present}.eh_proj.weight", (cfg.dim, 2 * cfg.dim))  # raises: missing
        elif present > cfg.n_mtp_layers:
            raise HFCheckpointError(f"{ckpt.files[f'model.layers.{n + cfg.n_mtp_layers}.eh_proj.weight']}: "
                                    f"unexpected MTP layer {n + cfg.n_mtp_layers} (config.json declares "
                                    f"num_nextn_predict_layers={cfg.n_mtp_layers})")
        cfg = dataclasses.replace(cfg, n_mtp_layers=present)
        model = Transformer(cfg)
        if dtype is not None:
            model.to(dtype)
        state = model.state_dict()
        for name, param in state.items():
            if name.endswith("_extra_state"):
                continue
            hf = hf_name(cfg, name)
            if isinstance(hf, tuple):
                _load_experts(ckpt, hf, param, name)
            elif hf.endswith("e_score_correction_bias") and layout.model_type == "deepseek_v2" and hf not in ckpt:
                param.zero_()  # V2 has no correction bias
            elif hf == "lm_head.weight" and hf not in ckpt and layout.tie_word_embeddings:
                param.copy_(state["embed.weight"])
            else:
                param.copy_(ckpt.get(hf, param.shape))
        for k in range(cfg.n_mtp_layers):
            for ours, hf in MTP_SHARED.items():
                hf = f"model.layers.{n + k}.{hf}"
                if hf in ckpt and not torch.equal(ckpt.get(hf, state[ours].shape).to(state[ours].dtype), state[ours]):
                    raise HFCheckpointError(f"{ckpt.files[hf]}: {hf} differs from {TOP_NAMES[ours]}; moeforge's MTP "
                                            "shares the main embedding and output head")
        unused = sorted(set(ckpt.files) - ckpt.used - {h for h in ckpt.files if h.endswith("rotary_emb.inv_freq")}
                        - {f"model.layers.{n + k}.{h}" for k in range(cfg.n_mtp_layers) for h in MTP_SHARED.values()})
        if unused:
            more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
            raise HFCheckpointError(f"{ckpt.files[unused[0]]}: unexpected tensor {unused[0]}{more} "
                                    "(no such weight in a model with this config.json)")
        if not layout.rope_interleave:
            _deinterleave_rope_rows(model)
    finally:
        ckpt.close()
    return model.eval()


def _load_experts(ckpt: _Checkpoint, hf: tuple[str, str], param: torch.Tensor, name: str) -> None:
    prefix, proj = hf
    E = param.size(0)
    fused = prefix + ("mlp.experts.down_proj" if proj == "down_proj" else "mlp.experts.gate_up_proj")
    if fused in ckpt:
        if proj == "down_proj":
            param.copy_(ckpt.get(fused, param.shape))
        else:
            F_, D = param.shape[1:]
            both = ckpt.get(fused, (E, 2 * F_, D))  # [gate; up] along F
            param.copy_(both[:, :F_] if proj == "gate_proj" else both[:, F_:])
        return
    for j in range(E):
        param[j].copy_(ckpt.get(f"{prefix}mlp.experts.{j}.{proj}.weight", param.shape[1:]))



# ---------------------------------------------------------------------------------------------
# Writing


@torch.no_grad()
def save(model: Transformer, path: str | os.PathLike, *, overwrite: bool = False,
         max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as a Hugging Face checkpoint folder (config.json + safetensors) at `path`.

    Sigmoid models become deepseek_v3, softmax ones deepseek_v2 (module docstring). Tensors keep
    the model's dtype; files are split at `max_shard_bytes` with a model.safetensors.index.json.
    Everything is written into a temporary folder next to `path`, fsynced and renamed at the end
    (data/durable.py), so a failure leaves no partial folder. A non-empty existing `path` is
    replaced only with overwrite=True.
    """
    cfg = model.cfg
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise HFCheckpointError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise HFCheckpointError(f"{target}: folder is not empty (pass overwrite=True to replace it)")
    if cfg.score_func == "softmax":
        if any(m.e_score_correction_bias.any() for m in model.modules() if hasattr(m, "e_score_correction_bias")):
            warnings.warn(f"{target}: non-zero e_score_correction_bias in a softmax model: transformers' deepseek_v2 "
                          "has no such bias and ignores it, so it routes this model differently", stacklevel=2)
    tensors = hf_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with durable_folder(target) as tmp:
        config = to_hf_config(cfg, model.embed.weight.dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for file, shard in zip(names, shards):
            # Clones: expert slices and the MTP copies share storage, which safetensors refuses.
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in shard.items()}, str(tmp / file),
                      metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: file for file, shard in zip(names, shards) for k in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
