"""MixtureLoader (data/mixture.py): shares within one sequence per 1,000-window, exactly once per
source per epoch, exact resume (mid-window, at an exhaustion point), elastic dp 4→2→1, run-length
independence, weight 0, one source = the plain loader, the on_exhausted policies, a state whose
size does not grow with the data; the trainer's config errors, tokens/<name> and val_loss/<name>.

The corpora are marker documents: every document of source T is "T<index>|" repeated, so the
text of any sequence says which source it came from, independently of the loader's `source`
output. Rows are checked against the token stream read straight from the shard files.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from data import DataError, ShardedTokenLoader
from data.mixture import BLOCK, MixtureLoader, Source
from tests.data_helpers import REPO, batch_digest, prepare_dataset, resumed, stream, write_jsonl

L = 31
MICRO = 2
GLOBAL = 16  # divisible by MICRO × dp for dp in 1, 2, 4
EOS = 256


def _marker(root, tag: str, n: int, val_fraction: float = 0.1):
    docs = [f"{tag}{i:04d}|" * {"A": 10, "B": 7, "C": 13}[tag] for i in range(n)]  # documents of 61, 43, 79 tokens
    write_jsonl(root / f"{tag}.jsonl", docs)
    out = root / tag
    prepare_dataset(out, input=str(root / f"{tag}.jsonl"), shard_tokens=4099, val_fraction=val_fraction)
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three marker datasets: A (~700 sequences of 31), B (~120), C (~450)."""
    root = tmp_path_factory.mktemp("mixture")
    return {"A": _marker(root, "A", 400), "B": _marker(root, "B", 100), "C": _marker(root, "C", 200)}


@pytest.fixture(scope="module")
def tokens(corpora):
    return {tag: stream(path) for tag, path in corpora.items()}


def _tag(row: torch.Tensor) -> str:
    """The source a row's text belongs to (its marker letters)."""
    letters = {chr(t) for t in row.tolist() if t != EOS and chr(t).isalpha()}
    assert len(letters) == 1, letters
    return letters.pop()


def _mix(corpora, spec, dp_rank=0, dp_size=1, seed=7, **kw):
    """spec: [(tag, weight, epochs, on_exhausted)] or [(tag, weight)]."""
    sources = [Source(str(corpora[s[0]]), *s[1:], name="") if len(s) == 2 else
               Source(str(corpora[s[0]]), s[1], "", s[2], s[3]) for s in spec]
    return MixtureLoader(sources, L, MICRO, GLOBAL, dp_rank, dp_size, seed, **kw)


def _batches(loader, n):
    it = iter(loader)
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_rows(batch, loader, tokens):
    """Every row is the window its (source, index) names, and its text is that source's."""
    for row, (s, w) in enumerate(zip(batch["source"].tolist(), batch["index"].tolist())):
        tag = loader.sources[s].name
        assert _tag(batch["input_ids"][row]) == tag
        assert torch.equal(batch["input_ids"][row], torch.from_numpy(tokens[tag][w * L:w * L + L]))
        assert torch.equal(batch["labels"][row], torch.from_numpy(tokens[tag][w * L + 1:w * L + L + 1]))


