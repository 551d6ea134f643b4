"""The inputs pretraining teams have: every format and compression, folders, globs, comma lists, saved
`datasets`, files that are not data, and tokenizers (by path, by name from the cache, BOS)."""

import bz2
import gzip
import json
import lzma
import subprocess
import sys

import numpy as np
import pytest

from data import DataError
from data.corpus import open_source
from data.tokenizer import ByteTokenizer
from tests.data_helpers import REPO, documents, generated_documents, prepare_dataset, write_jsonl

BYTE = ByteTokenizer()
DOCS = generated_documents(12, seed=7)


def _jsonl_bytes(docs, key="text") -> bytes:
    return "".join(json.dumps({key: d, "n": i}) + "\n" for i, d in enumerate(docs)).encode()


def _zstd(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(raw)


def _arrow_stream_bytes(docs) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    table = pa.table({"text": docs})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=len(docs) // 4):
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _decoded(path, split="train"):
    return [BYTE.decode(d[:-1]) for d in documents(path, split)]


@pytest.mark.parametrize("name,write", [
    ("d.jsonl", lambda p: p.write_bytes(_jsonl_bytes(DOCS))),
    ("d.ndjson", lambda p: p.write_bytes(b"\n" + _jsonl_bytes(DOCS) + b"\n\n")),  # blank lines are not rows
    ("d.json", lambda p: p.write_text(json.dumps([{"text": d} for d in DOCS]))),
    ("bom.json", lambda p: p.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": d} for d in DOCS]).encode())),
    ("bom.jsonl", lambda p: p.write_bytes(b"\xef\xbb\xbf" + _jsonl_bytes(DOCS))),  # as Windows tools write them
    ("d.jsonl.gz", lambda p: p.write_bytes(gzip.compress(_jsonl_bytes(DOCS)))),
    ("d.jsonl.zst", lambda p: p.write_bytes(_zstd(_jsonl_bytes(DOCS)))),
    ("frames.jsonl.zst", lambda p: p.write_bytes(_zstd(_jsonl_bytes(DOCS[:5])) + _zstd(_jsonl_bytes(DOCS[5:])))),
    ("d.json.bz2", lambda p: p.write_bytes(bz2.compress(_jsonl_bytes(DOCS)))),
    ("d.jsonl.xz", lambda p: p.write_bytes(lzma.compress(_jsonl_bytes(DOCS)))),
    ("d.parquet", "parquet"), ("d.arrow", "arrow-stream"), ("e.arrow", "arrow-file"),
])
def test_every_format_and_compression_reads_the_documents_in_order(tmp_path, name, write):
    path = tmp_path / name
    if callable(write):
        write(path)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"n": list(range(len(DOCS))), "text": DOCS})
        if write == "parquet":
            pq.write_table(table, path, row_group_size=5)  # several row groups
        else:
            opener = pa.ipc.new_stream if write == "arrow-stream" else pa.ipc.new_file
            with opener(str(path), table.schema) as w:
                for batch in table.to_batches(max_chunksize=5):
                    w.write_batch(batch)
    src = open_source(str(path))
    assert list(src.documents()) == DOCS
    assert [(k, r) for k, r, _ in src.records()] == [(0, r) for r in range(len(DOCS))]
    assert src.count_rows(0) == len(DOCS)
    # A row range reads exactly those rows (what a part of a split preparation reads).
    part = src.part(1, 3)
    (f0, r0), (f1, r1) = part.part_range
    assert list(part.documents()) == DOCS[r0:r1] and (f0, f1) == (0, 0) and 0 < r0 < r1 < len(DOCS)


