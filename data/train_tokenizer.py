"""`python -m data.train_tokenizer input=… output=… vocab_size=…` — train a byte-level BPE.

DeepSeek-V3 (§4.1) and DeepSeek-Coder use byte-level BPE: every byte is in the base alphabet,
so any text encodes without unknown tokens and decodes losslessly. Trained with Hugging Face
`tokenizers` on the same inputs `data.prepare` reads (data/corpus.py), with our special tokens
(EOS, PAD, BOS, FIM prefix/middle/suffix) at ids 0–5. Writes `tokenizer.json` and
`tokenizer_config.json` into `output` (temporary names, then renamed), which `data.prepare
tokenizer=<output>` and `transformers.PreTrainedTokenizerFast(tokenizer_file=…)` both load.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import cli
from .corpus import open_source
from .errors import DataError
from .tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS


@dataclass
class TrainTokenizerConfig:
    """Options of `python -m data.train_tokenizer` (key=value)."""

    input: str  # a file, a folder, 'stdlib', or a hub dataset name
    output: str  # folder to write tokenizer.json into (must not hold one)
    vocab_size: int = 32000  # including the 256 byte tokens and the special tokens
    min_frequency: int = 2  # merges seen fewer times are not learned
    text_key: str = "text"
    text_sample_by: str = "document"
    hub_split: str = "train"
    hub_config: str = ""
    skip_unknown: bool = False  # skip (and report) files of an unknown type instead of failing
    max_docs: int = 0  # train on at most this many documents (0 = all)
    max_chars: int = 0  # …or this many characters (0 = all)
    progress: bool = False


def train(cfg: TrainTokenizerConfig) -> Path:
    """Train and save; the path of the written tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    floor = 256 + len(SPECIAL_TOKENS)
    if cfg.vocab_size <= floor:
        raise DataError(f"vocab_size={cfg.vocab_size}: must exceed {floor} (256 bytes + {len(SPECIAL_TOKENS)} "
                        "special tokens)")
    if cfg.min_frequency < 1:
        raise DataError(f"min_frequency={cfg.min_frequency}: must be >= 1")
    if not cfg.output:
        raise DataError("output: required (a folder to write tokenizer.json into)")
    source = open_source(cfg.input, text_key=cfg.text_key, text_sample_by=cfg.text_sample_by,
                         hub_split=cfg.hub_split, hub_config=cfg.hub_config, skip_unknown=cfg.skip_unknown)
    out = Path(cfg.output).expanduser()
    target = out / "tokenizer.json"
    if out.exists() and not out.is_dir():
        raise DataError(f"output={out}: exists and is not a folder")
    if target.exists():
        raise DataError(f"output={out}: already holds tokenizer.json; choose another folder or delete it")

    def documents():
        chars = 0
        for i, text in enumerate(source.documents()):
            if (cfg.max_docs and i >= cfg.max_docs) or (cfg.max_chars and chars >= cfg.max_chars):
                return
            chars += len(text)
            yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=cfg.progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    errors: list[DataError] = []

    def guarded():  # a DataError raised inside the Rust trainer's callback is carried out here
        try:
            yield from documents()
        except DataError as exc:
            errors.append(exc)

    tok.train_from_iterator(guarded(), trainer=trainer)
    if errors:
        raise errors[0]
    if tok.get_vocab_size() <= floor:
        raise DataError(f"input={cfg.input}: no documents to learn merges from")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD, "bos_token": BOS,
              "model_max_length": 1_000_000_000, "clean_up_tokenization_spaces": False}
    tmp_tok, tmp_cfg = out / "tokenizer.json.tmp", out / "tokenizer_config.json.tmp"
    try:
        tok.save(str(tmp_tok))
        tmp_cfg.write_text(json.dumps(config, indent=1) + "\n")
        os.replace(tmp_cfg, out / "tokenizer_config.json")
        os.replace(tmp_tok, target)
    except BaseException:
        for p in (tmp_tok, tmp_cfg):
            p.unlink(missing_ok=True)
        if created:
            out.rmdir()
        raise
    return target


def main(argv: list[str]) -> int:
    cfg = cli.start(argv, __doc__, TrainTokenizerConfig)
    if cfg is None:
        return 0
    path = train(cfg)
    from tokenizers import Tokenizer

    print(f"trained byte-level BPE, vocab {Tokenizer.from_file(str(path)).get_vocab_size()} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
