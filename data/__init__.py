"""Data: raw text → tokenized shards (`python -m data.prepare`) → a resumable streaming loader.

Modules: errors (UserError, DataError), cli (key=value arguments), durable (atomic file writes),
corpus (inputs), tokenizer (byte / Hugging Face), fim (fill-in-the-middle), shards (format,
manifest, verify), shard_writer (the writer), prepare (the CLI), train_tokenizer (byte-level BPE
CLI), merge (one dataset over parts prepared on several machines), verify (CLI around shards.verify), permutation (the keyed global order), stream
(memory-mapped reads), loader (ShardedTokenLoader), mixture (MixtureLoader: weighted sources).
The package imports nothing heavy until asked: the preparation workers never import torch.

For the trainer:

    from data import DataError, ShardedTokenLoader, verify
    manifest = verify(path, vocab_size=model_cfg.vocab_size)      # before training reads anything
    loader = ShardedTokenLoader(path, seq_len, micro_batch_size, global_batch_size, dp_rank, dp_size, seed)
    batch = next(iter(loader)); state = loader.state_dict(); loader.load_state_dict(state)
    mixture = MixtureLoader([Source(a, 0.7), Source(b, 0.3)], seq_len, micro_batch_size, global_batch_size, …)
"""

from .errors import DataError

__all__ = ["DataError", "ShardedTokenLoader", "MixtureLoader", "Source", "verify", "read_manifest", "prepare",
           "PrepareConfig"]


def __getattr__(name: str):
    if name == "ShardedTokenLoader":
        from .loader import ShardedTokenLoader

        return ShardedTokenLoader
    if name in ("MixtureLoader", "Source"):
        from . import mixture

        return getattr(mixture, name)
    if name in ("verify", "read_manifest"):
        from . import shards

        return getattr(shards, name)
    if name in ("prepare", "PrepareConfig"):
        from . import prepare as _prepare

        return getattr(_prepare, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