def test_compressed_text_and_source_files_and_a_prepared_round_trip(tmp_path):
    folder = tmp_path / "code"
    (folder / "pkg").mkdir(parents=True)
    (folder / "a.py").write_text(DOCS[0])
    (folder / "b.md").write_text(DOCS[1])
    (folder / "pkg" / "c.txt.zst").write_bytes(_zstd(DOCS[2].encode()))
    (folder / "pkg" / "d.rs").write_text(DOCS[3])
    (folder / "pkg" / "e.txt.gz").write_bytes(gzip.compress(DOCS[4].encode()))
    prepare_dataset(tmp_path / "ds", input=str(folder), val_fraction=0.0)
    assert _decoded(tmp_path / "ds") == DOCS[:5]  # sorted by relative path, one document per file
    with pytest.raises(DataError, match=r"x\.parquet\.gz: unknown file type"):  # a columnar file is not compressed
        (tmp_path / "x.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
        open_source(str(tmp_path / "x.parquet.gz"))


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_text_by_paragraph_and_by_line_with_either_line_ending(tmp_path, newline):
    text = "para one\nline two\n\npara two\n \n\npara three\n".replace("\n", newline)
    (tmp_path / "t.txt").write_bytes(text.encode())
    paragraphs = list(open_source(str(tmp_path / "t.txt"), text_sample_by="paragraph").documents())
    assert paragraphs == [f"para one{newline}line two", "para two", "para three"]
    lines = list(open_source(str(tmp_path / "t.txt"), text_sample_by="line").documents())
    assert lines == ["para one", "line two", "para two", "para three"]


@pytest.mark.parametrize("name,damaged", [
    ("cut.jsonl.gz", lambda raw: gzip.compress(raw)[:-30]),
    ("cut.jsonl.zst", lambda raw: _zstd(raw)[:-30]),
    ("bad.jsonl.xz", lambda raw: b"not xz at all"),
    ("cut.arrow", lambda raw: _arrow_stream_bytes(DOCS * 20)[:-300]),  # batches after the schema cut short
])
def test_a_damaged_compressed_file_is_one_line_naming_it(tmp_path, name, damaged):
    path = tmp_path / name
    path.write_bytes(damaged(_jsonl_bytes(DOCS * 20)))
    with pytest.raises(DataError) as info:
        prepare_dataset(tmp_path / "out", input=str(path))
    assert str(path) in str(info.value) and "unreadable" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_globs_and_comma_lists(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / "in" / f"s{i}.jsonl", DOCS[4 * i:4 * i + 4])
    (tmp_path / "in" / "extra.txt").write_text("not matched")
    src = open_source(str(tmp_path / "in" / "s*.jsonl"))
    assert list(src.documents()) == DOCS and src.identity()["files"] == 3
    src = open_source(f"{tmp_path / 'in' / 's2.jsonl'},{tmp_path / 'in' / 's0.jsonl'}")  # the order given
    assert list(src.documents()) == DOCS[8:] + DOCS[:4]
    src = open_source(str(tmp_path / "**" / "*.jsonl"))  # recursive glob
    assert list(src.documents()) == DOCS
    # Hidden is judged inside each entry: a folder under ~/.cache is data, whatever the entries' common root.
    write_jsonl(tmp_path / ".cache" / "ds" / "a.jsonl", DOCS[:2])
    (tmp_path / ".cache" / "ds" / ".lock").write_text("")
    src = open_source(f"{tmp_path / '.cache' / 'ds'},{tmp_path / 'in' / 's0.jsonl'}")
    assert list(src.documents()) == DOCS[:2] + DOCS[:4] and src.skipped == [(".cache/ds/.lock", "hidden")]
    for spec, needle in ((str(tmp_path / "nothing*.jsonl"), "matches nothing"),
                         (f"{tmp_path / 'in' / 's0.jsonl'},{tmp_path / 'gone.jsonl'}", "gone.jsonl: no such file")):
        with pytest.raises(DataError, match=needle):
            open_source(spec)


def test_a_symlinked_folder_is_data_and_read_once(tmp_path):
    write_jsonl(tmp_path / "elsewhere" / "b.jsonl", DOCS[4:])
    write_jsonl(tmp_path / "in" / "a.jsonl", DOCS[:4])
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "in" / "linked2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # the same folder
    (tmp_path / "elsewhere" / "up").symlink_to(tmp_path / "in", target_is_directory=True)  # a loop
    src = open_source(str(tmp_path / "in"))
    assert list(src.documents()) == DOCS and src.skipped == []


def test_a_folder_that_cannot_be_listed_is_an_error_not_skipped(tmp_path, monkeypatch):
    import os

    write_jsonl(tmp_path / "in" / "a.jsonl", DOCS[:2])
    write_jsonl(tmp_path / "in" / "locked" / "b.jsonl", DOCS[2:])
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (tests may run as root)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"locked: cannot list \(Permission denied\)"):
        open_source(str(tmp_path / "in"))


