"""Shard format, writer and `verify`: damaged or mismatched datasets are caught before training reads them."""

import json
from pathlib import Path

import numpy as np
import pytest

from data import DataError, verify
from data.shard_writer import ShardWriter
from data.shards import INDEX_DTYPE, fingerprint, read_manifest
from data.stream import TokenStream
from data.tokenizer import token_dtype
from tests.data_helpers import doc_starts, prepare_dataset, stream


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "ds"
    prepare_dataset(out, max_docs=40, shard_tokens=50_000, val_fraction=0.1)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_writer_cuts_exact_shards_and_records_document_starts(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=200)
    tokens = rng.integers(0, 255, size=int(lengths.sum())).astype(np.uint16)
    w = ShardWriter(tmp_path, "train", np.uint16, shard_tokens=97, eos_id=256)
    for a in range(0, 200, 17):  # several appends, documents crossing shard ends
        lo, hi = int(lengths[:a].sum()), int(lengths[:a + 17].sum())
        w.append(tokens[lo:hi], lengths[a:a + 17])
    entry = w.finish()
    sizes = [s["tokens"] for s in entry["shards"]]
    assert sizes[:-1] == [97] * (len(sizes) - 1) and 0 < sizes[-1] <= 97 and sum(sizes) == len(tokens)
    got = np.concatenate([np.fromfile(tmp_path / s["data"]["file"], dtype="<u2") for s in entry["shards"]])
    assert np.array_equal(got, tokens)
    starts, base = [], 0
    for s in entry["shards"]:
        starts.extend((np.fromfile(tmp_path / s["index"]["file"], dtype=INDEX_DTYPE) + base).tolist())
        base += s["tokens"]
    assert starts == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    assert sum(s["documents"] for s in entry["shards"]) == 200 == entry["documents"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert entry["fingerprint"] == fingerprint("uint16", 256, entry["shards"])


def test_uint32_when_the_vocab_does_not_fit_uint16(tmp_path):
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(129280) == np.uint32  # DeepSeek-V3's vocab
    ids = np.array([5, 70_000, 129_279, 70_001, 0], dtype=np.uint32)
    w = ShardWriter(tmp_path, "train", np.uint32, shard_tokens=3, eos_id=0)
    w.append(ids, np.array([2, 3]))
    entry = w.finish()
    manifest = {"format": "moeforge-tokens", "format_version": 1, "dtype": "uint32", "vocab_size": 129280,
                "eos_id": 0, "tokenizer": {}, "splits": {"train": entry}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    s = TokenStream(tmp_path)
    out = np.empty(5, dtype=np.int64)
    s.read(0, out)
    assert out.tolist() == ids.tolist()
    assert s.doc_starts(0, 5).tolist() == [0, 2]


def test_verify_accepts_a_good_dataset(dataset):
    m = verify(dataset, vocab_size=512)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 40
    assert m["dtype"] == "uint16" and m["vocab_size"] == 262 and m["eos_id"] == 256


def test_truncated_shard_is_named(dataset, tmp_path):
    ds = _copy(dataset, tmp_path / "ds")
    victim = ds / "train" / "00001.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(DataError) as info:
        verify(ds)
    msg = str(info.value)
    assert str(victim) in msg and "bytes" in msg and "\n" not in msg
    with pytest.raises(DataError, match="00001.bin"):  # the loader's own open refuses it too
        TokenStream(ds)


def test_corrupted_shard_is_named(dataset, tmp_path):
    ds = _copy(dataset, tmp_path / "ds")
    victim = ds / "train" / "00000.bin"
    raw = bytearray(victim.read_bytes())
    raw[1001] ^= 0x01  # same size, one bit flipped
    victim.write_bytes(bytes(raw))
    with pytest.raises(DataError) as info:
        verify(ds)
    assert str(victim) in str(info.value) and "SHA-256 mismatch" in str(info.value)
    verify(ds, hashes=False)  # sizes alone cannot see it: hashing is what catches it


def test_corrupted_index_is_named(dataset, tmp_path):
    ds = _copy(dataset, tmp_path / "ds")
    victim = ds / "val" / "00000.idx"
    raw = bytearray(victim.read_bytes())
    raw[0] ^= 0x10
    victim.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="val/00000.idx: SHA-256 mismatch"):
        verify(ds)


def test_newer_manifest_version_is_refused(dataset, tmp_path):
    ds = _copy(dataset, tmp_path / "ds")
    m = json.loads((ds / "manifest.json").read_text())
    m["format_version"] = 2
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as info:
        verify(ds)
    msg = str(info.value)
    assert str(ds / "manifest.json") in msg and "format version 2 is newer" in msg


def test_token_ids_beyond_the_model_vocab_are_refused(dataset):
    with pytest.raises(DataError) as info:
        verify(dataset, vocab_size=256)  # the byte tokenizer's EOS is id 256
    msg = str(info.value)
    assert str(dataset / "manifest.json") in msg and "256" in msg and "261" in msg and "vocab_size 256" in msg


def test_missing_manifest_and_missing_split_are_named(dataset, tmp_path):
    with pytest.raises(DataError, match="no such dataset folder"):
        verify(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json: missing"):
        read_manifest(tmp_path / "empty")
    with pytest.raises(DataError, match="no split 'test'"):
        TokenStream(dataset, "test")


def test_stream_reads_across_shard_boundaries(dataset):
    s = TokenStream(dataset)
    ref = stream(dataset)
    assert s.total == len(ref) and len(s.shards) > 2
    for start in [0, 49_990, 50_000, 99_999, s.total - 7]:
        out = np.empty(min(20, s.total - start), dtype=np.int64)
        s.read(start, out)
        assert np.array_equal(out, ref[start:start + len(out)])
    starts = doc_starts(dataset)
    assert np.array_equal(s.doc_starts(0, s.total), starts)
    assert np.array_equal(s.doc_starts(40_000, 120_000), starts[(starts >= 40_000) & (starts < 120_000)])
