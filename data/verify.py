"""`python -m data.verify path=… [vocab_size=…]` — check a prepared dataset before training on it.

Exit 0 and a one-line summary when every file matches the manifest (size and SHA-256) and,
with vocab_size, every token id fits the model; otherwise `error: …` naming the file, exit 2.
A merged dataset (data/merge.py) is checked the same way: its manifest lists the parts' files.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from . import cli
from .shards import verify


@dataclass
class VerifyConfig:
    path: str  # a data.prepare output folder (or its manifest.json)
    vocab_size: int = 0  # the model's vocab size (0 = do not check)
    hashes: bool = True  # SHA-256 of every file (false: sizes only)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(cli.usage(__doc__, VerifyConfig))
        return 0
    cfg = cli.parse_args(argv, VerifyConfig, positional="path")
    m = verify(cfg.path, vocab_size=cfg.vocab_size or None, hashes=cfg.hashes)
    files = sum(2 * len(s["shards"]) for s in m["splits"].values())
    tokens = sum(s["tokens"] for s in m["splits"].values())
    print(f"ok: {m['_path']}: {files} files, {tokens:,} tokens, vocab {m['vocab_size']}"
          + (f" fits vocab_size {cfg.vocab_size}" if cfg.vocab_size else "")
          + (f" (merged from {len(m['parts'])} parts)" if m.get("parts") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
