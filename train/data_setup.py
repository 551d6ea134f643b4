"""Dataset resolution for the trainer: check before any process group, prepare on demand, build loaders.

`check_dataset` runs in every process before distributed init: a missing manifest, a damaged
or truncated shard (size check; SHA-256 is verified by rank 0 before training reads it), a
newer manifest format or a vocabulary larger than the model's are one-line errors there.
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


def check_dataset(cfg: Config) -> None:
    """Cheap checks of the dataset against the model, in every process, before anything is built."""
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
            verify(path, vocab_size=cfg.model.vocab_size)
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
