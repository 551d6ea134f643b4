"""data.prepare in-process: exact round trips, FIM, inputs, tokenizers, the split, parallelism, resume."""

import json
from pathlib import Path

import numpy as np
import pytest

from data import DataError
from data.prepare import JOURNAL
from data.shards import read_manifest, sha256_file
from data.tokenizer import ByteTokenizer, load_tokenizer
from data.train_tokenizer import TrainTokenizerConfig, train
from tests.data_helpers import (documents, generated_documents, prepare_dataset, snapshot, stdlib_documents,
                                write_jsonl)

BYTE = ByteTokenizer()


def _decoded(path, split="train"):
    docs = documents(path, split)
    assert all(int(d[-1]) == BYTE.eos_id for d in docs)  # every document ends with EOS
    return [BYTE.decode(d[:-1]) for d in docs]


def _split_indices(n, fraction):
    idx = np.arange(n, dtype=np.float64)
    is_val = np.floor((idx + 1) * fraction + 0.5) > np.floor(idx * fraction + 0.5)
    return np.flatnonzero(~is_val).tolist(), np.flatnonzero(is_val).tolist()


def test_byte_round_trip_of_stdlib_with_counts(tmp_path):
    n = 150
    m = prepare_dataset(tmp_path / "ds", max_docs=n, shard_tokens=65_537, val_fraction=0.05)
    originals = stdlib_documents(n)
    train_idx, val_idx = _split_indices(n, 0.05)
    assert val_idx == list(range(9, n, 20))  # evenly spread, deterministic
    assert _decoded(tmp_path / "ds", "train") == [originals[i] for i in train_idx]
    assert _decoded(tmp_path / "ds", "val") == [originals[i] for i in val_idx]
    tr, va = m["splits"]["train"], m["splits"]["val"]
    assert (tr["documents"], va["documents"]) == (len(train_idx), len(val_idx))
    assert sum(s["documents"] for s in tr["shards"]) == tr["documents"]
    assert sum(s["tokens"] for s in tr["shards"]) == tr["tokens"] == sum(len(o.encode()) + 1 for o in
                                                                          (originals[i] for i in train_idx))
    assert len(tr["shards"]) > 5 and all(s["tokens"] == 65_537 for s in tr["shards"][:-1])
    # Every file listed with its size and SHA-256, no temporary file or journal left.
    for s in tr["shards"] + va["shards"]:
        for key in ("data", "index"):
            f = tmp_path / "ds" / s[key]["file"]
            assert f.stat().st_size == s[key]["bytes"] and sha256_file(f) == s[key]["sha256"]
    assert not list((tmp_path / "ds").rglob("*.tmp")) and not (tmp_path / "ds" / JOURNAL).exists()
    assert m["tokenizer"] == BYTE.identity() and m["dtype"] == "uint16" and m["eos_id"] == 256


def test_fim_output_is_a_permutation_of_each_document_plus_sentinels(tmp_path):
    n = 120
    prepare_dataset(tmp_path / "ds", max_docs=n, fim_rate=0.5, seed=3, val_fraction=0.0)
    originals = stdlib_documents(n)
    f = BYTE.fim
    n_fim = 0
    for doc, original in zip(documents(tmp_path / "ds"), originals):
        body = doc[:-1]
        sentinels = [int(t) for t in body if t >= 256]
        if not sentinels:
            assert BYTE.decode(body) == original
            continue
        n_fim += 1
        assert sentinels == [f.prefix, f.suffix, f.middle]  # PSM order, each once
        assert int(body[0]) == f.prefix
        i_suf, i_mid = int(np.flatnonzero(body == f.suffix)[0]), int(np.flatnonzero(body == f.middle)[0])
        prefix, suffix, middle = body[1:i_suf], body[i_suf + 1:i_mid], body[i_mid + 1:]
        assert BYTE.decode(np.concatenate([prefix, middle, suffix])) == original
        assert sorted(body.tolist()) == sorted(list(original.encode()) + sentinels)
    assert 0.3 * n < n_fim < 0.7 * n  # fim_rate 0.5
    # Same seed, same choices; another seed, other choices.
    prepare_dataset(tmp_path / "again", max_docs=n, fim_rate=0.5, seed=3, val_fraction=0.0)
    prepare_dataset(tmp_path / "other", max_docs=n, fim_rate=0.5, seed=4, val_fraction=0.0)
    fp = lambda p: read_manifest(p)["splits"]["train"]["fingerprint"]
    assert fp(tmp_path / "ds") == fp(tmp_path / "again") != fp(tmp_path / "other")


