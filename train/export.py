"""`python -m train.export checkpoint=<dir> output=<dir> [dtype=bf16|fp32|fp16] [shard_mb=5000] [overwrite=false]`

Write a Hugging Face folder from a moeforge checkpoint saved at any layout: config.json +
safetensors (`transformers` loads it as deepseek_v3, or deepseek_v2 for softmax routing),
generation_config.json and the run's tokenizer, so `AutoTokenizer.from_pretrained(output)` and
`AutoModelForCausalLM.from_pretrained(output)` both load it. No process group, no DeepSpeed.

It streams: the checkpoint's tensors are layout-independent (parallel/state.py `Reader` reads
any range of one), so each output tensor — one routed expert's projection at a time — is read,
renamed (model/hf_names.py), cast to `dtype` (default bf16; the router's correction bias stays
float32) and written straight into its shard file (model/hf_stream.py). Peak memory is about
the largest tensor in float32 plus its cast, not the model: a 671B model exports on a host
with a few GB free. Shards hold at most `shard_mb` MB (10^6 bytes), listed by
model.safetensors.index.json when there is more than one.

`checkpoint` is one checkpoint (`…/step-00001000`) or a checkpoint directory (its newest
checkpoint whose manifest verifies). The manifest is verified before anything is read; the
output appears only when complete (data/durable.py). The tokenizer comes from the data
manifest of the run (trainer.json's data.path): the byte tokenizer is written as an equivalent
tokenizer.json; a Hugging Face tokenizer's files are copied from where data.prepare read them
when they still hash to what the manifest recorded (a warning otherwise, and no tokenizer).
generation_config.json holds the tokenizer's bos/eos/pad ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from data.cli import parse_args, run, usage
from data.errors import DataError


@dataclasses.dataclass
class ExportArgs:
    checkpoint: str
    output: str
    dtype: str = "bf16"  # bf16 | fp32 (the master weights as trained) | fp16
    shard_mb: float = 5000  # largest safetensors file, MB (a larger single tensor gets its own)
    overwrite: bool = False


def load_model(path: Path):
    """The single-process Transformer of checkpoint `path` (weights and router biases)."""
    import torch

    from model import Transformer
    from model.config import ModelConfig
    from parallel import state as pstate

    from . import checkpoint_dir as ckpt

    meta = ckpt.read_trainer_state(path)
    cfg = ModelConfig.from_dict(dict(meta["model"])).validate()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(0)  # also builds the RoPE tables (non-persistent buffers); every weight is then read
    pstate.restore(pstate.Reader(path), model, None, cfg.n_routed_experts, step=0, with_optimizer=False)
    return model.eval()


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def checkpoint_entries(reader, cfg, dtype):
    """The output tensors of a checkpoint, in file order, each read lazily from `reader`."""
    import math

    import torch

    from model import Transformer
    from model.hf_names import MTP_SHARED, file_order, hf_name
    from model.hf_stream import Entry
    from parallel import state as pstate

    with torch.device("meta"):
        model = Transformer(cfg)
    pstate.check_shapes(reader, model, cfg.n_routed_experts)
    nonzero_bias = []

    def source(name: str, start: int, numel: int):
        kind = "param" if reader.has("param", name) else "buffer"

        def read():
            t = reader.read(kind, name, start, numel)
            if cfg.score_func == "softmax" and name.endswith("e_score_correction_bias") and t.any():
                nonzero_bias.append(name)
            return t
        return read

    entries = []
    state = model.state_dict()
    for name, t in state.items():
        if name.endswith("_extra_state"):
            continue
        out_dtype = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        hf = hf_name(cfg, name)
        if isinstance(hf, tuple):  # stacked routed experts → one tensor per expert
            prefix, proj = hf
            per = math.prod(t.shape[1:])
            for j in range(t.shape[0]):
                entries.append(Entry(f"{prefix}mlp.experts.{j}.{proj}.weight", tuple(t.shape[1:]), out_dtype,
                                     source(name, j * per, per)))
        else:
            entries.append(Entry(hf, tuple(t.shape), out_dtype, source(name, 0, t.numel())))
    for k in range(cfg.n_mtp_layers):  # the released layout's copies of the shared embedding and head
        for ours, hf in MTP_SHARED.items():
            entries.append(Entry(f"model.layers.{cfg.n_layers + k}.{hf}", tuple(state[ours].shape), dtype,
                                 source(ours, 0, state[ours].numel())))
    entries.sort(key=lambda e: file_order(e.name))
    return entries, nonzero_bias


_BOS_NAMES = ["<|bos|>", "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<bos>"]


def tokenizer_files(meta: dict, model_max_length: int) -> tuple[dict[str, bytes], dict | None]:
    """(tokenizer files, generation_config) of the run's dataset; warns and returns what it can."""
    from data.errors import UserError
    from data.shards import read_manifest
    from data.tokenizer import BOS, SPECIAL_TOKENS

    from .data_setup import dataset_path

    data = (meta.get("config") or {}).get("data")
    if not data:
        _warn("trainer.json records no data config: no tokenizer or generation_config.json written")
        return {}, None
    try:
        path = dataset_path(SimpleNamespace(data=SimpleNamespace(**{"path": "", "prepare_input": "",
                                                                    "tokenizer": "byte", **data})))
        manifest = read_manifest(path)
    except UserError as exc:
        _warn(f"the run's dataset is unreadable ({exc}): no tokenizer or generation_config.json written")
        return {}, None
    ident = manifest["tokenizer"]
    gen = {"eos_token_id": manifest["eos_id"]}
    if manifest.get("pad_id") is not None:
        gen["pad_token_id"] = manifest["pad_id"]
    if ident.get("kind") == "byte":
        from model.hf_stream import byte_tokenizer_files

        gen = {"bos_token_id": 256 + SPECIAL_TOKENS.index(BOS), **gen}
        return byte_tokenizer_files(model_max_length), gen
    spec = (manifest.get("config") or {}).get("tokenizer", "")
    file = Path(spec).expanduser()
    if not file.exists() and spec:  # a name data.prepare found in the Hugging Face cache
        from data.tokenizer import HFTokenizer

        file = HFTokenizer._auto_folder(spec, file) or file
    file = file / "tokenizer.json" if file.is_dir() else file
    if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != ident.get("sha256"):
        why = "no longer exists" if not file.is_file() else "has changed since data.prepare read it"
        _warn(f"tokenizer {file} {why}: no tokenizer written (copy its files into the export by hand)")
        return {}, gen
    files = {"tokenizer.json": file.read_bytes()}
    config = {}
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if (file.parent / extra).is_file():
            files[extra] = (file.parent / extra).read_bytes()
    try:
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
    except ValueError:
        config = {}
    vocab = json.loads(files["tokenizer.json"]).get("added_tokens", [])
    by_content = {t.get("content"): t.get("id") for t in vocab if isinstance(t, dict)}
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    for name in ([bos] if bos else []) + _BOS_NAMES:
        if name in by_content:
            gen = {"bos_token_id": by_content[name], **gen}
            break
    if "tokenizer_config.json" not in files:  # AutoTokenizer needs a class; config.json's model type has none
        eos = next((t for t, i in by_content.items() if i == manifest["eos_id"]), None)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length}
        cfg.update({k: v for k, v in (("eos_token", eos),) if v})
        files["tokenizer_config.json"] = (json.dumps(cfg, indent=2) + "\n").encode()
    return files, gen


