"""data.prepare's byte path (byte tokenizer, no FIM: encoded in the main process from the documents'
UTF-8 bytes, shards written by a background thread) writes exactly what the general path writes."""

import json

import numpy as np
import pytest

import data.prepare as prepare_module
import data.shard_writer as shard_writer_module
from data.corpus import open_source
from data.readers import as_utf8
from data.prepare import JOURNAL
from data.shard_writer import ShardWriter
from data.tokenizer import ByteTokenizer, encode_documents
from tests.data_helpers import generated_documents, prepare_dataset, snapshot, write_jsonl

BYTE = ByteTokenizer()


def _general_path(monkeypatch):
    """Make data.prepare take the worker path (encode_documents on str) for the byte tokenizer too."""
    monkeypatch.setattr(prepare_module, "_byte_fast_path", lambda tok, cfg: False)


def _same_output(a, b, ma: dict, mb: dict) -> None:
    drop = ("created", "_summary")
    assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}
    sa, sb = snapshot(a), snapshot(b)
    sa.pop("manifest.json"), sb.pop("manifest.json")
    assert sa == sb and sa  # every shard file byte-identical


def test_utf8_encoding_matches_the_general_encoding():
    docs = generated_documents(300, seed=1) + ["", "x", "<|eos|> as text", "\U0001F600 emoji", "a\x00b"]
    for dtype in (np.uint16, np.uint32):
        want = encode_documents(BYTE, docs, 0, np.dtype(dtype))
        got = BYTE.encode_utf8_documents([d.encode() for d in docs], np.dtype(dtype))
        assert got[0].dtype == want[0].dtype and np.array_equal(got[0], want[0])
        assert np.array_equal(got[1], want[1])
    empty = BYTE.encode_utf8_documents([], np.dtype(np.uint16))
    assert len(empty[0]) == len(empty[1]) == 0


def test_utf8_documents_are_the_text_documents_encoded():
    for raw in (b"plain ascii", "caf\u00e9 \u6570\u636e".encode(), b"latin-1 caf\xe9", b"\xff\xfe", b"", b"a\xed\xa0\x80b"):
        text = raw.decode("utf-8", errors="replace")
        data, chars = as_utf8(raw)
        assert (data, chars) == (text.encode("utf-8"), len(text))
    # The whole stdlib corpus (it holds files that are not valid UTF-8), in the same order.
    src = open_source("stdlib")
    assert [(t.encode("utf-8"), len(t)) for t in src.documents()] == list(src.documents_utf8())


@pytest.mark.parametrize("opts", [
    dict(max_docs=300, shard_tokens=65_537, val_fraction=0.05, chunk_chars=100_000),
    dict(max_chars=400_000, shard_tokens=30_011, val_fraction=0.0, chunk_chars=50_000),
], ids=["val-split", "max-chars"])
def test_byte_path_writes_the_same_bytes_as_the_general_path_on_stdlib(tmp_path, monkeypatch, opts):
    fast = prepare_dataset(tmp_path / "fast", **opts)
    with monkeypatch.context() as m:
        _general_path(m)
        general = prepare_dataset(tmp_path / "general", num_proc=2, **opts)
    assert len(fast["splits"]["train"]["shards"]) > 3
    _same_output(tmp_path / "fast", tmp_path / "general", fast, general)


def test_byte_path_writes_the_same_bytes_as_the_general_path_on_files(tmp_path, monkeypatch):
    docs = generated_documents(500, seed=4) + ["", "tail \u00e9"]
    write_jsonl(tmp_path / "in" / "a.jsonl", docs[:250])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[250:])
    write_jsonl(tmp_path / "val.jsonl", generated_documents(40, seed=5))
    opts = dict(input=str(tmp_path / "in"), val_input=str(tmp_path / "val.jsonl"), shard_tokens=4_099,
                chunk_chars=5_000)
    fast = prepare_dataset(tmp_path / "fast", **opts)
    with monkeypatch.context() as m:
        _general_path(m)
        general = prepare_dataset(tmp_path / "general", **opts)
    assert fast["splits"]["train"]["documents"] == len(docs) and fast["splits"]["val"]["documents"] == 40
    _same_output(tmp_path / "fast", tmp_path / "general", fast, general)


class _Crash(KeyboardInterrupt):
    pass


def test_a_run_interrupted_on_one_path_resumes_on_the_other(tmp_path, monkeypatch):
    """Both paths chunk documents alike and journal the same positions: a journal written by one is
    resumed by the other (e.g. across a moeforge upgrade) into exactly the uninterrupted output."""
    opts = dict(max_docs=160, shard_tokens=100_003, val_fraction=0.05, chunk_chars=30_000)
    reference = prepare_dataset(tmp_path / "ref", **opts)

    def crash_on_second(journals):
        def hook(state):
            journals.append(state)
            if len(journals) == 2:
                raise _Crash()
        return hook

    for first_general, name in ((True, "general-then-fast"), (False, "fast-then-general")):
        out, journals = tmp_path / name, []
        with monkeypatch.context() as m:
            if first_general:
                _general_path(m)
            with pytest.raises(_Crash):
                prepare_dataset(out, on_journal=crash_on_second(journals), **opts)
        assert (out / JOURNAL).is_file() and not (out / "manifest.json").exists()
        assert json.loads((out / JOURNAL).read_text())["position"]["next_doc"] > 0
        with monkeypatch.context() as m:
            if not first_general:
                _general_path(m)
            resumed = prepare_dataset(out, **opts)
        assert resumed["splits"] == reference["splits"]
        assert not list(out.rglob("*.tmp")) and not (out / JOURNAL).exists()


def test_background_writer_writes_what_the_plain_writer_writes(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 5_000, size=400)
    tokens = rng.integers(0, 255, size=int(lengths.sum())).astype(np.uint16)
    entries, states = {}, {}
    for background in (False, True):
        root = tmp_path / str(background)
        w = ShardWriter(root, "train", np.uint16, shard_tokens=100_003, eos_id=256, background=background)
        for a in range(0, 400, 13):
            lo, hi = int(lengths[:a].sum()), int(lengths[:a + 13].sum())
            w.append(tokens[lo:hi], lengths[a:a + 13])
            if a == 195:
                w.sync()
                states[background] = w.state()
        entries[background] = w.finish()
    assert entries[False] == entries[True] and states[False] == states[True]
    assert snapshot(tmp_path / "False") == snapshot(tmp_path / "True")


def test_background_writer_raises_an_io_error_in_the_caller(tmp_path, monkeypatch):
    def broken(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shard_writer_module, "_BACKGROUND_SYNC", 1 << 10)
    monkeypatch.setattr(shard_writer_module, "_fdatasync", broken)
    w = ShardWriter(tmp_path, "train", np.uint16, shard_tokens=1 << 20, eos_id=256, background=True)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(100):
            w.append(np.ones(4_096, dtype=np.uint16), np.array([4_096]))
        w.finish()
    w.abort()  # after an error: closes the files, does not raise or hang
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
