"""Data pipeline benchmarks: the loader against a bare np.memmap loop, data.prepare against bare encoding.

Loader: tokens/s of ShardedTokenLoader at seq_len 4096 over memory-mapped shards (a synthetic
uint16 dataset written with data.shards, in the page cache), against a bare loop that slices
the same windows out of np.memmap's and wraps them with torch.from_numpy — the least any loader
must do. Both read the same shuffled windows; the baseline gets its window list for free
(computed before its clock starts). Goal: ≥ 50M tokens/s per process and ratio ≥ 0.8.

Preparation: tokens/s of `data.prepare` (list and read files, tokenize in `num_proc` processes,
EOS, write shards, hash, fsync, manifest) against the same tokenizer's batch encode called
directly on the same documents, already in memory, in a pool of the same number of processes
that returns the ids as numpy arrays. Byte tokenizer and a byte-level BPE trained on the
corpus. Goal: ratio ≥ 0.8. (With the byte tokenizer data.prepare encodes in the main process
and writes shards from a thread instead of using num_proc worker processes; the baseline keeps
its pool of num_proc processes.)

Split preparation: the same input prepared as `--shards` parts one after another on this machine
(`shard_index=i num_shards=n`: each part lists the input, finds its range, reads and encodes only
that) plus `data.merge` (manifests, SHA-256 of every part file, the merged manifest; no bytes
copied), against one preparation of the whole input. Its ratio is the overhead of splitting (on n
machines the parts run at once, so the wall time is about one part plus the merge). Goal: ≥ 0.9.

Runs alternate pipeline and baseline `--repeats` times; the table shows the best of each.

    python bench/data.py                       # both, full stdlib corpus, 128M-token loader set
    python bench/data.py --skip-prepare --tokens 64_000_000
    python bench/data.py --skip-loader --tokenizers byte   # preparation with the byte tokenizer only
    python bench/data.py --skip-loader --skip-prepare --tokenizers byte   # split preparation + merge only
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.loader import ShardedTokenLoader  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402
from data.shard_writer import ShardWriter  # noqa: E402
from data.shards import FORMAT, FORMAT_VERSION, write_json_atomic  # noqa: E402
from data.corpus import stdlib_files  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402


# ----------------------------------------------------------------------------- loader
def synthetic_dataset(root: Path, n_tokens: int, shard_tokens: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w = ShardWriter(root, "train", np.uint16, shard_tokens, eos_id=0)
    left = n_tokens
    while left:
        n = min(left, 1 << 24)
        lengths = rng.integers(200, 20_000, size=n // 5_000 + 2)
        lengths = lengths[np.cumsum(lengths) <= n]
        lengths = np.append(lengths, n - lengths.sum()) if lengths.sum() < n else lengths
        w.append(rng.integers(1, 50_000, size=n, dtype=np.uint16), lengths)
        left -= n
    entry = w.finish()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": 50_000,
                "eos_id": 0, "pad_id": None, "shard_tokens": shard_tokens, "tokenizer": {"kind": "synthetic"},
                "splits": {"train": entry, "val": {**entry, "shards": [], "tokens": 0, "documents": 0}}}
    write_json_atomic(root / "manifest.json", manifest)
    return root


def bare_memmap_loop(root: Path, starts: np.ndarray, seq_len: int, micro: int, shard_tokens: int) -> int:
    """The floor: slice each window from its shard's np.memmap into int64 arrays, wrap as tensors."""
    files = sorted((root / "train").glob("*.bin"))
    # ndarray views of the maps: slicing np.memmap objects directly costs ~4 µs of Python per slice.
    maps = [np.memmap(f, dtype=np.uint16, mode="r").view(np.ndarray) for f in files]
    tokens = 0
    for b in range(0, len(starts), micro):
        x = np.empty((micro, seq_len), dtype=np.int64)
        y = np.empty((micro, seq_len), dtype=np.int64)
        for j, s in enumerate(starts[b:b + micro].tolist()):
            k, local = divmod(s, shard_tokens)
            if local + seq_len + 1 <= len(maps[k]):
                x[j] = maps[k][local:local + seq_len]
                y[j] = maps[k][local + 1:local + seq_len + 1]
            else:
                buf = np.concatenate([maps[k][local:], maps[k + 1][:seq_len + 1 - (len(maps[k]) - local)]])
                x[j], y[j] = buf[:-1], buf[1:]
        batch = {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y)}
        tokens += batch["input_ids"].numel()
    return tokens


def loader_loop(root: Path, seq_len: int, micro: int, n_batches: int, **kw) -> int:
    loader = ShardedTokenLoader(root, seq_len, micro, micro, seed=0, num_batches=n_batches, **kw)
    tokens = 0
    for batch in loader:
        tokens += batch["input_ids"].numel()
    return tokens