def test_a_file_linked_to_a_blob_is_read_by_its_own_name(tmp_path):
    """The Hugging Face hub cache: snapshots/<rev>/data/train.jsonl -> ../../../blobs/<sha> (no extension)."""
    blob = tmp_path / "hub" / "blobs" / "3f9a0c"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(_jsonl_bytes(DOCS))
    data = tmp_path / "hub" / "snapshots" / "rev" / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").symlink_to("../../../blobs/3f9a0c")
    for spec in (data / "train.jsonl", tmp_path / "hub" / "snapshots" / "*" / "data" / "*.jsonl",
                 f"{data / 'train.jsonl'},{data}", tmp_path / "hub" / "snapshots" / "rev"):
        src = open_source(str(spec))
        assert src.files == [data / "train.jsonl"] and list(src.documents()) == DOCS, spec


def test_save_to_disk_folders_read_their_rows_not_their_metadata(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "saved"))
    src = open_source(str(tmp_path / "saved"))
    assert list(src.documents()) == DOCS
    assert sorted(why for _, why in src.skipped) == ["datasets metadata", "datasets metadata"]  # state, info
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    assert list(open_source(str(tmp_path / "dict")).documents()) == DOCS
    assert list(open_source(str(tmp_path / "dict"), hub_split="test").documents()) == DOCS[:2]
    with pytest.raises(DataError, match="without split 'dev' .has: train, test"):
        open_source(str(tmp_path / "dict"), hub_split="dev")
    for damaged in ("[]", '{"splits": "train"}'):  # a damaged dataset_dict.json: the same line, not a traceback
        (tmp_path / "dict" / "dataset_dict.json").write_text(damaged)
        with pytest.raises(DataError, match="without split 'train' .has: none"):
            open_source(str(tmp_path / "dict"))


