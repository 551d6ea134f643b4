"""Tokenizers for preparation: the built-in byte tokenizer, and any Hugging Face `tokenizer.json`.

- `byte`: ids 0–255 are the UTF-8 bytes, then the special tokens below (vocab 262, well under
  the smoke model's 512). Needs no file; lossless on any text.
- a path to a `tokenizer.json`, or a folder holding one (what `transformers`' `save_pretrained`
  and `tokenizers`' `save` write, and what `python -m data.train_tokenizer` produces). The
  end-of-document token comes from `tokenizer_config.json`'s `eos_token` when present, else from
  well-known names; FIM sentinels likewise (needed only when fim_rate > 0).
- any other name (`owner/name`, or a local folder without tokenizer.json): whatever
  `transformers.AutoTokenizer` finds locally or in its cache, with `local_files_only=True` (never
  a download: a missing one is a one-line error naming it). A fast tokenizer is needed; its
  `tokenizer.json` (the backend) encodes, its special tokens give EOS, BOS and padding.

BOS: `add_bos=auto` (the default) puts the tokenizer's BOS before each document when its
configuration says so — `add_bos_token` in tokenizer_config.json, else a post-processor that
adds BOS to an encoding — `true`/`false` force it. EOS always ends a document. Both ids and the
choice are recorded in the manifest (`bos_id`, `add_bos`, and in the tokenizer's identity).

Document text never turns into control tokens: a source file that literally contains
"<|eos|>" is encoded as ordinary text (`encode_special_tokens`), so the only EOS ids in a
shard are the ones preparation appends.

A tokenizer's identity (kind, name, vocab size, SHA-256 of its file) goes into the manifest, so
a dataset says exactly which vocabulary its ids belong to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import fim
from .errors import DataError

EOS, PAD, BOS = "<|eos|>", "<|pad|>", "<|bos|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
SPECIAL_TOKENS = [EOS, PAD, BOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX]  # byte ids 256…261, in this order

_EOS_NAMES = [EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>"]
_PAD_NAMES = [PAD, "<pad>", "<|padding|>", "<｜▁pad▁｜>"]
# (prefix, middle, suffix) sentinels; DeepSeek-Coder's begin/end/hole play those roles.
_FIM_NAMES = [(FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX), ("<fim_prefix>", "<fim_middle>", "<fim_suffix>"),
              ("<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜fim▁hole｜>")]

@dataclass(frozen=True)
class FimIds:
    prefix: int
    middle: int
    suffix: int

class ByteTokenizer:
    """UTF-8 bytes as ids 0–255, then SPECIAL_TOKENS from 256."""

    kind = "byte"
    name = "byte"

    def __init__(self, add_bos: str = "auto"):
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.eos_id = 256 + SPECIAL_TOKENS.index(EOS)
        self.pad_id = 256 + SPECIAL_TOKENS.index(PAD)
        self.bos_id = 256 + SPECIAL_TOKENS.index(BOS)
        self.add_bos = _resolve_bos("byte", add_bos, False, self.bos_id)
        self.fim = FimIds(*(256 + SPECIAL_TOKENS.index(t) for t in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def encode_utf8_documents(self, docs: list[bytes], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """What `encode_documents(self, texts, …)` returns without FIM, from the texts' UTF-8 bytes:
        the ids back to back, each document followed by EOS, as `dtype`, and each document's length.

        One join of the chunk (a NUL after each document, where EOS goes), one widening copy, and
        one scatter of the EOS ids: no per-document array.
        """
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)) + 1
        docs.append(b"")  # the join then ends with a separator too
        try:
            joined = b"\0".join(docs)
        finally:
            docs.pop()
        out = np.frombuffer(joined, dtype=np.uint8).astype(dtype)
        out[np.cumsum(lengths) - 1] = self.eos_id
        return out, lengths

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            else:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(SPECIAL_TOKENS[i - 256] if i - 256 < len(SPECIAL_TOKENS) else f"<|{i}|>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def identity(self) -> dict:
        spec = json.dumps({"bytes": 256, "special_tokens": SPECIAL_TOKENS}).encode()
        ident = {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size,
                 "sha256": hashlib.sha256(spec).hexdigest()}
        if self.add_bos:  # the default (no BOS) keeps the identity datasets were prepared with
            ident.update(add_bos=True, bos_id=self.bos_id)
        return ident


def _resolve_bos(spec: str, option: str, default: bool, bos_id: int | None) -> bool:
    choice = str(option).lower()
    add = default if choice == "auto" else choice == "true"
    if add and bos_id is None:
        raise DataError(f"add_bos={option}: tokenizer={spec} has no BOS token")
    return add

_BOS_NAMES = [BOS, "<s>", "<|begin_of_text|>", "<bos>", "<｜begin▁of▁sentence｜>"]


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.endswith(".json") or spec.count("/") > 1 or "\\" in spec


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from tokenizer.json, or a fast `transformers` tokenizer by name."""

    kind = "huggingface"

    def __init__(self, spec: str, add_bos: str = "auto"):
        from tokenizers import Tokenizer

        path = Path(spec).expanduser()
        auto = None
        if not path.exists():
            if _looks_like_path(spec):
                raise DataError(f"tokenizer={spec}: no such file or folder (use 'byte', a tokenizer.json, "
                                "a folder saved by transformers/tokenizers, or a name in the Hugging Face cache)")
            auto = self._auto(spec)
        elif path.is_dir() and not (path / "tokenizer.json").is_file():
            auto = self._auto(spec)  # e.g. a sentencepiece folder that transformers converts
        if auto is not None:  # the cached tokenizer.json when there is one (its bytes are its identity)
            folder = self._auto_folder(spec, path)
            file = folder / "tokenizer.json" if folder is not None and (folder / "tokenizer.json").is_file() else None
            raw = file.read_bytes() if file is not None else auto.backend_tokenizer.to_str().encode("utf-8")
            self.name = spec
        else:
            file = path / "tokenizer.json" if path.is_dir() else path
            if not file.is_file():
                raise DataError(f"tokenizer={spec}: no tokenizer.json in this folder")
            raw = file.read_bytes()
            self.name = file.parent.name if file.name == "tokenizer.json" else file.stem
            folder = file.parent
        try:
            self.tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(f"tokenizer={file or spec}: not a Hugging Face tokenizer.json ({exc})") from None
        self.tok.encode_special_tokens = True  # document text never becomes a control token
        self.file = file
        self.sha256 = hashlib.sha256(raw).hexdigest()
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        if auto is not None:  # its tokenizer_config.json (add_bos_token), special tokens as transformers reads them
            config = self._config(folder)
            config.update(eos_token=auto.eos_token, pad_token=auto.pad_token, bos_token=auto.bos_token)
        else:
            config = self._config(folder)
        self.eos_id = self._find(spec, vocab, config.get("eos_token"), _EOS_NAMES, "end-of-document (eos)")
        pad = self._lookup(vocab, config.get("pad_token"), _PAD_NAMES)
        self.pad_id = pad
        self.bos_id = self._lookup(vocab, config.get("bos_token"), _BOS_NAMES)
        default = config.get("add_bos_token")
        if not isinstance(default, bool):  # no setting: does the tokenizer's post-processor add BOS?
            probe = self.tok.encode("a", add_special_tokens=True).ids
            default = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self.add_bos = _resolve_bos(spec, add_bos, default, self.bos_id)
        self.fim = None
        for names in _FIM_NAMES:
            if all(n in vocab for n in names):
                self.fim = FimIds(*(vocab[n] for n in names))
                break

    @staticmethod
    def _auto(spec: str):
        """A fast tokenizer that transformers finds locally or in its cache (no download)."""
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError(f"tokenizer={spec}: loading a tokenizer by name needs `transformers` "
                            "(pip install transformers), or give a tokenizer.json") from None
        try:
            auto = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"tokenizer={spec}: not a local tokenizer and not in the Hugging Face cache "
                            f"(nothing is downloaded: fetch it first, e.g. `hf download {spec}`; {reason})") from None
        if not getattr(auto, "is_fast", False):
            raise DataError(f"tokenizer={spec}: only fast tokenizers (with a tokenizer.json) are supported")
        return auto

    @staticmethod
    def _auto_folder(spec: str, path: Path) -> Path | None:
        if path.is_dir():
            return path
        try:
            from transformers.utils import cached_file

            found = cached_file(spec, "tokenizer_config.json", local_files_only=True,
                                _raise_exceptions_for_missing_entries=False)
        except Exception:
            return None
        return Path(found).parent if found else None

    @staticmethod
    def _config(folder: Path | None) -> dict:
        if folder is None:
            return {}
        cfg = folder / "tokenizer_config.json"
        try:
            return json.loads(cfg.read_text()) if cfg.is_file() else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _lookup(vocab: dict, configured, names: list[str]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        if isinstance(configured, str) and configured in vocab:
            return vocab[configured]
        for n in names:
            if n in vocab:
                return vocab[n]
        return None

    def _find(self, spec, vocab, configured, names, what) -> int:
        found = self._lookup(vocab, configured, names)
        if found is None:
            raise DataError(f"tokenizer={spec}: no {what} token (set eos_token in tokenizer_config.json, "
                            f"or add one of {', '.join(names[:4])})")
        return found

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def identity(self) -> dict:
        ident = {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size, "sha256": self.sha256}
        if self.add_bos:
            ident.update(add_bos=True, bos_id=self.bos_id)
        return ident

def load_tokenizer(spec: str, add_bos: str = "auto"):
    """`byte`, a path to a tokenizer.json / a folder, or a name transformers finds locally. DataError when unusable."""
    if spec == "byte":
        return ByteTokenizer(add_bos)
    return HFTokenizer(spec, add_bos)

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (halves disk and page cache), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)