@pytest.mark.slow  # a process pool
def test_parallel_preparation_writes_the_same_bytes(tmp_path):
    opts = dict(max_docs=200, shard_tokens=300_007, fim_rate=0.3, chunk_chars=50_000)
    a = prepare_dataset(tmp_path / "one", num_proc=1, **opts)
    b = prepare_dataset(tmp_path / "two", num_proc=2, **opts)
    assert a["splits"] == b["splits"]
    assert a["run_id"] == b["run_id"]  # num_proc is not part of the run's identity


def test_local_inputs_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = generated_documents(40, seed=2)
    folder = tmp_path / "in"
    write_jsonl(folder / "a.jsonl", docs[:10])
    (folder / "b.json").write_text(json.dumps([{"text": d} for d in docs[10:20]]))
    pq.write_table(pa.table({"text": docs[20:30], "n": list(range(10))}), folder / "c.parquet")
    for i, d in enumerate(docs[30:]):
        (folder / "d").mkdir(exist_ok=True)
        (folder / "d" / f"{i:02d}.txt").write_text(d)
    (folder / "notes.csv").write_text("ignored,file\n")  # an unknown type: an error unless skip_unknown
    with pytest.raises(DataError, match="notes.csv: unknown file type"):
        prepare_dataset(tmp_path / "ds", input=str(folder), val_fraction=0.0)
    m = prepare_dataset(tmp_path / "ds", input=str(folder), val_fraction=0.0, skip_unknown=True)
    assert m["source"]["files"] == 13 and m["source"]["skipped"] == 1 and m["splits"]["train"]["documents"] == 40
    assert _decoded(tmp_path / "ds") == docs  # sorted file order, each file's rows in order
    # text files one document per line, and another key
    write_jsonl(tmp_path / "k.jsonl", docs[:5], key="content")
    prepare_dataset(tmp_path / "k", input=str(tmp_path / "k.jsonl"), text_key="content", val_fraction=0.0)
    assert _decoded(tmp_path / "k") == docs[:5]
    (tmp_path / "lines.txt").write_text("one\ntwo\nthree\n")
    prepare_dataset(tmp_path / "l", input=str(tmp_path / "lines.txt"), text_sample_by="line", val_fraction=0.0)
    assert _decoded(tmp_path / "l") == ["one", "two", "three"]


def test_separate_validation_input(tmp_path):
    docs = generated_documents(130, seed=5)
    write_jsonl(tmp_path / "train.jsonl", docs[:120])
    write_jsonl(tmp_path / "val.jsonl", docs[120:])
    m = prepare_dataset(tmp_path / "ds", input=str(tmp_path / "train.jsonl"), val_input=str(tmp_path / "val.jsonl"),
                        val_fraction=0.05)  # ignored: all of input is training data
    assert _decoded(tmp_path / "ds", "train") == docs[:120]
    assert _decoded(tmp_path / "ds", "val") == docs[120:]
    assert m["val_source"]["files"] == 1


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    train(TrainTokenizerConfig(input="stdlib", output=str(out), vocab_size=600, max_docs=60))
    return out


