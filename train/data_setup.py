"""Dataset resolution for the trainer: check before any process group, prepare on demand, build loaders.

`check_dataset` runs in every process before distributed init: a missing manifest, a damaged
or truncated shard (size check; SHA-256 is verified by rank 0 before training reads it), a
newer manifest format, a vocabulary larger than the model's, or a split too small for one batch
(`check_batch_fits`) are one-line errors there. A dataset prepared on demand gets the same
checks from `ensure_dataset` once rank 0 has prepared it.

A mixture (`data.sources`, data/mixture.py) gets the same checks for every source, plus: the
config's own errors (data.path and data.sources both set, a weight negative, NaN or infinite,
every weight 0, a duplicate name), a source whose train split holds no sequence, and sources
prepared with different tokenizers — each one line naming `data.sources[i]`, before any
process group or file. `build_loaders` then builds a MixtureLoader, and validation loaders per
source (`val_loss/<name>`). One source without a cap reads through the plain loader, exactly as
`data.path` does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from data.errors import DataError
from data.loader import ShardedTokenLoader
from data.mixture import MixtureLoader, check_sources
from data.shards import check_sizes, read_manifest, split_entry, verify
from data.stream import TokenStream

from .config import Config

CACHE = Path(os.environ.get("MOEFORGE_CACHE", Path.home() / ".cache" / "moeforge"))


def mixture_sources(cfg: Config) -> list:
    """data.sources checked (names filled in); [] when the run reads data.path."""
    return check_sources(cfg.data.sources) if cfg.data.sources else []


def _plain(cfg: Config) -> bool:
    """One source, no cap: the plain loader (the order and state of data.path)."""
    sources = mixture_sources(cfg)
    return not sources or (len(sources) == 1 and not sources[0].epochs)


def dataset_paths(cfg: Config) -> list[Path]:
    """Every dataset the run reads: data.path's (or the prepared cache's), or each source's."""
    return [Path(s.path).expanduser() for s in mixture_sources(cfg)] or [dataset_path(cfg)]


def dataset_path(cfg: Config) -> Path:
    """The dataset the run reads (a mixture's first source: the one the run summary's unigram entropy reads)."""
    d = cfg.data
    if getattr(d, "sources", None):
        first = d.sources[0]  # a SourceConfig, or a dict where trainer.json's config is read back
        return Path(first["path"] if isinstance(first, dict) else first.path).expanduser()
    if d.path:
        return Path(d.path).expanduser()
    if d.prepare_input:
        tok = Path(d.tokenizer).name if d.tokenizer != "byte" else "byte"
        return CACHE / "datasets" / f"{Path(d.prepare_input).name}-{tok}"
    raise DataError("data.path: required (a data.prepare output folder), or set data.prepare_input or data.sources")


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
    """Cheap checks of the dataset(s) against the model, in every process, before anything is built.

    world_size: the number of processes (default: torchrun's WORLD_SIZE, else 1), for the data-
    parallel size of `check_batch_fits`.
    """
    cfg.data.validate()
    sources = mixture_sources(cfg)
    path = dataset_path(cfg)
    if not sources and cfg.data.prepare_input and not _prepared(path):
        return  # rank 0 prepares it after init; checked then
    world = _world_size() if world_size is None else world_size
    if not sources:
        _check_one(cfg, read_manifest(path), world)
        return
    manifests = []
    for i, s in enumerate(sources):
        where = f"data.sources[{i}] ({s.name})"
        try:
            m = read_manifest(Path(s.path).expanduser())
            _check_one(cfg, m, world, mixture=True)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        manifests.append(m)
        first = manifests[0]
        for key in ("sha256", "vocab_size"):
            if m["tokenizer"].get(key) != first["tokenizer"].get(key):
                raise DataError(f"{where}: prepared with another tokenizer than data.sources[0] ({sources[0].name}): "
                                f"tokenizer {key} {m['tokenizer'].get(key)} vs {first['tokenizer'].get(key)}")