def bench_overlap(root: Path, args) -> list[tuple]:
    """Step time with simulated compute per batch (single-thread torch matmuls, which release the
    GIL, as CUDA launches and syncs do): what prefetch buys. Cases interleave, `--repeats` × 2
    rounds, medians; data stall = step time − compute-only step time."""
    import statistics

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    reps = max(1, round(args.compute_ms * 1e-3 / ((time.perf_counter() - t) / 20)))

    def compute():
        for _ in range(reps):
            a @ a

    n = 200
    cases = {"compute only": None, **{f"ShardedTokenLoader, num_workers={nw}": nw for nw in (0, 1, 2)}}
    times = {name: [] for name in cases}
    for _ in range(2 * args.repeats):
        for name, nw in cases.items():
            t = time.perf_counter()
            if nw is None:
                for _ in range(n):
                    compute()
            else:
                for _ in ShardedTokenLoader(root, args.seq_len, args.micro, args.micro, seed=0, num_workers=nw,
                                            num_batches=n):
                    compute()
            times[name].append((time.perf_counter() - t) / n)
    med = {name: statistics.median(v) for name, v in times.items()}
    return [(name, m * 1e3, (m - med["compute only"]) * 1e6) for name, m in med.items()]


def bench_loader(args, tmp: Path) -> list[tuple]:
    shard_tokens = 1 << 25
    root = synthetic_dataset(tmp / "loader", args.tokens, shard_tokens)
    for f in (root / "train").glob("*.bin"):  # into the page cache, as a warm training run has it
        f.read_bytes()
    L, m, n = args.seq_len, args.micro, args.batches
    probe = ShardedTokenLoader(root, L, m, m, seed=0)
    starts = probe.permutation(0)(np.arange(n * m)) * L  # the same windows the loader reads
    cases = {"bare np.memmap loop (baseline)": lambda: bare_memmap_loop(root, starts, L, m, shard_tokens),
             "ShardedTokenLoader, num_workers=0": lambda: loader_loop(root, L, m, n),
             "ShardedTokenLoader, num_workers=1": lambda: loader_loop(root, L, m, n, num_workers=1),
             "ShardedTokenLoader, num_workers=2": lambda: loader_loop(root, L, m, n, num_workers=2),
             "…document_aware, num_workers=0": lambda: loader_loop(root, L, m, n, document_aware=True)}
    best = {k: 0.0 for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            tokens = fn()
            best[name] = max(best[name], tokens / (time.perf_counter() - t))
    base = best["bare np.memmap loop (baseline)"]
    return [(name, rate, rate / base) for name, rate in best.items()], bench_overlap(root, args)


# ----------------------------------------------------------------------------- preparation
_TOK = {}


def _init(spec: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK["tok"] = load_tokenizer(spec)


def _encode(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e) for e in _TOK["tok"].encode_batch(texts)]


def bare_encode(spec: str, chunks: list[list[str]], num_proc: int) -> int:
    ctx = mp.get_context("fork")
    with ctx.Pool(num_proc, initializer=_init, initargs=(spec,)) as pool:
        return sum(len(a) + 1 for out in pool.imap(_encode, chunks) for a in out)  # + EOS per document


def bench_prepare(args, tmp: Path) -> list[tuple]:
    files = stdlib_files()[: args.docs or None]
    docs = [f.read_bytes().decode("utf-8", errors="replace") for f in files]
    chunks, cur, chars = [], [], 0
    for d in docs:  # the same chunking data.prepare uses
        cur.append(d)
        chars += len(d)
        if chars >= 1 << 20 or len(cur) >= 4096:
            chunks.append(cur)
            cur, chars = [], 0
    chunks.append(cur)
    specs = tokenizer_specs(args, tmp / "bpe")
    rows = []
    for spec, label in specs:
        best_p = best_b = 0.0
        for r in range(args.repeats):
            out = tmp / f"prep-{label}-{r}"
            t = time.perf_counter()
            m = prepare(PrepareConfig(input="stdlib", output=str(out), tokenizer=spec, num_proc=args.num_proc,
                                      max_docs=args.docs, progress=False, val_fraction=0.0))
            best_p = max(best_p, m["splits"]["train"]["tokens"] / (time.perf_counter() - t))
            shutil.rmtree(out)
            t = time.perf_counter()
            n = bare_encode(spec, chunks, args.num_proc)
            best_b = max(best_b, n / (time.perf_counter() - t))
        rows.append((f"{label}: batch encode in {args.num_proc} processes (baseline)", best_b, 1.0))
        rows.append((f"{label}: data.prepare num_proc={args.num_proc}", best_p, best_p / best_b))
    return rows


def tokenizer_specs(args, bpe_dir: Path) -> list[tuple[str, str]]:
    """(tokenizer spec, label) of each of --tokenizers; the BPE one trained into bpe_dir on 400 stdlib files."""
    specs, wanted = [], {t.strip() for t in args.tokenizers.split(",")}
    if "byte" in wanted:
        specs.append(("byte", "byte"))
    if "bpe" in wanted:
        from data.train_tokenizer import TrainTokenizerConfig, train

        train(TrainTokenizerConfig(input="stdlib", output=str(bpe_dir), vocab_size=args.bpe_vocab, max_docs=400))
        specs.append((str(bpe_dir), f"BPE {args.bpe_vocab}"))
    return specs


def bench_sharded(args, tmp: Path) -> list[tuple]:
    """One preparation of stdlib against `--shards` parts prepared in sequence + merge."""
    from data.merge import merge

    specs = tokenizer_specs(args, tmp / "bpe-sharded")
    n = args.shards
    rows = []
    for spec, label in specs:
        best_one = best_split = best_parallel = 0.0
        merge_s = []
        common = dict(input="stdlib", tokenizer=spec, num_proc=args.num_proc, progress=False, val_fraction=0.01)
        for r in range(args.repeats):
            out = tmp / f"one-{r}"
            t = time.perf_counter()
            m = prepare(PrepareConfig(output=str(out), **common))
            tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
            best_one = max(best_one, tokens / (time.perf_counter() - t))
            shutil.rmtree(out)
            out = tmp / f"split-{r}"
            part_s = []
            for i in range(n):
                t = time.perf_counter()
                prepare(PrepareConfig(output=str(out), shard_index=i, num_shards=n, **common))
                part_s.append(time.perf_counter() - t)
            parts = [out / f"part-{i:05d}-of-{n:05d}" for i in range(n)]
            t = time.perf_counter()
            merged = merge(parts, out)
            merge_s.append(time.perf_counter() - t)
            assert merged["splits"]["train"]["tokens"] + merged["splits"]["val"]["tokens"] == tokens
            best_split = max(best_split, tokens / (sum(part_s) + merge_s[-1]))
            # On n machines the parts run at once: the wall time is the slowest part, then the merge.
            best_parallel = max(best_parallel, tokens / (max(part_s) + merge_s[-1]))
            shutil.rmtree(out)
        rows.append((f"{label}: one data.prepare (baseline)", best_one, 1.0))
        rows.append((f"{label}: {n} parts in sequence + data.merge", best_split, best_split / best_one))
        rows.append((f"{label}: slowest of {n} parts + merge (n machines)", best_parallel, best_parallel / best_one))
        print(f"{label}: data.merge (hashes every part file) took {min(merge_s):.3f} s at best", file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128_000_000, help="loader dataset size")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--batches", type=int, default=800)
    p.add_argument("--docs", type=int, default=0, help="stdlib documents for preparation (0 = all)")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    p.add_argument("--bpe-vocab", type=int, default=8192)
    p.add_argument("--tokenizers", default="byte,bpe", help="preparation: byte, bpe or both (comma-separated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compute-ms", type=float, default=2.0, help="simulated compute per batch (prefetch table)")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--skip-prepare", action="store_true")
    p.add_argument("--shards", type=int, default=3, help="parts of the split-preparation case")
    p.add_argument("--skip-sharded", action="store_true", help="skip the split preparation + merge case")
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="moeforge-bench-data-"))
    try:
        if not args.skip_loader:
            print(f"\nLoader: seq_len {args.seq_len}, micro-batch {args.micro}, {args.batches} batches, dataset "
                  f"{args.tokens / 1e6:.0f}M uint16 tokens in {-(-args.tokens // (1 << 25))} shards, "
                  f"best of {args.repeats}")
            rates, overlap = bench_loader(args, tmp)
            _table(rates, "M tokens/s")
            print(f"\nPrefetch against compute: ~{args.compute_ms} ms of single-thread torch matmuls per batch")
            width = max(len(r[0]) for r in overlap)
            print(f"| {'case':<{width}} | step ms | data stall µs |")
            print(f"|{'-' * (width + 2)}|---------|---------------|")
            for name, step, stall in overlap:
                print(f"| {name:<{width}} | {step:>7.3f} | {stall:>13.0f} |")
        if not args.skip_prepare:
            print(f"\nPreparation: stdlib ({args.docs or 'all'} files), num_proc {args.num_proc}, "
                  f"best of {args.repeats}")
            _table(bench_prepare(args, tmp), "M tokens/s")
        if not args.skip_sharded:
            print(f"\nSplit preparation: stdlib, {args.shards} parts in sequence + data.merge against one "
                  f"preparation, num_proc {args.num_proc}, best of {args.repeats}")
            _table(bench_sharded(args, tmp), "M tokens/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _table(rows: list[tuple], unit: str) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"| {'case':<{width}} | {unit:>11} | vs baseline |")
    print(f"|{'-' * (width + 2)}|{'-' * 13}|{'-' * 13}|")
    for name, rate, ratio in rows:
        print(f"| {name:<{width}} | {rate / 1e6:>11.1f} | {ratio:>11.2f} |")


if __name__ == "__main__":
    main()