def test_trained_bpe_round_trips_and_is_identified(tmp_path, bpe):
    tok = load_tokenizer(str(bpe))
    assert tok.vocab_size == 600 and tok.eos_id == 0 and tok.fim is not None
    n = 60
    m = prepare_dataset(tmp_path / "ds", tokenizer=str(bpe), max_docs=n, val_fraction=0.0, fim_rate=0.2)
    originals = stdlib_documents(n)
    assert m["tokenizer"] == {"kind": "huggingface", "name": "bpe", "vocab_size": 600,
                              "sha256": sha256_file(bpe / "tokenizer.json")}
    assert m["eos_id"] == 0 and m["vocab_size"] == 600 and m["splits"]["train"]["max_token_id"] < 600
    fim = tok.fim
    n_fim = 0
    for doc, original in zip(documents(tmp_path / "ds"), originals):
        body = doc[:-1]
        assert int(doc[-1]) == tok.eos_id and tok.eos_id not in body.tolist()
        if int(body[0]) == fim.prefix:
            n_fim += 1
            i_suf, i_mid = int(np.flatnonzero(body == fim.suffix)[0]), int(np.flatnonzero(body == fim.middle)[0])
            text = tok.decode(body[1:i_suf]) + tok.decode(body[i_mid + 1:]) + tok.decode(body[i_suf + 1:i_mid])
        else:
            text = tok.decode(body)
        assert text == original
    assert n_fim > 3
    # Compression: a trained BPE beats bytes on code.
    assert m["splits"]["train"]["tokens"] < 0.75 * sum(len(o.encode()) for o in originals)


def test_a_folder_saved_by_transformers_gives_the_same_tokens(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe / "tokenizer.json"), eos_token="<|eos|>")
    fast.save_pretrained(tmp_path / "saved")
    a = prepare_dataset(tmp_path / "a", tokenizer=str(bpe), max_docs=20, val_fraction=0.0)
    b = prepare_dataset(tmp_path / "b", tokenizer=str(tmp_path / "saved"), max_docs=20, val_fraction=0.0)
    assert a["splits"]["train"]["fingerprint"] == b["splits"]["train"]["fingerprint"]
    assert b["eos_id"] == a["eos_id"]


def test_document_text_never_becomes_a_control_token(tmp_path, bpe):
    docs = ["x = '<|eos|>' + '<|fim_prefix|>'", "plain"]
    write_jsonl(tmp_path / "in.jsonl", docs)
    for tok in ("byte", str(bpe)):
        out = tmp_path / Path(tok).name
        prepare_dataset(out, input=str(tmp_path / "in.jsonl"), tokenizer=tok, val_fraction=0.0)
        t = load_tokenizer(tok)
        got = documents(out)
        assert [int(d[-1]) for d in got] == [t.eos_id, t.eos_id]
        assert t.eos_id not in got[0][:-1].tolist() and t.fim.prefix not in got[0].tolist()
        assert t.decode(got[0][:-1]) == docs[0]


def test_fim_needs_sentinel_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.add_special_tokens(["</s>"])
    tok.add_tokens(["a", "b"])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="has no FIM sentinel tokens"):
        prepare_dataset(tmp_path / "ds", tokenizer=str(tmp_path), fim_rate=0.5, max_docs=2)
    assert not (tmp_path / "ds").exists()
    assert load_tokenizer(str(tmp_path)).eos_id == 0  # "</s>" found by name


class _Crash(KeyboardInterrupt):
    pass


def test_interrupted_run_leaves_nothing_that_looks_complete_and_resumes_exactly(tmp_path):
    opts = dict(max_docs=160, shard_tokens=100_003, val_fraction=0.05, chunk_chars=30_000)
    reference = prepare_dataset(tmp_path / "ref", **opts)
    out = tmp_path / "ds"
    journals = []

    def crash_on_third(state):
        journals.append(state)
        if len(journals) == 3:
            raise _Crash()

    with pytest.raises(_Crash):
        prepare_dataset(out, on_journal=crash_on_third, **opts)
    assert not (out / "manifest.json").exists()
    journal = json.loads((out / JOURNAL).read_text())
    listed = {s[k]["file"]: s[k]["sha256"] for w in journal["writers"].values() for s in w["shards"]
              for k in ("data", "index")}
    finals = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tmp") and p.name != JOURNAL]
    assert finals and len(finals) == len(listed)
    for p in finals:  # every file under its final name is complete and recorded
        assert sha256_file(p) == listed[p.relative_to(out).as_posix()]
    assert list(out.rglob("*.tmp"))  # the shard in progress stays temporary
    with pytest.raises(DataError, match="did not finish"):
        read_manifest(out)
    # A different run into this folder is refused and touches nothing.
    before = snapshot(out)
    with pytest.raises(DataError, match=r"unfinished preparation of a different run \(config.max_docs: 160 → 161\)"):
        prepare_dataset(out, **{**opts, "max_docs": 161})
    assert snapshot(out) == before
    # The same run resumes and writes exactly what an uninterrupted run writes.
    resumed = prepare_dataset(out, num_proc=2, **opts)
    assert resumed["splits"] == reference["splits"]
    assert not list(out.rglob("*.tmp")) and not (out / JOURNAL).exists()