def export(args: ExportArgs) -> Path:
    from model.config import ModelConfig
    from model.hf_config import to_hf_config
    from model.hf_stream import DTYPES, write_folder
    from parallel import state as pstate

    from . import checkpoint_dir as ckpt

    if args.dtype not in DTYPES:
        raise DataError(f"dtype={args.dtype!r}: must be one of {', '.join(DTYPES)}")
    if not args.shard_mb > 0:
        raise DataError(f"shard_mb={args.shard_mb}: must be > 0")
    source = Path(args.checkpoint)
    if not source.is_dir():
        raise ckpt.CheckpointError(f"checkpoint={source}: no such directory")
    if not (source / ckpt.MANIFEST).exists() and ckpt.complete_checkpoints(source):
        chosen = ckpt.select(source)
        if chosen is None:
            raise ckpt.CheckpointError(f"checkpoint={source}: no checkpoint in it verifies")
        source = chosen
    ckpt.verify(source)
    meta = ckpt.read_trainer_state(source)
    cfg = ModelConfig.from_dict(dict(meta["model"])).validate()
    dtype = DTYPES[args.dtype]
    entries, nonzero_bias = checkpoint_entries(pstate.Reader(source), cfg, dtype)
    extra, gen = tokenizer_files(meta, cfg.max_seq_len)
    if gen is not None:
        extra["generation_config.json"] = (json.dumps({**gen, "_from_model_config": False}, indent=2) + "\n").encode()
    write_folder(args.output, to_hf_config(cfg, dtype), entries, max_shard_bytes=int(args.shard_mb * 1e6),
                 overwrite=args.overwrite, extra_files=extra)
    if nonzero_bias:
        _warn(f"{args.output}: non-zero e_score_correction_bias ({nonzero_bias[0]}) in a softmax model: "
              "transformers' deepseek_v2 has no such bias and ignores it, so it routes this model differently")
    return source


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(usage(__doc__, ExportArgs))
        return 0
    args = parse_args(argv, ExportArgs)
    source = export(args)
    print(f"exported {source} → {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
