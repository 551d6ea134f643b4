"""`python -m train.export checkpoint=<dir> output=<dir> [dtype=fp32|bf16] [overwrite=false]`

Write a Hugging Face folder (config.json + safetensors; `transformers` loads it as
deepseek_v3) from a moeforge checkpoint saved at any layout: the checkpoint's tensors are
layout-independent (parallel/state.py), so the full model is assembled on the CPU in one
process — no process group, no DeepSpeed. `checkpoint` is one checkpoint (`…/step-00001000`)
or a checkpoint directory (its newest checkpoint whose manifest verifies). The manifest is
verified before anything is read; the output appears only when complete (model/hf.py save).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from data.cli import parse_args, run, usage
from data.errors import DataError


@dataclasses.dataclass
class ExportArgs:
    checkpoint: str
    output: str
    dtype: str = "fp32"  # fp32 (the master weights) | bf16
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


def export(args: ExportArgs) -> Path:
    import torch

    from model import hf

    from . import checkpoint_dir as ckpt

    if args.dtype not in ("fp32", "bf16"):
        raise DataError(f"dtype={args.dtype!r}: must be fp32 or bf16")
    source = Path(args.checkpoint)
    if not source.is_dir():
        raise ckpt.CheckpointError(f"checkpoint={source}: no such directory")
    if not (source / ckpt.MANIFEST).exists() and ckpt.complete_checkpoints(source):
        chosen = ckpt.select(source)
        if chosen is None:
            raise ckpt.CheckpointError(f"checkpoint={source}: no checkpoint in it verifies")
        source = chosen
    ckpt.verify(source)
    model = load_model(source)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    hf.save(model, args.output, overwrite=args.overwrite)
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