def _check_one(cfg: Config, m: dict, world_size: int, mixture: bool = False) -> None:
    if m["vocab_size"] > cfg.model.vocab_size:
        raise DataError(f"{m['_path']}: tokenizer vocab_size {m['vocab_size']} exceeds model.vocab_size="
                        f"{cfg.model.vocab_size} (token ids would be out of range)")
    for split in ("train", "val"):
        split_entry(m, split)
    check_sizes(m)
    if not mixture:
        check_batch_fits(cfg, m, world_size)
        return
    # In a mixture a global batch draws from every source: each needs one sequence (and, when
    # evaluating, one micro-step of its val split: val_loss/<name>).
    t = cfg.trainer
    tokens = int(split_entry(m, "train")["tokens"])
    if max(tokens - 1, 0) // t.seq_len < 1:
        raise DataError(f"{m['_path']}: split 'train' has {tokens:,} tokens, no sequence of trainer.seq_len="
                        f"{t.seq_len} (an empty source)")
    if t.eval_interval:
        dp = max(world_size // max(cfg.parallel.pp, 1), 1)
        need = t.micro_batch_size * dp
        val = int(split_entry(m, "val")["tokens"])
        if max(val - 1, 0) // t.seq_len < need:
            raise DataError(f"{m['_path']}: split 'val' has {val:,} tokens, fewer than one batch of "
                            f"trainer.micro_batch_size={t.micro_batch_size} × dp={dp} sequences × trainer.seq_len="
                            f"{t.seq_len}; set trainer.eval_interval=0, or prepare with a larger val_fraction")


def ensure_dataset(cfg: Config, rank: int) -> Path:
    """Prepare on demand (rank 0), verify sizes and SHA-256 (rank 0), then let every rank proceed."""
    path = dataset_path(cfg)
    error = [None]
    if rank == 0:
        try:
            if not cfg.data.sources and cfg.data.prepare_input and not _prepared(path):
                from data.prepare import PrepareConfig, prepare

                print(f"preparing {cfg.data.prepare_input} with tokenizer {cfg.data.tokenizer} into {path} (once)")
                prepare(PrepareConfig(input=cfg.data.prepare_input, output=str(path), tokenizer=cfg.data.tokenizer,
                                      progress=False).validate())
            world = dist.get_world_size() if dist.is_initialized() else _world_size()
            if cfg.data.sources:
                for i, s in enumerate(mixture_sources(cfg)):
                    try:
                        verify(Path(s.path).expanduser(), vocab_size=cfg.model.vocab_size)
                    except DataError as exc:
                        raise DataError(f"data.sources[{i}] ({s.name}): {exc}") from None
                check_dataset(cfg, world)
            else:
                m = verify(path, vocab_size=cfg.model.vocab_size)
                check_batch_fits(cfg, m, world)
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
    train/trainer.py). With a mixture (data.sources; `path` is then not read) the factory returns
    {source name: validation loader} and the training loader is a MixtureLoader.
    """
    t, d = cfg.trainer, cfg.data
    per_micro_step = t.micro_batch_size * dp_size
    # With a fixed batch the loader's global batch is the step's, so epochs end at the same
    # sequence for every dp; a batch-size ramp needs the finer micro-step grid.
    train_batch = per_micro_step if cfg.schedule.batch_ramp_tokens > 0 else t.global_batch_size
    sources = mixture_sources(cfg)
    if sources and _plain(cfg):
        path = Path(sources[0].path).expanduser()
    if not sources or _plain(cfg):
        train = ShardedTokenLoader(path, t.seq_len, t.micro_batch_size, train_batch, dp_rank, dp_size, t.seed,
                                   split="train", num_workers=d.num_workers, document_aware=d.document_aware)

        def val_factory():
            return ShardedTokenLoader(path, t.seq_len, t.micro_batch_size, per_micro_step, dp_rank, dp_size, t.seed,
                                      split="val", num_workers=0, document_aware=d.document_aware,
                                      num_batches=t.eval_batches)

        return train, val_factory

    rank0 = int(os.environ.get("RANK", 0)) == 0
    train = MixtureLoader(sources, t.seq_len, t.micro_batch_size, train_batch, dp_rank, dp_size, t.seed,
                          split="train", num_workers=d.num_workers, document_aware=d.document_aware,
                          log=lambda line: rank0 and print(f"data: {line}", file=sys.stderr, flush=True))

    def val_factory():
        return {s.name: ShardedTokenLoader(Path(s.path).expanduser(), t.seq_len, t.micro_batch_size, per_micro_step,
                                           dp_rank, dp_size, t.seed, split="val", num_workers=0,
                                           document_aware=d.document_aware, num_batches=t.eval_batches)
                for s in sources}

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