def test_every_1000_window_holds_each_source_within_one_sequence_of_its_weight(corpora, tokens):
    # Read through the loader: the first two windows, sources identified by their text.
    ld = _mix(corpora, [("A", 0.7), ("B", 0.3)])
    seen = []
    for batch in _batches(ld, 2 * BLOCK // MICRO):
        _check_rows(batch, ld, tokens)
        seen.extend(_tag(r) for r in batch["input_ids"])
    for w in range(0, 2 * BLOCK, BLOCK):
        window = seen[w:w + BLOCK]
        assert abs(window.count("A") - 700) <= 1 and abs(window.count("B") - 300) <= 1
    # Awkward weights over 2,000 windows (closed-form map: the same one the batches come from).
    weights = [1 / 3, 0.0005, 2 / 3 - 0.0005]
    ld = _mix(corpora, list(zip("ABC", weights)))
    src, _ = ld.draws(np.arange(2000 * BLOCK))
    per_window = np.stack([(src.reshape(-1, BLOCK) == s).sum(1) for s in range(3)], axis=1)
    assert (np.abs(per_window - BLOCK * np.array(weights)) <= 1).all()
    assert (per_window.sum(1) == BLOCK).all()
    # Windows that start anywhere (straddling two blocks) and global batches of 32 hold each
    # source's share too: its slots are spread evenly over each block, not clumped.
    for s, w in enumerate(weights):
        c = np.concatenate([[0], np.cumsum(src == s)])
        assert np.abs(c[BLOCK:] - c[:-BLOCK] - BLOCK * w).max() <= 2, s
        assert np.abs(c[32::32] - c[:-32:32] - 32 * w).max() <= 2, s
    src2, _ = _mix(corpora, [("A", 0.7), ("B", 0.3)]).draws(np.arange(100 * BLOCK))
    c = np.concatenate([[0], np.cumsum(src2 == 0)])
    assert np.abs(c[BLOCK:] - c[:-BLOCK] - 700).max() <= 1
    # …and no drift: the running count stays within a few sequences of weight × position.
    cum = np.cumsum(per_window, axis=0)
    ideal = np.arange(1, 2001)[:, None] * BLOCK * np.array(weights)
    assert np.abs(cum - ideal).max() < 3
    assert ld.draws_at(2000 * BLOCK) == cum[-1].tolist()


def test_each_source_is_read_exactly_once_per_epoch(corpora, tokens):
    dp = 2
    loaders = [_mix(corpora, [("A", 0.8), ("B", 0.2)], r, dp) for r in range(dp)]
    n_b = loaders[0].num_sequences[1]
    its = [iter(ld) for ld in loaders]
    draws = {0: [], 1: []}
    while loaders[0].draws_at(loaders[0].consumed)[1] < 3 * n_b:  # three epochs of B, over two of A
        for it, ld in zip(its, loaders):
            batch = next(it)
            _check_rows(batch, ld, tokens)
            for s, w in zip(batch["source"].tolist(), batch["index"].tolist()):
                draws[s].append(w)
    assert loaders[0].state_dict() == loaders[1].state_dict()
    for s, seq in draws.items():
        n = loaders[0].num_sequences[s]
        full = len(seq) // n
        assert full >= 1
        for e in range(full):
            assert sorted(seq[e * n:(e + 1) * n]) == list(range(n)), (s, e)  # every sequence once per epoch
        assert len(set(seq[full * n:])) == len(seq) - full * n  # …and no repeat inside the running epoch
    assert draws[1][:n_b] != draws[1][n_b:2 * n_b]  # epochs reshuffle


def test_one_source_reads_the_plain_loaders_order(corpora):
    mix = _mix(corpora, [("A", 1.0)])
    plain = ShardedTokenLoader(corpora["A"], L, MICRO, GLOBAL, 0, 1, seed=7)
    n = plain.batches_per_epoch
    for a, b in zip(_batches(mix, n), _batches(plain, n)):
        assert (a["source"] == 0).all()
        assert _equal({k: v for k, v in a.items() if k != "source"}, b)
    # Through the trainer's config, one source is the plain loader itself: same batches and state as data.path.
    from train.config import compose, to_config
    from train.data_setup import build_loaders

    common = ["trainer.seq_len=31", "trainer.micro_batch_size=2", "trainer.global_batch_size=16", "trainer.seed=7"]
    via_sources, _ = build_loaders(to_config(compose([f"data.sources=[{{path: {corpora['A']}}}]", *common])),
                                   None, 0, 1)
    via_path, _ = build_loaders(to_config(compose([f"data.path={corpora['A']}", *common])), corpora["A"], 0, 1)
    assert type(via_sources) is ShardedTokenLoader
    for a, b in zip(_batches(via_sources, n + 5), _batches(via_path, n + 5)):
        assert _equal(a, b)
    assert via_sources.state_dict() == via_path.state_dict()


def test_document_aware_rows_are_the_plain_loaders_rows_of_their_source(corpora):
    mix = _mix(corpora, [("A", 0.6), ("B", 0.4)], 1, 2, document_aware=True, num_workers=2)
    plain = [ShardedTokenLoader(corpora[t], L, MICRO, GLOBAL, 0, 1, seed=7, document_aware=True) for t in "AB"]
    boundaries = 0
    for batch in _batches(mix, 40):
        cu = batch["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == MICRO * L and cu == sorted(set(cu))
        for row, (s, w) in enumerate(zip(batch["source"].tolist(), batch["index"].tolist())):
            alone = plain[s].read_batch(np.array([w]))  # the same sequence read by its source's own loader
            for key in ("input_ids", "labels", "position_ids"):
                assert torch.equal(batch[key][row], alone[key][0]), key
            starts = [c - row * L for c in cu if row * L < c < (row + 1) * L]
            assert starts == [c for c in alone["cu_seqlens"].tolist() if 0 < c < L]
            boundaries += len(starts)
    assert boundaries > 30  # documents of 43 and 61 tokens: rows of 31 cross them often


POLICY_SPEC = [("A", 0.5, 0.0, "next_epoch"), ("B", 0.3, 1.5, "drop"), ("C", 0.2, 1.0, "stop")]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_anywhere_matches_the_uninterrupted_run(corpora, workers):
    dp = 2
    make = lambda rank: _mix(corpora, POLICY_SPEC, rank, dp, num_workers=workers, log=lambda line: None)
    probe = make(0)
    drop = next(pos for pos, line in probe.events if "drop" in line)
    step = MICRO * dp
    total = probe.stop_position // step  # batches until the mixture stops
    positions = {"start": 0, "one": 1, "mid-window": (BLOCK + BLOCK // 2) // step, "at the drop": drop // step,
                 "just past the drop": drop // step + 1, "one before the stop": total - 1, "at the stop": total}
    assert 0 < drop < probe.stop_position and BLOCK < probe.stop_position
    for rank in range(dp):
        reference = _batches(make(rank), total + 10)
        assert len(reference) == total  # the iteration ends at the stop
        for name, pos in positions.items():
            fresh, got = resumed(lambda: make(rank), _batches, pos, 40)
            assert len(got) == len(reference[pos:pos + 40]), name
            assert all(_equal(a, b) for a, b in zip(got, reference[pos:pos + 40])), (name, rank)
            assert (fresh.exhausted is not None) == (pos + len(got) >= total), name


def test_elastic_resume_dp4_dp2_dp1_continues_the_same_global_order(corpora):
    spec = [("A", 0.6), ("B", 0.25), ("C", 0.15)]
    straight = _mix(corpora, spec)
    seen, state = [], None
    for dp, n_global in [(4, 7), (2, 5), (1, 9)]:
        loaders = [_mix(corpora, spec, r, dp) for r in range(dp)]
        if state is not None:
            for ld in loaders:
                ld.load_state_dict(json.loads(json.dumps(state)))
        its = [iter(ld) for ld in loaders]
        for _ in range(n_global * GLOBAL // (MICRO * dp)):
            for it in its:
                b = next(it)
                seen.extend(zip(b["source"].tolist(), b["index"].tolist()))
        states = [ld.state_dict() for ld in loaders]
        assert all(s == states[0] for s in states)  # identical on every rank
        state = states[0]
    n = 21 * GLOBAL
    assert state["sequences_consumed"] == n
    src, idx = straight.locate(np.arange(n))
    order = list(zip(src.tolist(), idx.tolist()))
    assert [set(seen[i:i + GLOBAL]) for i in range(0, n, GLOBAL)] == \
        [set(order[i:i + GLOBAL]) for i in range(0, n, GLOBAL)]  # each global batch is the same set
    assert [d["draws"] for d in state["sources"]] == straight.draws_at(n)


def test_planned_run_length_does_not_change_the_order(corpora):
    digests = []
    for planned in (300, 900, None):
        ld = _mix(corpora, [("A", 0.6), ("B", 0.4)], num_batches=planned)
        digests.append([batch_digest(b) for b in _batches(ld, 300)])
    assert digests[0] == digests[1] == digests[2]
    assert len(list(_mix(corpora, [("A", 0.6), ("B", 0.4)], num_batches=300))) == 300


def test_a_source_of_weight_zero_is_never_drawn(corpora):
    ld = _mix(corpora, [("A", 1.0), ("B", 0.0), ("C", 1.0)])
    src, _ = ld.draws(np.arange(50 * BLOCK))
    assert not (src == 1).any()
    per_window = (src.reshape(-1, BLOCK) == 0).sum(1)
    assert (per_window == 500).all()
    _batches(ld, 100)
    assert ld.state_dict()["sources"][1]["draws"] == 0 and ld.tokens_per_source()["B"] == 0
    assert ld.tokens_per_source()["A"] + ld.tokens_per_source()["C"] == 100 * MICRO * L


def test_on_exhausted_next_epoch_logs_once_and_continues(corpora):
    lines = []
    ld = _mix(corpora, [("A", 0.5), ("B", 0.5, 1.0, "next_epoch")], log=lines.append)
    n_b = ld.num_sequences[1]
    b_draws = []
    for batch in _batches(ld, 5 * n_b // MICRO):  # half of them B: 2.5 epochs of B
        b_draws.extend(w for s, w in zip(batch["source"].tolist(), batch["index"].tolist()) if s == 1)
    assert len(b_draws) > 2 * n_b  # B went on past its cap, into its next epochs
    assert sorted(b_draws[:n_b]) == sorted(b_draws[n_b:2 * n_b]) == list(range(n_b))
    assert len(lines) == 1 and "'B'" in lines[0] and "next_epoch" in lines[0] and ld.exhausted is None


def test_on_exhausted_stop_ends_every_rank_at_the_same_global_batch(corpora):
    dp = 2
    lines = []
    loaders = [_mix(corpora, [("A", 0.5), ("B", 0.5, 1.0, "stop")], r, dp, log=lines.append) for r in range(dp)]
    got = [[(int(s), int(w)) for b in ld for s, w in zip(b["source"], b["index"])] for ld in loaders]
    assert len(got[0]) == len(got[1])
    n_b = loaders[0].num_sequences[1]
    end = loaders[0].end
    assert loaders[0].draws_at(end)[1] == n_b  # the stop is at B's first draw beyond one epoch
    consumed = loaders[0].consumed
    assert consumed == end // GLOBAL * GLOBAL and consumed > end - GLOBAL  # the last whole global batch before it
    b_seen = [w for g in got for s, w in g if s == 1]
    assert len(b_seen) == len(set(b_seen)) <= n_b  # nothing of B read twice
    assert loaders[0].exhausted and "stop" in loaders[0].exhausted
    assert len(lines) == 2  # the cap and the end, once (rank 0's log; rank 1 logs to its own callable too)
    assert list(loaders[0]) == []  # a new iteration past the stop yields nothing


def test_on_exhausted_drop_renormalises_the_rest(corpora):
    lines = []
    ld = _mix(corpora, [("A", 0.5), ("B", 0.25, 1.0, "drop"), ("C", 0.25)], log=lines.append)
    drop = ld.events[0][0]
    assert len(ld.segments) == 2 and ld.segments[1].start == drop
    n = drop + 20 * BLOCK
    src, k = ld.draws(np.arange(n))
    assert (src[:drop] == 1).sum() == ld.num_sequences[1] and not (src[drop:] == 1).any()
    after = src[drop:drop + 20 * BLOCK].reshape(-1, BLOCK)
    assert (np.abs((after == 0).sum(1) - 2 * BLOCK / 3) <= 1).all()  # 0.5 / 0.75
    assert (np.abs((after == 2).sum(1) - BLOCK / 3) <= 1).all()
    for s in (0, 2):  # the others' draws continue across the boundary: 0, 1, 2, … in order
        assert (k[src == s] == np.arange((src == s).sum())).all()
    _batches(ld, (drop + BLOCK) // MICRO)
    assert len(lines) == 1 and "drop" in lines[0] and "A 0.6667" in lines[0]


def test_state_is_small_json_independent_of_the_number_of_sequences(corpora, tmp_path):
    big = tmp_path / "big"
    docs = [f"D{i:05d}|" * 10 for i in range(4000)]
    write_jsonl(tmp_path / "big.jsonl", docs)
    prepare_dataset(big, input=str(tmp_path / "big.jsonl"), shard_tokens=40_009, val_fraction=0.0)
    sizes = []
    for path in (corpora["B"], big):  # ~180 vs ~8,000 sequences
        ld = MixtureLoader([Source(str(path), 0.5, "x"), Source(str(corpora["A"]), 0.5, "y")], L, MICRO, GLOBAL)
        _batches(ld, 3)
        state = ld.state_dict()
        state["sequences_consumed"] = 10**12  # far into the run: still O(1) to compute, same size
        ld.load_state_dict(state)
        sizes.append(len(json.dumps(ld.state_dict())))
    assert abs(sizes[0] - sizes[1]) <= 8 and max(sizes) < 800  # digits of the draw counts only


def test_refused_states_and_hostile_sources_are_one_line_errors(corpora, tmp_path):
    def refused(make, *needles):
        with pytest.raises(DataError) as info:
            make()
        msg = str(info.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg

    ld = _mix(corpora, [("A", 0.7), ("B", 0.3)])
    _batches(ld, 3)
    state = ld.state_dict()
    refused(lambda: _mix(corpora, [("A", 0.6), ("B", 0.4)]).load_state_dict(state), "weight 0.7", "0.6")
    refused(lambda: _mix(corpora, [("A", 0.7), ("C", 0.3)]).load_state_dict(state), "data.sources[1]")
    refused(lambda: ShardedTokenLoader(corpora["A"], L, MICRO, GLOBAL).load_state_dict(state), "mixture of 2")
    plain = ShardedTokenLoader(corpora["A"], L, MICRO, GLOBAL)
    refused(lambda: ld.load_state_dict(plain.state_dict()), "single dataset", "data.sources")
    other_tok = tmp_path / "other_tok"
    shutil.copytree(corpora["B"], other_tok)
    m = json.loads((other_tok / "manifest.json").read_text())
    m["tokenizer"]["sha256"] = "0" * 64
    (other_tok / "manifest.json").write_text(json.dumps(m))
    cases = [([Source(str(corpora["A"])), Source(str(other_tok))], ("data.sources[1]", "tokenizer sha256")),
             ([Source(str(tmp_path / "nowhere"))], ("data.sources[0]", "nowhere")),
             ([Source(str(corpora["A"]), float("nan"))], ("data.sources[0].weight=nan",)),
             ([Source(str(corpora["A"]), -1.0)], ("data.sources[0].weight=-1.0",)),
             ([Source(str(corpora["A"]), 0.0), Source(str(corpora["B"]), 0.0)], ("every weight is 0",))]
    for sources, needles in cases:
        refused(lambda: MixtureLoader(sources, L, MICRO, GLOBAL), *needles)
    refused(lambda: MixtureLoader([Source(str(corpora["A"]))], 10**6, MICRO, GLOBAL), "no sequence of seq_len")


# ---------------------------------------------------------------- through `python -m train`
TINY = ["trainer.seq_len=31", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.log_interval=1",
        "logging.wandb.mode=disabled", "logging.progress_bar=false", "trainer.threads=1", "data.num_workers=0"]


def _sources(*items) -> str:
    return "data.sources=[" + ",".join("{" + ", ".join(f"{k}: {v}" for k, v in it.items()) + "}" for it in items) + "]"


def test_hostile_mixture_configs_are_one_line_errors_before_anything_is_written(corpora, tmp_path, capsys,
                                                                                monkeypatch):
    from train.__main__ import main

    monkeypatch.setenv("MOEFORGE_RUNS", str(tmp_path / "runs"))
    empty = tmp_path / "empty"
    docs = ["x"]
    write_jsonl(tmp_path / "empty.jsonl", docs)
    prepare_dataset(empty, input=str(tmp_path / "empty.jsonl"), val_fraction=0.0)
    other_tok = tmp_path / "other_tok"
    shutil.copytree(corpora["B"], other_tok)
    m = json.loads((other_tok / "manifest.json").read_text())
    m["tokenizer"]["vocab_size"] = 300
    (other_tok / "manifest.json").write_text(json.dumps(m))
    a, b = corpora["A"], corpora["B"]
    cases = [
        ([_sources({"path": a, "weight": 0.5}, {"path": empty, "weight": 0.5})], ("data.sources[1]", "empty source")),
        ([_sources({"path": a, "weight": -0.5})], ("data.sources[0].weight=-0.5",)),
        ([_sources({"path": a, "weight": "nan"})], ("data.sources[0].weight=nan",)),
        ([_sources({"path": a, "weight": "inf"}, {"path": b})], ("data.sources[0].weight=inf",)),
        ([_sources({"path": a, "weight": 0}, {"path": b, "weight": 0})], ("data.sources", "every weight is 0")),
        ([_sources({"path": a}, {"path": tmp_path / "missing"})], ("data.sources[1]", "missing")),
        ([_sources({"path": a}, {"path": other_tok})], ("data.sources[1]", "tokenizer vocab_size 300")),
        ([f"data.path={a}", _sources({"path": b})], ("data.path=", "data.sources")),
    ]
    for overrides, needles in cases:
        run_dir = tmp_path / "run"
        code = main([*overrides, *TINY, f"hydra.run.dir={run_dir}"])
        err = capsys.readouterr().err.strip()
        assert code == 2, (overrides, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert all(n in err for n in needles), (needles, err)
        assert not run_dir.exists() and not (tmp_path / "runs").exists()  # nothing written
    # The same through a process of its own: the exit code is what launchers see.
    r = _run_train([_sources({"path": a, "weight": 0}, {"path": b, "weight": 0}), *TINY,
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == "error: data.sources: every weight is 0 (at least one source must be drawn)"
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def _run_train(args, tmp_path):
    import os
    import sys

    env = {**os.environ, "MOEFORGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "WANDB_SILENT": "true", "MOEFORGE_RUNS": str(tmp_path / "runs")}
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_training_on_two_sources_logs_tokens_and_val_loss_per_source_across_a_resume(corpora, tmp_path):
    run_dir = tmp_path / "run"
    mixture = _sources({"path": corpora["A"], "weight": 0.75, "name": "web"},
                       {"path": corpora["B"], "weight": 0.25, "name": "code"})
    common = ["+experiment=smoke", mixture, *TINY, "trainer.eval_interval=2", "trainer.eval_batches=1",
              f"hydra.run.dir={run_dir}"]
    first = _run_train([*common, "trainer.max_steps=3"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run_train([*common, "trainer.max_steps=5"], tmp_path)  # resumes from step 3
    assert second.returncode == 0, second.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    reference = MixtureLoader([Source(str(corpora["A"]), 0.75, "web"), Source(str(corpora["B"]), 0.25, "code")],
                              L, 2, 4, seed=0)
    for r in train:
        assert r["tokens/web"] + r["tokens/code"] == r["step"] * 4 * L
        assert [r["tokens/web"] // L, r["tokens/code"] // L] == reference.draws_at(r["step"] * 4)
    evals = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3, 4, 5]  # every 2 steps, and at each start's last step
    for r in evals:
        assert r["val_loss/web"] > 0 and r["val_loss/code"] > 0
        assert r["val_loss"] == pytest.approx(0.75 * r["val_loss/web"] + 0.25 * r["val_loss/code"])


def test_training_stops_cleanly_where_a_stop_source_runs_out(corpora, tmp_path):
    run_dir = tmp_path / "run"
    spec = [Source(str(corpora["A"]), 0.75, "web"), Source(str(corpora["B"]), 0.25, "code", 0.05, "stop")]
    reference = MixtureLoader(spec, L, 2, 4, seed=0, log=lambda line: None)
    steps = reference.stop_position // 4
    assert 1 < steps < 50
    mixture = _sources({"path": corpora["A"], "weight": 0.75, "name": "web"},
                       {"path": corpora["B"], "weight": 0.25, "name": "code", "epochs": 0.05, "on_exhausted": "stop"})
    r = _run_train(["+experiment=smoke", mixture, *TINY, "trainer.eval_interval=0", "trainer.max_steps=50",
                    f"hydra.run.dir={run_dir}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"stopping at step {steps} of trainer.max_steps=50: source 'code' reached its cap" in r.stdout
    logged = [x for x in r.stderr.splitlines() if x.startswith("data: ")]
    assert len(logged) == 1 and "end of the mixture" in logged[0] and "'code' reached its cap" in logged[0]
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert train[-1]["step"] == steps and train[-1]["tokens/code"] // L <= reference.caps[1]
