"""Preparation split across machines (`shard_index=i num_shards=n`) and `data.merge`: the merged dataset
holds the same tokens, in the same order, as one preparation; a bad set of parts is refused, naming it."""

import json
import shutil

import numpy as np
import pytest

from data import DataError
from data.merge import merge
from data.shards import verify
from data.stream import TokenStream
from tests.data_helpers import doc_starts, generated_documents, prepare_dataset, snapshot, stream, write_jsonl


def _corpus(tmp_path, kind: str):
    """A folder of files of very different sizes (cuts fall between and inside files), or one big file."""
    if kind == "one big file":
        return write_jsonl(tmp_path / "big.jsonl", generated_documents(300, seed=11))
    folder = tmp_path / "in"
    write_jsonl(folder / "a.jsonl", generated_documents(20, seed=1))
    write_jsonl(folder / "b" / "big.jsonl", generated_documents(200, seed=2))
    for i, d in enumerate(generated_documents(15, seed=3)):
        (folder / "c").mkdir(exist_ok=True)
        (folder / "c" / f"{i:02d}.txt").write_text(d)
    write_jsonl(folder / "d.jsonl", generated_documents(60, seed=4))
    return folder


def _same_stream(a, b, split):
    assert np.array_equal(stream(a, split), stream(b, split))
    assert np.array_equal(doc_starts(a, split), doc_starts(b, split))