def _fim_plan(texts: list[str], keys, rate: float, seed: int) -> list:
    """fim.plan over documents with the given keys (an int: consecutive keys from it), one call per
    run of consecutive keys."""
    if rate <= 0 or isinstance(keys, (int, np.integer)):
        return fim.plan(texts, int(keys) if not isinstance(keys, np.ndarray) else 0, rate, seed)
    keys = np.asarray(keys, dtype=np.uint64)
    out: list = []
    breaks = np.flatnonzero(np.diff(keys.astype(np.int64)) != 1) + 1 if len(keys) > 1 else np.empty(0, int)
    bounds = [0, *breaks.tolist(), len(texts)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.extend(fim.plan(texts[a:b], int(keys[a]), rate, seed))
    return out


def encode_documents(tok, texts: list[str], keys, dtype: np.dtype,
                     fim_rate: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents with FIM keys `keys` (an array, one per document, or an int: keys
    keys, keys+1, …): their ids back to back (BOS first when the tokenizer adds it, each ending in
    EOS, FIM applied where drawn) as `dtype`, and the length of each document."""
    spans = _fim_plan(texts, keys, fim_rate, seed)
    encoded = tok.encode_batch(fim.pieces(texts, spans))
    bos = 1 if getattr(tok, "add_bos", False) else 0
    lengths = np.empty(len(texts), dtype=np.int64)
    j = 0
    for i, span in enumerate(spans):
        n = 1 if span is None else 3
        lengths[i] = sum(len(e) for e in encoded[j:j + n]) + 1 + bos + (0 if span is None else 3)
        j += n
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos, j = 0, 0
    for span in spans:
        if bos:
            out[pos] = tok.bos_id
            pos += 1
        if span is None:
            e = encoded[j]
            out[pos:pos + len(e)] = e
            pos += len(e)
            j += 1
        else:  # PSM: <prefix> prefix <suffix> suffix <middle> middle
            for sentinel, e in zip((tok.fim.prefix, tok.fim.suffix, tok.fim.middle), encoded[j:j + 3]):
                out[pos] = sentinel
                out[pos + 1:pos + 1 + len(e)] = e
                pos += 1 + len(e)
            j += 3
        out[pos] = tok.eos_id
        pos += 1
    return out, lengths
