"""ShardedTokenLoader: exactly-once global order at any dp, exact O(1) resume, elastic resume,
run-length independence, prefetch that keeps the order, document-aware outputs, refused states.

The corpus is the standard library's source prepared with the byte tokenizer into small shards
(many windows cross a shard boundary). Every batch row is checked against the token stream
read straight from the shard files.
"""

import json

import numpy as np
import pytest
import torch

from data import DataError, ShardedTokenLoader
from data.loader import IGNORE_INDEX
from tests.data_helpers import (batch_digest, doc_starts, generated_documents, prepare_dataset, resumed, stream,
                                write_jsonl)

MICRO = 2
GLOBAL = 24  # divisible by MICRO × dp for dp in 1, 2, 3, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "stdlib"
    prepare_dataset(out, max_chars=1_200_000, shard_tokens=100_003, val_fraction=0.02)
    return out


@pytest.fixture(scope="module")
def tokens(corpus):
    return stream(corpus)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A few hundred sequences, so that hundreds of batches span several epochs."""
    out = tmp_path_factory.mktemp("loader") / "small"
    prepare_dataset(out, max_chars=8_000, shard_tokens=5_003, val_fraction=0.0)
    return out


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """Generated documents of 1 to ~600 tokens: many document boundaries per sequence."""
    root = tmp_path_factory.mktemp("loader")
    write_jsonl(root / "docs.jsonl", generated_documents(600, seed=1, max_len=600))
    prepare_dataset(root / "ds", input=str(root / "docs.jsonl"), shard_tokens=7_919, val_fraction=0.0)
    return root / "ds"


def _odd_seq_len_filling_whole_batches(n_tokens: int) -> int:
    """An odd seq_len for which the epoch is whole global batches, so *every* window is used."""
    for L in range(301, 1001, 2):
        if ((n_tokens - 1) // L) % GLOBAL == 0:
            return L
    pytest.skip("no odd seq_len in [301, 1000) gives whole global batches for this corpus")


def _epoch(path, seq_len, dp, **kw):
    """Windows per global batch, over one epoch, for every rank of a dp layout (checking rows)."""
    loaders = [ShardedTokenLoader(path, seq_len, MICRO, GLOBAL, r, dp, seed=7, **kw) for r in range(dp)]
    per_step = GLOBAL // (MICRO * dp)
    iters = [iter(ld) for ld in loaders]
    steps = []
    for _ in range(loaders[0].batches_per_epoch // per_step):
        seen = []
        for _ in range(per_step):
            for it in iters:
                seen.append(next(it))
        steps.append(seen)
    assert all(ld.epoch == 1 and ld.consumed == 0 for ld in loaders)  # every rank ended the epoch together
    return loaders[0], steps


@pytest.mark.parametrize("exact", [True, False], ids=["whole-batches", "tail-dropped"])
def test_exactly_once_for_any_dp_and_the_same_global_batches(corpus, tokens, exact):
    L = _odd_seq_len_filling_whole_batches(len(tokens)) if exact else 257
    per_dp = {}
    for dp in (1, 2, 3, 4):
        loader, steps = _epoch(corpus, L, dp)
        windows = []
        for seen in steps:
            for batch in seen:
                for row, w in enumerate(batch["index"].tolist()):
                    assert torch.equal(batch["input_ids"][row], torch.from_numpy(tokens[w * L:w * L + L]))
                    assert torch.equal(batch["labels"][row], torch.from_numpy(tokens[w * L + 1:w * L + L + 1]))
                    windows.append(w)
        n = loader.num_sequences
        assert n == (len(tokens) - 1) // L
        assert len(windows) == len(set(windows)) == n // GLOBAL * GLOBAL  # no window twice
        if exact:
            assert sorted(windows) == list(range(n))  # every window of the stream, exactly once
        per_dp[dp] = [frozenset(w for b in seen for w in b["index"].tolist()) for seen in steps]
    assert per_dp[1] == per_dp[2] == per_dp[3] == per_dp[4]  # each global batch is the same set


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_fresh_resume_anywhere_matches_the_uninterrupted_run(corpus, workers):
    L, dp = 129, 2
    make = lambda rank: ShardedTokenLoader(corpus, L, MICRO, GLOBAL, rank, dp, seed=3, num_workers=workers)
    probe = make(0)
    per_epoch = probe.batches_per_epoch
    shard_tokens = 100_003
    # The first batch holding a window that crosses a shard boundary ("shard end").
    crossing = next(i for i, (_, _, seqs) in enumerate(probe._plan(0, 0))
                    if any((w * L) // shard_tokens != (w * L + L) // shard_tokens for w in seqs.tolist()))
    positions = {"start": 0, "one": 1, "mid-shard": per_epoch // 3, "shard end": crossing + 1,
                 "epoch end - 1": per_epoch - 1, "epoch end": per_epoch}
    horizon = max(positions.values()) + 50
    for rank in range(dp):
        reference = _batches(make(rank), horizon)
        for name, pos in positions.items():
            _, got = resumed(lambda: make(rank), _batches, pos, 50)
            assert all(_equal(a, b) for a, b in zip(got, reference[pos:pos + 50])), (name, rank)
    assert probe.state_dict()["epoch"] == 0


def test_elastic_resume_dp4_dp2_dp1_keeps_exactly_once(corpus):
    L = 211
    seen, state = [], None
    plan = [(4, 7), (2, 5), (1, None)]  # (dp, global batches to run; None = to the end of the epoch)
    for dp, n_global in plan:
        loaders = [ShardedTokenLoader(corpus, L, MICRO, GLOBAL, r, dp, seed=11) for r in range(dp)]
        if state is not None:
            for ld in loaders:
                ld.load_state_dict(json.loads(json.dumps(state)))
        per_step = GLOBAL // (MICRO * dp)
        if n_global is None:
            n_global = (loaders[0].sequences_per_epoch - loaders[0].consumed) // GLOBAL
        its = [iter(ld) for ld in loaders]
        for _ in range(n_global * per_step):
            for it in its:
                seen.extend(next(it)["index"].tolist())
        states = [ld.state_dict() for ld in loaders]
        assert all(s == states[0] for s in states)  # identical on every rank
        state = states[0]
    n = loaders[0].num_sequences
    assert state["epoch"] == 1 and state["sequences_consumed"] == 0
    assert len(seen) == len(set(seen)) == n // GLOBAL * GLOBAL
    # …and in the same order as a run that never changed dp.
    straight = ShardedTokenLoader(corpus, L, MICRO, GLOBAL, 0, 1, seed=11)
    order = np.concatenate([straight.permutation(0)(np.arange(n // GLOBAL * GLOBAL))])
    assert [set(seen[i:i + GLOBAL]) for i in range(0, len(seen), GLOBAL)] == \
        [set(order[i:i + GLOBAL].tolist()) for i in range(0, len(order), GLOBAL)]


def test_planned_run_length_does_not_change_the_first_1000_batches(small):
    digests = []
    for planned in (1000, 3000, None):
        ld = ShardedTokenLoader(small, 63, 1, 4, 0, 1, seed=5, num_batches=planned)
        it = iter(ld)
        digests.append([batch_digest(next(it)) for _ in range(1000)])
        assert ld.state_dict()["epoch"] >= 2  # the 1000 batches cross epoch boundaries
    assert digests[0] == digests[1] == digests[2]
    limited = ShardedTokenLoader(small, 63, 1, 4, 0, 1, seed=5, num_batches=1000)
    assert len(list(limited)) == 1000 == len(limited)


def test_num_workers_do_not_change_the_order(corpus):
    runs = []
    for workers in (0, 1, 3):
        ld = ShardedTokenLoader(corpus, 255, MICRO, GLOBAL, 1, 3, seed=1, num_workers=workers,
                                document_aware=True)
        runs.append([batch_digest(b) for b in _batches(ld, 120)])
        assert ld.state_dict()["sequences_consumed"] == 120 * MICRO * 3 % ld.sequences_per_epoch
    assert runs[0] == runs[1] == runs[2]


def test_abandoned_iterators_stop_their_reader_threads(corpus):
    import threading
    import time

    def readers():
        return [t for t in threading.enumerate() if t.name.startswith("moeforge-loader")]

    for _ in range(5):  # an evaluation loop that breaks out early, five times
        ld = ShardedTokenLoader(corpus, 255, MICRO, GLOBAL, 0, 1, seed=0, num_workers=2, split="val")
        for i, _batch in enumerate(ld):
            assert len(readers()) >= 2
            if i == 2:
                break
    del ld, _batch
    deadline = time.monotonic() + 5
    while readers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not readers()


def test_pipeline_stages_of_one_replica_get_identical_batches(corpus):
    first = ShardedTokenLoader(corpus, 255, MICRO, GLOBAL, 1, 2, seed=2)  # built by pipeline stage 0
    last = ShardedTokenLoader(corpus, 255, MICRO, GLOBAL, 1, 2, seed=2, num_workers=2)  # by the last stage
    other = ShardedTokenLoader(corpus, 255, MICRO, GLOBAL, 0, 2, seed=2)  # another replica
    for a, b, c in zip(_batches(first, 30), _batches(last, 30), _batches(other, 30)):
        assert _equal(a, b)
        assert not set(a["index"].tolist()) & set(c["index"].tolist())
    assert first.state_dict() == last.state_dict() == other.state_dict()


def test_epochs_reshuffle_and_every_rank_yields_the_same_count(corpus):
    L, dp = 301, 3
    loaders = [ShardedTokenLoader(corpus, L, MICRO, GLOBAL, r, dp, seed=0) for r in range(dp)]
    counts, orders = [], []
    for ld in loaders:
        it, n, order = iter(ld), 0, []
        while ld.epoch == 0:
            order.extend(next(it)["index"].tolist())
            n += 1
        counts.append(n)
        orders.append(order)
        next_epoch = next(it)["index"].tolist()
        assert next_epoch != order[:MICRO]
    assert counts[0] == counts[1] == counts[2] == loaders[0].batches_per_epoch
    assert loaders[0].num_sequences % GLOBAL != 0  # the dropped tail is real in this case
    p0, p1 = loaders[0].permutation(0), loaders[0].permutation(1)
    n = loaders[0].num_sequences
    assert not np.array_equal(p0(np.arange(n)), p1(np.arange(n)))


def test_document_aware_outputs(short_docs):
    L = 255
    tokens = stream(short_docs)
    plain = ShardedTokenLoader(short_docs, L, MICRO, GLOBAL, 0, 1, seed=4)
    aware = ShardedTokenLoader(short_docs, L, MICRO, GLOBAL, 0, 1, seed=4, document_aware=True)
    starts = set(doc_starts(short_docs).tolist())
    checked_boundaries = 0
    for a, b in zip(_batches(plain, 60), _batches(aware, 60)):
        assert torch.equal(a["input_ids"], b["input_ids"])
        cu = b["cu_seqlens"].tolist()
        assert b["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == MICRO * L
        assert cu == sorted(set(cu))
        flat_pos = b["position_ids"].reshape(-1)
        assert [i for i in range(MICRO * L) if flat_pos[i] == 0] == cu[:-1]  # segments start at position 0
        for row, w in enumerate(b["index"].tolist()):
            s = w * L
            pos, lab = b["position_ids"][row].tolist(), b["labels"][row].tolist()
            expect_pos, p = [], 0
            for i in range(L):
                if i > 0 and s + i in starts:
                    p = 0
                    checked_boundaries += 1
                expect_pos.append(p)
                p += 1
            assert pos == expect_pos
            for i in range(L):
                crosses = (s + i + 1) in starts  # token i is the last of its document
                assert lab[i] == (IGNORE_INDEX if crosses else int(tokens[s + i + 1]))
                if crosses:
                    assert int(tokens[s + i]) == 256  # …and it is the EOS
            assert max(pos) < L
    assert checked_boundaries > 50


def test_state_is_small_json_and_refuses_a_different_run(corpus, small):
    ld = ShardedTokenLoader(corpus, 255, MICRO, GLOBAL, 0, 2, seed=9)
    _batches(ld, 3)
    state = ld.state_dict()
    assert len(json.dumps(state)) < 400
    assert set(state) >= {"format_version", "fingerprint", "seed", "epoch", "sequences_consumed", "seq_len",
                          "global_batch_size"}
    assert state["sequences_consumed"] == 3 * MICRO * 2

    def refused(loader, st, *needles):
        before = loader.state_dict()
        with pytest.raises(DataError) as info:
            loader.load_state_dict(st)
        msg = str(info.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg
        assert loader.state_dict() == before  # a refused state changes nothing

    other = ShardedTokenLoader(small, 255, MICRO, GLOBAL, 0, 2, seed=9)
    refused(other, state, "fingerprint", state["fingerprint"][:12])
    refused(ShardedTokenLoader(corpus, 256, MICRO, GLOBAL, 0, 2, seed=9), state, "seq_len 255", "256")
    refused(ShardedTokenLoader(corpus, 255, MICRO, GLOBAL, 0, 2, seed=10), state, "seed 9", "10")
    refused(ShardedTokenLoader(corpus, 255, MICRO, GLOBAL, 0, 2, seed=9), {**state, "format_version": 99}, "99")
    # 12 consumed sequences are not on the micro-step grid of micro 4 × dp 2.
    refused(ShardedTokenLoader(corpus, 255, 4, GLOBAL, 0, 2, seed=9), state, "12", "micro_batch_size")
    val = ShardedTokenLoader(corpus, 255, MICRO, GLOBAL, 0, 2, seed=9, split="val")
    refused(val, state, "fingerprint")


def test_bad_loader_arguments_are_one_line_errors(corpus):
    cases = [(dict(global_batch_size=25), "global_batch_size=25"), (dict(dp_rank=2), "dp_rank=2"),
             (dict(seq_len=0), "seq_len=0"), (dict(seq_len=10**7), "fewer than one global batch")]
    for override, needle in cases:
        args = dict(path=corpus, seq_len=255, micro_batch_size=MICRO, global_batch_size=GLOBAL, dp_rank=0, dp_size=2)
        args.update(override)
        with pytest.raises(DataError) as info:
            ShardedTokenLoader(**args)
        assert needle in str(info.value) and "\n" not in str(info.value)


def test_batches_are_long_tensors_of_the_right_shape(corpus):
    b = _batches(ShardedTokenLoader(corpus, 255, 3, 6, 0, 2, seed=0), 1)[0]
    assert b["input_ids"].dtype == b["labels"].dtype == torch.long
    assert b["input_ids"].shape == b["labels"].shape == (3, 255) and b["index"].shape == (3,)
    assert b["input_ids"].is_contiguous() and b["labels"].is_contiguous()
    assert int(b["input_ids"].max()) < 262 and int(b["input_ids"].min()) >= 0


def test_close_joins_the_reader_threads_before_returning(corpus):
    """A daemon reader still inside a torch op at interpreter exit aborts the process; close() joins them."""
    import threading

    ld = ShardedTokenLoader(corpus, 255, MICRO, GLOBAL, 0, 1, seed=0, num_workers=2)
    it = iter(ld)
    next(it)
    threads = list(it.threads)
    assert threads and all(t.is_alive() for t in threads)
    ld.close()
    assert not any(t.is_alive() for t in threads)
    assert not [t for t in threading.enumerate() if t in threads]
