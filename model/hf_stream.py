"""Write a Hugging Face safetensors folder one tensor at a time (used by `python -m train.export`).

`write_folder` takes the list of output tensors as `Entry`s (name, shape, dtype and a function
that reads the tensor), plans the shards from the shapes alone, and writes each shard file
directly: its safetensors header first (every offset is known from the shapes), then each
tensor's bytes as soon as it is read and cast. Only one tensor is in memory at a time, so the
peak is about the largest tensor (as read, plus its cast), whatever the model's or a shard's
size. The files are the format `safetensors.torch.save_file` writes (8-byte little-endian header
length, JSON header padded to 8 bytes, then the tensors back to back in header order).

Also here: the tokenizer files of the built-in byte tokenizer as a `tokenizers` tokenizer.json
(GPT-2's byte-to-character map with no merges: id b is byte b, then the special tokens), so
`transformers.AutoTokenizer` loads an export of a model trained on byte tokens.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from data.durable import durable_folder

from .hf_config import HFCheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass
class Entry:
    """One output tensor: its checkpoint name, shape and dtype, and how to read it (any float dtype)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive entries grouped into shards of at most max_shard_bytes (a larger tensor alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_shard(path: Path, entries: list[Entry]) -> None:
    """One safetensors file, each tensor read, cast and written in turn (one in memory at a time)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them on a big-endian host is not supported")
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _SAFETENSORS_DTYPE[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            t = e.read()
            if t.numel() != math.prod(e.shape):
                raise RuntimeError(f"{e.name}: read {t.numel()} elements, expected shape {e.shape}")
            t = t.detach().to("cpu", e.dtype).contiguous().reshape(-1)
            f.write(memoryview(t.view(torch.uint8).numpy()))
            del t


def write_folder(target: str | os.PathLike, config: dict, entries: list[Entry], *, max_shard_bytes: int,
                 overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> list[str]:
    """Write config.json, the shards (with model.safetensors.index.json when more than one) and
    `extra_files` into a temporary folder next to `target`, renamed into place when complete
    (data/durable.py). Returns the names of the safetensors files."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise HFCheckpointError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise HFCheckpointError(f"{target}: folder is not empty (pass overwrite=true to replace it)")
    shards = plan_shards(entries, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with durable_folder(target) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file, shard in zip(names, shards):
            write_shard(tmp / file, shard)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                     "weight_map": {e.name: file for file, shard in zip(names, shards) for e in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return names


# ---------------------------------------------------------------------------------------------
# The byte tokenizer as Hugging Face tokenizer files


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what tokenizers' ByteLevel uses)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer_files(model_max_length: int) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json equal to data/tokenizer.py's ByteTokenizer: id b is
    UTF-8 byte b (0–255), then SPECIAL_TOKENS from 256 in order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from data.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(256, 256 + len(SPECIAL_TOKENS))), ids
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "add_bos_token": False, "add_eos_token": False, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}