def test_files_that_are_not_data_are_skipped_and_reported_once(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": DOCS[:6]}), repo / "data" / "train-0.parquet")
    write_jsonl(repo / "data" / "train-1.jsonl", DOCS[6:])
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# The dataset card\n")
    (repo / "LICENSE").write_text("MIT")
    (repo / "data" / "licence.txt").write_text("CC-BY")
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n")
    (repo / ".git" / "objects").mkdir(parents=True)
    (repo / ".git" / "objects" / "x.jsonl").write_text('{"text": "never"}\n')
    (repo / "dataset_info.json").write_text('{"features": {}}')
    m = prepare_dataset(tmp_path / "ds", input=str(repo), val_fraction=0.0)
    assert _decoded(tmp_path / "ds") == DOCS  # the card, licences, metadata and hidden files: never trained on
    assert m["source"]["files"] == 2 and m["source"]["skipped"] == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 6 files that are not data" in err[0]
    for needle in ("README.md (dataset card)", "LICENSE (licence)", ".git/ (hidden)", ".gitattributes (hidden)",
                   "dataset_info.json (datasets metadata)", "data/licence.txt (licence)"):
        assert needle in err[0], needle
    # Licence is a text file's name, not a prefix of any name: these are data.
    lic = tmp_path / "lic"
    write_jsonl(lic / "license_plates.jsonl", DOCS[:2])
    write_jsonl(lic / "notices-2020.jsonl", DOCS[2:4])
    (lic / "noticeboard.md").write_text("board")
    (lic / "LICENSE-MIT").write_text("MIT")
    (lic / "COPYING.LESSER").write_text("LGPL")
    src = open_source(str(lic))
    assert list(src.documents()) == [*DOCS[:2], "board", *DOCS[2:4]]
    assert src.skipped == [("COPYING.LESSER", "licence"), ("LICENSE-MIT", "licence")]
    # A folder of only text files is text data: its README.md is a document.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("readme as data")
    (notes / "guide.txt").write_text("guide")
    assert list(open_source(str(notes)).documents()) == ["readme as data", "guide"]
    (notes / ".markdownlint.json").write_text("{}")  # a hidden or metadata JSON file is no structured data
    (notes / "sub").mkdir()
    (notes / "sub" / "dataset_info.json").write_text("{}")
    assert list(open_source(str(notes)).documents()) == ["readme as data", "guide"]
    # "Beside" means the same folder or one above the data files: a README elsewhere stays data.
    write_jsonl(tmp_path / "mixed" / "web" / "a.jsonl", DOCS[:2])
    (tmp_path / "mixed" / "web" / "README.md").write_text("card of web")
    (tmp_path / "mixed" / "notes").mkdir()
    (tmp_path / "mixed" / "notes" / "README.md").write_text("notes readme")
    src = open_source(f"{tmp_path / 'mixed' / 'notes'},{tmp_path / 'mixed' / 'web'}")
    assert list(src.documents()) == ["notes readme", *DOCS[:2]] and src.skipped == [("web/README.md", "dataset card")]
    # An unknown type: one line naming it, unless skip_unknown.
    (repo / "data" / "stats.csv").write_text("a,b\n")
    with pytest.raises(DataError) as info:
        open_source(str(repo))
    assert "stats.csv: unknown file type" in str(info.value) and "skip_unknown=true" in str(info.value)
    src = open_source(str(repo), skip_unknown=True)
    assert ("data/stats.csv", "unknown type") in src.skipped and list(src.documents()) == DOCS


def test_a_dataset_by_name_loads_offline_from_the_datasets_cache(tmp_path):
    """A cache entry generated here (datasets' own layout), read by name with no network."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "tiny" / "data").mkdir(parents=True)  # cached as datasets/tiny/…/tiny-train.arrow
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "tiny" / "data" / "train-00000-of-00001.parquet")
    home = tmp_path / "hf"
    make = (f"import datasets, shutil; datasets.load_dataset({str(tmp_path / 'tiny')!r}, split='train'); "
            f"shutil.move({str(home / 'datasets' / 'tiny')!r}, {str(home / 'datasets' / 'tester___tiny')!r})")
    script = (f"from data.prepare import PrepareConfig, prepare; "
              f"opts = dict(input='tester/tiny', val_fraction=0.0, num_proc=1, progress=False); "
              f"prepare(PrepareConfig(output={str(tmp_path / 'ds')!r}, **opts)); "
              f"[prepare(PrepareConfig(output={str(tmp_path / 'parts')!r}, shard_index=i, num_shards=2, **opts)) "
              f"for i in (0, 1)]; "
              f"prepare(PrepareConfig(output={str(tmp_path / 'parts')!r}, num_shards=2, merge=True, **opts))")
    env = {"HF_HOME": str(home), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    for code in (make, script):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert _decoded(tmp_path / "ds") == DOCS
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m["source"]["kind"] == "hub" and m["source"]["rows"] == len(DOCS)
    assert _decoded(tmp_path / "parts") == DOCS  # split by row ranges of the dataset, then merged
    assert json.loads((tmp_path / "parts" / "part-00001-of-00002" / "manifest.json").read_text())[
        "source"]["part"]["from"] == [0, len(DOCS) // 2]


# ----------------------------------------------------------------------------- tokenizers
def _saved_tokenizer(folder, add_bos_token=None):
    """A WordLevel tokenizer built with `tokenizers`, saved by transformers (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for d in DOCS for w in d.split()})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(folder))
    if add_bos_token is not None:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["add_bos_token"] = add_bos_token
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return vocab


def test_bos_per_document_as_the_tokenizer_config_says(tmp_path):
    vocab = _saved_tokenizer(tmp_path / "plain")
    _saved_tokenizer(tmp_path / "llama_like", add_bos_token=True)
    write_jsonl(tmp_path / "in.jsonl", DOCS[:4])
    runs = {"plain": {}, "llama_like": {}, "forced": {"add_bos": "true"}, "off": {"add_bos": "false"}}
    got = {}
    for name, opts in runs.items():
        tok = tmp_path / ("plain" if name == "forced" else "llama_like" if name == "off" else name)
        m = prepare_dataset(tmp_path / f"ds_{name}", input=str(tmp_path / "in.jsonl"), tokenizer=str(tok),
                            val_fraction=0.0, **opts)
        got[name] = documents(tmp_path / f"ds_{name}")
        assert m["bos_id"] == vocab["<s>"] and m["eos_id"] == vocab["</s>"]
        assert m["add_bos"] == (name in ("llama_like", "forced")) == m["tokenizer"].get("add_bos", False)
    for name in ("llama_like", "forced"):
        assert all(int(d[0]) == vocab["<s>"] and int(d[-1]) == vocab["</s>"] for d in got[name])
        assert [d[1:].tolist() for d in got[name]] == [d.tolist() for d in got["plain"]]
    assert all(vocab["<s>"] not in d.tolist() for d in got["plain"] + got["off"])
    with pytest.raises(DataError, match="add_bos='maybe'"):
        prepare_dataset(tmp_path / "bad", input=str(tmp_path / "in.jsonl"), add_bos="maybe")
    # The byte tokenizer has <|bos|>: add_bos=true puts it first; the general path encodes it.
    prepare_dataset(tmp_path / "byte_bos", input=str(tmp_path / "in.jsonl"), add_bos="true", val_fraction=0.0)
    assert all(int(d[0]) == BYTE.bos_id for d in documents(tmp_path / "byte_bos"))
    assert [BYTE.decode(d[1:-1]) for d in documents(tmp_path / "byte_bos")] == DOCS[:4]


