"""Dataset resolution for the trainer: check before any process group, prepare on demand, build loaders.

`check_dataset` runs in every process before distributed init: a missing manifest, a damaged
or truncated shard (size check; SHA-256 is verified by rank 0 before training reads it), a
newer manifest format, a vocabulary larger than the model's, or a split too small for one batch
(`check_batch_fits`) are one-line errors there. A dataset prepared on demand gets the same
checks from `ensure_dataset` once rank 0 has prepared it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch.distributed as dist

from data.errors import DataError
from data.loader import ShardedTokenLoader
from data.shards import check_sizes, read_manifest, split_entry, verify
from data.stream import TokenStream

from .config import Config

CACHE = Path(os.environ.get("MOEFORGE_CACHE", Path.home() / ".cache" / "moeforge"))


def dataset_path(cfg: Config) -> Path:
    d = cfg.data
    if d.path:
        return Path(d.path).expanduser()
    if d.prepare_input:
        tok = Path(d.tokenizer).name if d.tokenizer != "byte" else "byte"
        return CACHE / "datasets" / f"{Path(d.prepare_input).name}-{tok}"
    raise DataError("data.path: required (a data.prepare output folder), or set data.prepare_input")


def _prepared(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; 1 for `python -m train`


def check_batch_fits(cfg: Config, m: dict, world_size: int) -> None:
    """DataError when a split holds fewer sequences than the loader built on it takes at once.

    A split of T tokens holds (T − 1) // seq_len sequences (data/loader.py). Training reads one
    global batch (trainer.global_batch_size sequences) at a time — with a batch-size ramp one
    micro-step, micro_batch_size × dp — and evaluation (trainer.eval_interval > 0) one micro-step
    of the val split.
    """
    t = cfg.trainer
    dp = max(world_size // max(cfg.parallel.pp, 1), 1)
    per_micro_step = t.micro_batch_size * dp
    need = {"train": per_micro_step if cfg.schedule.batch_ramp_tokens > 0 else t.global_batch_size}
    if t.eval_interval:
        need["val"] = per_micro_step
    for split, sequences in need.items():
        tokens = int(split_entry(m, split)["tokens"])
        have = max(tokens - 1, 0) // t.seq_len
        if have >= sequences:
            continue
        if split == "train" and cfg.schedule.batch_ramp_tokens <= 0:
            what = f"trainer.global_batch_size={t.global_batch_size} × trainer.seq_len={t.seq_len}"
        else:
            what = f"trainer.micro_batch_size={t.micro_batch_size} × dp={dp} sequences × trainer.seq_len={t.seq_len}"
        hint = ("set trainer.eval_interval=0, or prepare with a larger data.prepare val_fraction" if split == "val"
                else "use more data, or a smaller trainer.global_batch_size or trainer.seq_len")
        raise DataError(f"{m['_path']}: split '{split}' has {tokens:,} tokens ({have} sequences of {t.seq_len}), "
                        f"fewer than one batch: {what} = {sequences * t.seq_len + 1:,} tokens; {hint}")


def check_dataset(cfg: Config, world_size: int | None = None) -> None:
    """Cheap checks of the dataset against the model, in every process, before anything is built.

    world_size: the number of processes (default: torchrun's WORLD_SIZE, else 1), for the data-
    parallel size of `check_batch_fits`.
    """
    path = dataset_path(cfg)
    if cfg.data.prepare_input and not _prepared(path):
        return  # rank 0 prepares it after init; checked then
    m = read_manifest(path)
    if m["vocab_size"] > cfg.model.vocab_size:
        raise DataError(f"{m['_path']}: tokenizer vocab_size {m['vocab_size']} exceeds model.vocab_size="
                        f"{cfg.model.vocab_size} (token ids would be out of range)")
    for split in ("train", "val"):
        split_entry(m, split)
    check_sizes(m)
    check_batch_fits(cfg, m, _world_size() if world_size is None else world_size)


def ensure_dataset(cfg: Config, rank: int) -> Path:
    """Prepare on demand (rank 0), verify sizes and SHA-256 (rank 0), then let every rank proceed."""
    path = dataset_path(cfg)
    error = [None]
    if rank == 0:
        try:
            if cfg.data.prepare_input and not _prepared(path):
                from data.prepare import PrepareConfig, prepare

                print(f"preparing {cfg.data.prepare_input} with tokenizer {cfg.data.tokenizer} into {path} (once)")
                prepare(PrepareConfig(input=cfg.data.prepare_input, output=str(path), tokenizer=cfg.data.tokenizer,
                                      progress=False).validate())
            m = verify(path, vocab_size=cfg.model.vocab_size)
            check_batch_fits(cfg, m, dist.get_world_size() if dist.is_initialized() else _world_size())
        except DataError as exc:
            error[0] = str(exc)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise DataError(error[0])
    return path


def build_loaders(cfg: Config, path: Path, dp_rank: int, dp_size: int):
    """The training loader, and a factory of fresh validation loaders (same batches every evaluation).

    Each loader batch is one micro-batch per rank and a step takes grad_accum of them (see
    train/trainer.py).
    """
    t, d = cfg.trainer, cfg.data
    per_micro_step = t.micro_batch_size * dp_size
    # With a fixed batch the loader's global batch is the step's, so epochs end at the same
    # sequence for every dp; a batch-size ramp needs the finer micro-step grid.
    train_batch = per_micro_step if cfg.schedule.batch_ramp_tokens > 0 else t.global_batch_size
    train = ShardedTokenLoader(path, t.seq_len, t.micro_batch_size, train_batch, dp_rank, dp_size, t.seed,
                               split="train", num_workers=d.num_workers, document_aware=d.document_aware)

    def val_factory():
        return ShardedTokenLoader(path, t.seq_len, t.micro_batch_size, per_micro_step, dp_rank, dp_size, t.seed,
                                  split="val", num_workers=0, document_aware=d.document_aware,
                                  num_batches=t.eval_batches)

    return train, val_factory


def unigram_entropy(path: Path, max_tokens: int = 50_000_000) -> float | None:
    """Entropy (nats/token) of the training split's token frequencies: the loss of a context-free model."""
    try:
        stream = TokenStream(path, "train")
    except DataError:
        return None
    counts = None
    seen = 0
    for shard in stream.shards:
        arr = np.asarray(shard[: max_tokens - seen])
        c = np.bincount(arr, minlength=stream.manifest["vocab_size"])
        counts = c if counts is None else counts + c
        seen += arr.size
        if seen >= max_tokens:
            break
    if counts is None or counts.sum() == 0:
        return None
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