@pytest.mark.parametrize("kind,opts", [
    ("folder", dict(val_fraction=0.1, fim_rate=0.3, seed=5)),  # the worker path, FIM and a val split
    ("one big file", dict(val_fraction=0.043)),  # the byte path; the cuts are row ranges of one file
    ("one big file", dict(val_input="val.parquet")),  # a separate validation input, split the same way
])
def test_three_parts_merged_hold_the_same_tokens_as_one_preparation(tmp_path, kind, opts):
    src = _corpus(tmp_path, kind)
    if "val_input" in opts:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": generated_documents(50, seed=12)}), tmp_path / "val.parquet",
                       row_group_size=7)
        opts = {**opts, "val_input": str(tmp_path / "val.parquet")}
    opts = dict(input=str(src), shard_tokens=4099, chunk_chars=3000, **opts)
    one = prepare_dataset(tmp_path / "one", **opts)
    for i in (2, 0, 1):  # any order, any machine
        part = prepare_dataset(tmp_path / "split", shard_index=i, num_shards=3, **opts)
        assert part["source"]["part"]["index"] == i
    ranges = [json.loads((tmp_path / "split" / f"part-0000{i}-of-00003" / "manifest.json").read_text())
              ["source"]["part"] for i in range(3)]
    if kind == "one big file":
        assert [r["from"] for r in ranges] == [[0, 0], [0, ranges[1]["from"][1]], [0, ranges[2]["from"][1]]]
        assert 0 < ranges[1]["from"][1] < ranges[2]["from"][1] < 300  # cut by rows
    before = snapshot(tmp_path / "split")
    merged = prepare_dataset(tmp_path / "split", num_shards=3, merge=True, **opts)
    after = snapshot(tmp_path / "split")
    assert set(after) - set(before) == {"manifest.json"} and all(after[k] == before[k] for k in before)  # no copies
    for split in ("train", "val"):
        _same_stream(tmp_path / "one", tmp_path / "split", split)
        assert merged["splits"][split]["documents"] == one["splits"][split]["documents"]
        assert merged["splits"][split]["tokens"] == one["splits"][split]["tokens"]
    assert one["splits"]["val"]["documents"] > 0
    verify(tmp_path / "split")  # sizes, hashes and fingerprints of the referenced files
    s1, s2 = TokenStream(tmp_path / "one"), TokenStream(tmp_path / "split")
    assert s1.total == s2.total
    for start in (0, 4098, 4099, s1.total // 2, s1.total - 9000):  # windows across shard and part edges
        a, b = np.empty(9000, np.int64), np.empty(9000, np.int64)
        s1.read(start, a)
        s2.read(start, b)
        assert np.array_equal(a, b)
        assert np.array_equal(s1.doc_starts(start, start + 9000), s2.doc_starts(start, start + 9000))
    # The loader reads the merged dataset: the same sequences give the same batches, documents included.
    from data.loader import ShardedTokenLoader

    la = ShardedTokenLoader(tmp_path / "one", 512, 4, 4, 0, 1, seed=0, document_aware=True)
    lb = ShardedTokenLoader(tmp_path / "split", 512, 4, 4, 0, 1, seed=0, document_aware=True)
    assert la.num_sequences == lb.num_sequences
    seqs = np.arange(la.num_sequences)
    ba, bb = la.read_batch(seqs), lb.read_batch(seqs)
    assert set(ba) == set(bb) and all((ba[k] == bb[k]).all() for k in ba)
    assert merged["source"] == {k: v for k, v in one["source"].items()}
    assert merged["tokenizer"] == one["tokenizer"] and len(merged["parts"]) == 3
    # data.merge with the part folders named is the same dataset; re-running it is a no-op
    again = merge([tmp_path / "split" / f"part-0000{i}-of-00003" for i in (1, 0, 2)], tmp_path / "elsewhere")
    assert again["splits"]["train"]["fingerprint"] == merged["splits"]["train"]["fingerprint"]
    assert again["splits"]["train"]["shards"][0]["data"]["file"].startswith("../split/part-00000-of-00003/")
    _same_stream(tmp_path / "one", tmp_path / "elsewhere", "train")
    assert merge([tmp_path / "split" / f"part-0000{i}-of-00003" for i in range(3)], tmp_path / "elsewhere") == \
        json.loads((tmp_path / "elsewhere" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    src = write_jsonl(root / "in.jsonl", generated_documents(90, seed=8))
    opts = dict(input=str(src), shard_tokens=3001, val_fraction=0.1)
    for i in range(3):
        prepare_dataset(root / "ds", shard_index=i, num_shards=3, **opts)
    prepare_dataset(root / "other_tok", shard_index=1, num_shards=3, add_bos="true", **opts)
    prepare_dataset(root / "other_opt", shard_index=1, num_shards=3, **{**opts, "val_fraction": 0.2})
    prepare_dataset(root / "four", shard_index=1, num_shards=4, **opts)
    return root, opts


def test_parts_prepared_from_copies_of_the_input_at_other_paths_merge(parts, tmp_path):
    """Each machine may mount the corpus elsewhere: the input is compared by content, not path."""
    root, opts = parts
    copy = tmp_path / "mnt" / "in.jsonl"
    copy.parent.mkdir()
    shutil.copy(opts["input"], copy)
    prepare_dataset(tmp_path / "ds", shard_index=2, num_shards=3, **{**opts, "input": str(copy)})
    m = merge([_part(root, 0), _part(root, 1), _part(tmp_path, 2)], tmp_path / "merged")
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 90
    # A copy with one more document is another input: refused, naming the difference.
    with copy.open("a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    shutil.rmtree(tmp_path / "ds")
    prepare_dataset(tmp_path / "ds", shard_index=2, num_shards=3, **{**opts, "input": str(copy)})
    with pytest.raises(DataError, match=r"source\.bytes .* not parts of the same input"):
        merge([_part(root, 0), _part(root, 1), _part(tmp_path, 2)], tmp_path / "merged2")
    assert not (tmp_path / "merged2").exists()


def test_parts_prepared_with_copies_of_the_tokenizer_at_other_paths_merge(parts, tmp_path):
    """The tokenizer is compared by content (SHA-256, vocab, EOS/BOS), not by the folder or file it sits in."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root, opts = parts
    words = sorted({w for d in generated_documents(90, seed=8) for w in d.split()})
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<unk>", "</s>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for folder in ("mnt_a/tok", "mnt_b/other_name"):
        (tmp_path / folder).mkdir(parents=True)
        tok.save(str(tmp_path / folder / "tokenizer.json"))
    for i, folder in enumerate(("mnt_a/tok", "mnt_b/other_name", "mnt_a/tok")):
        prepare_dataset(tmp_path / "ds", shard_index=i, num_shards=3, tokenizer=str(tmp_path / folder), **opts)
    m = merge([_part(tmp_path, i) for i in range(3)], tmp_path / "merged")
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 90


def _part(root, i, n=3, under="ds"):
    return root / under / f"part-{i:05d}-of-{n:05d}"


def test_a_merge_through_a_symlinked_output_keeps_part_paths_inside_it(parts, tmp_path):
    """Parts inside the merged folder stay relative to it (part-…/train/…) when output is named
    through a link, so the folder can move with its parts."""
    root, _ = parts
    shutil.copytree(root / "ds", tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    m = merge([tmp_path / "link" / _part(root, i).name for i in range(3)], tmp_path / "link")
    files = [s[k]["file"] for sp in m["splits"].values() for s in sp["shards"] for k in ("data", "index")]
    assert all(f.startswith("part-0000") for f in files) and [p["path"] for p in m["parts"]] == \
        [_part(root, i).name for i in range(3)]
    (tmp_path / "real").rename(tmp_path / "moved")
    verify(tmp_path / "moved")


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "other tokenizer", "other options",
                                  "other count", "twice", "not a part", "gap", "no config", "no val split",
                                  "output manifest not an object"])
def test_a_bad_set_of_parts_is_refused_naming_it_and_nothing_is_written(parts, tmp_path, case):
    root, opts = parts
    work = tmp_path / "ds"
    shutil.copytree(root / "ds", work)
    given = [_part(tmp_path, i) for i in range(3)]
    if case == "missing":
        shutil.rmtree(given[1])
        needles = [str(given[1])]
    elif case == "corrupt":
        f = given[2] / "train" / "00000.bin"
        raw = bytearray(f.read_bytes())
        raw[100] ^= 0x01
        f.write_bytes(bytes(raw))
        needles = [str(f), "SHA-256 mismatch"]
    elif case == "truncated":
        f = given[0] / "train" / "00000.bin"
        f.write_bytes(f.read_bytes()[:-2])
        needles = [str(f), "bytes"]
    elif case == "other tokenizer":
        given[1] = _part(root, 1, under="other_tok")
        needles = [str(given[1]), "differs"]
    elif case == "other options":
        given[1] = _part(root, 1, under="other_opt")
        needles = [str(given[1]), "val_fraction=0.2"]
    elif case == "other count":
        given[1] = _part(root, 1, n=4, under="four")
        needles = [str(given[1]), "num_shards=4"]
    elif case == "gap":  # a part whose recorded range does not start where the previous one ends
        mf = given[2] / "manifest.json"
        m = json.loads(mf.read_text())
        m["source"]["part"]["from"][1] += 1
        mf.write_text(json.dumps(m))
        needles = [str(mf), "range starts at"]
    elif case in ("no config", "no val split"):  # a part manifest edited by hand: a line, not a KeyError
        mf = given[1] / "manifest.json"
        m = json.loads(mf.read_text())
        if case == "no config":
            del m["config"]
        else:
            del m["splits"]["val"]
        mf.write_text(json.dumps(m))
        needles = [str(mf), "'config'" if case == "no config" else "splits ['train']"]
    elif case == "output manifest not an object":
        (tmp_path / "merged").mkdir()
        (tmp_path / "merged" / "manifest.json").write_text("[1]")
        needles = [str(tmp_path / "merged" / "manifest.json"), "unreadable"]
    elif case == "twice":
        given[2] = given[0]
        needles = ["part 0 given twice"]
    else:
        prepare_dataset(tmp_path / "whole", input=opts["input"], max_docs=5)
        given[0] = tmp_path / "whole"
        needles = [str(tmp_path / "whole"), "not a part"]
    before = snapshot(work)
    out = tmp_path / "merged"
    with pytest.raises(DataError) as info:
        merge(given, out)
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    if case == "output manifest not an object":
        assert (out / "manifest.json").read_text() == "[1]"
        shutil.rmtree(out)
    assert snapshot(work) == before and not out.exists()
    if case == "missing":  # through data.prepare merge=true: the part named by number
        with pytest.raises(DataError, match=r"part-00001-of-00003"):
            prepare_dataset(work, num_shards=3, merge=True, **opts)
        assert not (work / "manifest.json").exists()


def test_bad_shard_options_are_named_and_write_nothing(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", generated_documents(10, seed=1))
    for override, needle in ((dict(shard_index=3, num_shards=3), "shard_index=3: out of range for num_shards=3"),
                             (dict(shard_index=-1, num_shards=2), "shard_index=-1"),
                             (dict(num_shards=0), "num_shards=0: must be >= 1"),
                             (dict(num_shards=2, max_docs=5), "max_docs=5"),
                             (dict(merge=True), "merge=true: needs num_shards > 1")):
        with pytest.raises(DataError, match=needle):
            prepare_dataset(tmp_path / "out", input=str(src), **override)
        assert not (tmp_path / "out").exists()


def test_more_parts_than_documents_leaves_empty_parts_that_merge(tmp_path):
    for i, d in enumerate(generated_documents(2, seed=4)):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.txt").write_text(d)
    opts = dict(input=str(tmp_path / "in"), val_fraction=0.0)
    prepare_dataset(tmp_path / "one", **opts)
    docs = [prepare_dataset(tmp_path / "split", shard_index=i, num_shards=3, **opts)["splits"]["train"]["documents"]
            for i in range(3)]
    assert sorted(docs) == [0, 1, 1]  # a one-document file is never cut: one part is empty
    prepare_dataset(tmp_path / "split", num_shards=3, merge=True, **opts)
    _same_stream(tmp_path / "one", tmp_path / "split", "train")
    # A val_input without documents fails the merge as it fails one preparation.
    (tmp_path / "val.jsonl").write_text("\n\n")
    opts = dict(input=str(tmp_path / "in"), val_input=str(tmp_path / "val.jsonl"))
    with pytest.raises(DataError, match="val_input=.*val.jsonl: no documents"):
        prepare_dataset(tmp_path / "one_val", **opts)
    for i in range(2):
        prepare_dataset(tmp_path / "split_val", shard_index=i, num_shards=2, **opts)
    with pytest.raises(DataError, match="val_input=.*val.jsonl: no documents in any of the 2 parts"):
        prepare_dataset(tmp_path / "split_val", num_shards=2, merge=True, **opts)
    assert not (tmp_path / "split_val" / "manifest.json").exists()


class _Crash(Exception):
    pass


def test_an_interrupted_part_resumes_and_the_merge_still_equals_one_preparation(tmp_path):
    src = write_jsonl(tmp_path / "big.jsonl", generated_documents(400, seed=21))
    opts = dict(input=str(src), shard_tokens=2003, chunk_chars=2000, val_fraction=0.05, fim_rate=0.2, seed=2)
    prepare_dataset(tmp_path / "one", **opts)
    calls = []

    def crash_on_second(state):
        calls.append(state)
        if len(calls) == 2:
            raise _Crash()

    with pytest.raises(_Crash):
        prepare_dataset(tmp_path / "split", shard_index=1, num_shards=2, on_journal=crash_on_second, **opts)
    assert len(calls) == 2
    prepare_dataset(tmp_path / "split", shard_index=0, num_shards=2, **opts)
    with pytest.raises(DataError, match="part-00001-of-00002.*did not finish"):  # an incomplete part
        merge([_part(tmp_path, i, 2, "split") for i in range(2)], tmp_path / "split")
    assert not (tmp_path / "split" / "manifest.json").exists()
    prepare_dataset(tmp_path / "split", shard_index=1, num_shards=2, num_proc=2, **opts)  # resumes
    prepare_dataset(tmp_path / "split", num_shards=2, merge=True, **opts)
    for split in ("train", "val"):
        _same_stream(tmp_path / "one", tmp_path / "split", split)