def test_crash_after_a_rename_before_the_journal_still_resumes(tmp_path):
    opts = dict(max_docs=60, shard_tokens=50_021, val_fraction=0.0, chunk_chars=20_000)
    reference = prepare_dataset(tmp_path / "ref", **opts)
    out = tmp_path / "ds"

    def crash(state):
        raise _Crash()

    with pytest.raises(_Crash):
        prepare_dataset(out, on_journal=lambda s: crash(s) if s["writers"]["train"]["shards"] else None, **opts)
    # Roll the journal back to before the first shard completed, as if the crash hit between
    # the shard's rename and the journal write.
    journal = json.loads((out / JOURNAL).read_text())
    first = journal["writers"]["train"]["shards"][0]
    journal["writers"]["train"].update(shards=[], tokens=0, documents=0, max_token_id=-1,
                                       current={"tokens": 0, "documents": 0})
    journal["position"] = {"phase": "input", "next_doc": 0}
    (out / JOURNAL).write_text(json.dumps(journal))
    assert (out / first["data"]["file"]).exists()
    resumed = prepare_dataset(out, **opts)
    assert resumed["splits"] == reference["splits"]


def test_complete_output_is_kept_and_a_different_run_refused(tmp_path):
    out = tmp_path / "ds"
    first = prepare_dataset(out, max_docs=20)
    before = snapshot(out)
    again = prepare_dataset(out, max_docs=20)  # same run: nothing to do
    assert again["splits"] == first["splits"] and snapshot(out) == before
    with pytest.raises(DataError, match="holds a prepared dataset of a different run"):
        prepare_dataset(out, max_docs=20, tokenizer="byte", fim_rate=0.1)
    assert snapshot(out) == before
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and not a data.prepare output"):
        prepare_dataset(tmp_path / "foreign", max_docs=2)
    assert snapshot(tmp_path / "foreign") == {"keep.txt": snapshot(tmp_path / "foreign")["keep.txt"]}


def test_a_bad_document_mid_stream_removes_the_partial_output(tmp_path):
    docs = [{"text": d} for d in generated_documents(300, seed=9)] + [{"body": "no text here"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "empty_out").mkdir()
    for out in (tmp_path / "new_out", tmp_path / "empty_out"):
        with pytest.raises(DataError) as info:
            prepare_dataset(out, input=str(tmp_path / "in.jsonl"), shard_tokens=1000, chunk_chars=2000)
        assert str(tmp_path / "in.jsonl") in str(info.value) and "document 300" in str(info.value)
        assert "'text'" in str(info.value)
        assert snapshot(out) == {}  # shards were written before the bad document: all removed
    assert not (tmp_path / "new_out").exists() and (tmp_path / "empty_out").exists()


def test_bad_options_are_named(tmp_path):
    cases = [(dict(val_fraction=1.0), "val_fraction=1.0"), (dict(fim_rate=2.0), "fim_rate=2.0"),
             (dict(shard_tokens=0), "shard_tokens=0"), (dict(tokenizer=str(tmp_path / "nope")), "nope"),
             (dict(input=str(tmp_path / "missing.jsonl")), "missing.jsonl: no such file"),
             (dict(text_sample_by="word"), "text_sample_by")]
    for override, needle in cases:
        with pytest.raises(DataError) as info:
            prepare_dataset(tmp_path / "ds", **{"max_docs": 2, **override})
        assert needle in str(info.value) and "\n" not in str(info.value)
        assert not (tmp_path / "ds").exists()



def test_a_second_preparation_into_the_same_folder_is_refused(tmp_path):
    import fcntl
    import os

    out = tmp_path / "ds"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running data.prepare holds it
        with pytest.raises(DataError, match="another data.prepare is writing into it"):
            prepare_dataset(out, max_docs=3)
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)
    prepare_dataset(out, max_docs=3)  # released: it runs
    assert (out / "manifest.json").is_file()