def test_a_tokenizer_by_name_from_the_hub_cache_and_a_missing_one(tmp_path):
    vocab = _saved_tokenizer(tmp_path / "saved", add_bos_token=True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tester--tiny-tok"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / ".no_exist" / commit).mkdir(parents=True)  # what huggingface_hub records for a file the repo lacks
    (repo / ".no_exist" / commit / "config.json").write_text("")
    for f in (tmp_path / "saved").iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    write_jsonl(tmp_path / "in.jsonl", DOCS[:3])
    args = [f"input={tmp_path / 'in.jsonl'}", "val_fraction=0", "num_proc=1"]
    # One process (transformers imports slowly): the cached name, then a name not in the cache.
    cached = args + ["tokenizer=tester/tiny-tok", "output=" + str(tmp_path / "a")]
    missing = args + ["tokenizer=tester/not-cached", "output=" + str(tmp_path / "c")]
    code = ("import contextlib, io, json; from data.cli import run; from data.prepare import main\n"
            f"ok = run(main, {cached!r})\nerr = io.StringIO()\n"
            f"with contextlib.redirect_stderr(err):\n    missing = run(main, {missing!r})\n"
            # train.export finds the tokenizer's files by the same name (the run's data manifest)
            "from train.export import tokenizer_files\n"
            f"files, _ = tokenizer_files({{'config': {{'data': {{'sources': [{{'path': {str(tmp_path / 'a')!r}}}]}}}}}}, 64)\n"
            "print(json.dumps([ok, missing, err.getvalue(), sorted(files)]))")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ok, missing, err, exported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "tokenizer.json" in exported and "tokenizer_config.json" in exported, exported
    assert ok == 0, proc.stderr[-2000:]
    b = prepare_dataset(tmp_path / "b", input=str(tmp_path / "in.jsonl"), tokenizer=str(tmp_path / "saved"),
                        val_fraction=0.0)
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert a["tokenizer"]["name"] == "tester/tiny-tok" and a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    assert a["add_bos"] is True and a["splits"] == b["splits"]  # the same ids, BOS first in each document
    assert int(documents(tmp_path / "a")[0][0]) == vocab["<s>"]
    err = err.strip()
    assert missing == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: tokenizer=tester/not-cached") and "not in the Hugging Face cache" in err
    assert not (tmp_path / "c").exists()


def test_validation_is_evenly_spread_within_each_file_by_file_and_row(tmp_path):
    """Row r of file k goes to val when round((k+r+1)·f) > round((k+r)·f): exactly f of each large file,
    and for one-document files the former rule on the document index."""
    b_docs = generated_documents(40, seed=3)
    write_jsonl(tmp_path / "in" / "a.jsonl", DOCS)
    write_jsonl(tmp_path / "in" / "b.jsonl", b_docs)
    prepare_dataset(tmp_path / "ab", input=str(tmp_path / "in"), val_fraction=0.2)

    def chosen(k, docs):
        return [d for r, d in enumerate(docs) if np.floor((k + r + 1) * 0.2 + 0.5) > np.floor((k + r) * 0.2 + 0.5)]

    assert _decoded(tmp_path / "ab", "val") == chosen(0, DOCS) + chosen(1, b_docs)
    assert len(chosen(1, b_docs)) == 8  # exactly 20% of b's rows
