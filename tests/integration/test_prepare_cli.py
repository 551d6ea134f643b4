"""The data CLIs end to end (`python -m data.prepare`, `data.verify`, `data.train_tokenizer`) in subprocesses.

The user-error contract: bad input gets exit code 2, one stderr line `error: …` naming the file,
key or value at fault, no traceback, and no output left behind or changed.
"""

import json
import shutil

import pytest

pytestmark = pytest.mark.slow  # every test here starts Python subprocesses

from tests.data_helpers import assert_user_error, generated_documents, run_cli, snapshot, write_jsonl


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ds"
    proc = run_cli("data.prepare", "input=stdlib", f"output={out}", "max_docs=40", "shard_tokens=40000",
                   "val_fraction=0.1", "num_proc=2")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_prepare_stdlib_then_verify(prepared):
    out, proc = prepared
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    line = proc.stdout.strip()
    assert line.startswith("prepared 40 documents (train 36, val 4)") and str(out / "manifest.json") in line
    assert "tokens/s" in line and "MB/s" in line
    m = json.loads((out / "manifest.json").read_text())
    assert m["vocab_size"] == 262 and m["splits"]["train"]["documents"] == 36
    ok = run_cli("data.verify", str(out), "vocab_size=512")
    assert ok.returncode == 0 and ok.stdout.startswith("ok: ") and "fits vocab_size 512" in ok.stdout
    again = run_cli("data.prepare", "input=stdlib", f"output={out}", "max_docs=40", "shard_tokens=40000",
                    "val_fraction=0.1")
    assert again.returncode == 0 and "(already complete)" in again.stdout


def _bad_inputs(tmp):
    empty = tmp / "empty_dir"
    empty.mkdir()
    write_jsonl(tmp / "no_text.jsonl", ["a", "b"], key="content")
    rows = [{"text": d} for d in generated_documents(200, seed=1)] + [{"title": "late"}]
    (tmp / "late.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "empty.jsonl").write_text("")
    (tmp / "zero_rows.json").write_text("[]")
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    return {
        "missing input": (["input=" + str(tmp / "nope" / "x.jsonl")], [str(tmp / "nope" / "x.jsonl"), "no such file"]),
        "empty folder": ([f"input={empty}"], [str(empty), "empty"]),
        "empty file": ([f"input={tmp / 'empty.jsonl'}"], [str(tmp / "empty.jsonl"), "empty"]),
        "no documents": ([f"input={tmp / 'zero_rows.json'}"], [str(tmp / "zero_rows.json"), "no documents"]),
        "malformed json": ([f"input={tmp / 'bad.jsonl'}"], [str(tmp / "bad.jsonl"), "unreadable after"]),
        "field missing": ([f"input={tmp / 'no_text.jsonl'}"], [str(tmp / "no_text.jsonl"), "'text'"]),
        "field missing mid-stream": ([f"input={tmp / 'late.jsonl'}", "shard_tokens=500", "chunk_chars=1000"],
                                     [str(tmp / "late.jsonl"), "document 200", "'text'"]),
        "unknown key": (["input=stdlib", "shard_size=5"], ["shard_size", "unknown key"]),
        "wrong type": (["input=stdlib", "num_proc=two"], ["num_proc", "'two'"]),
        "bad value": (["input=stdlib", "val_fraction=1.5"], ["val_fraction=1.5"]),
        "missing tokenizer": (["input=stdlib", f"tokenizer={tmp / 'tok'}"], [str(tmp / "tok")]),
        "hub offline": (["input=someone/no-such-dataset"], ["input=someone/no-such-dataset", "cannot open"]),
    }


@pytest.mark.parametrize("case", ["missing input", "empty folder", "empty file", "no documents", "malformed json",
                                  "field missing",
                                  "field missing mid-stream", "unknown key", "wrong type", "bad value",
                                  "missing tokenizer", "hub offline"])
def test_prepare_bad_input_is_one_line_and_leaves_no_output(tmp_path, case):
    args, needles = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    proc = run_cli("data.prepare", *args, f"output={out}", "max_docs=300")
    assert_user_error(proc, *needles)
    assert not out.exists()


def test_prepare_refuses_an_output_holding_a_different_run(prepared, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(prepared[0], out)
    before = snapshot(out)
    proc = run_cli("data.prepare", "input=stdlib", f"output={out}", "max_docs=41", "shard_tokens=40000",
                   "val_fraction=0.1")
    assert_user_error(proc, f"output={out}", "different run", "config.max_docs: 40 → 41")
    assert snapshot(out) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = run_cli("data.prepare", "input=stdlib", f"output={foreign}", "max_docs=2")
    assert_user_error(proc, f"output={foreign}", "not empty")
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "newer version", "vocab too small"])
def test_verify_catches_damage_before_training(prepared, tmp_path, damage):
    out = tmp_path / "ds"
    shutil.copytree(prepared[0], out)
    shard = out / "train" / "00001.bin"
    args = [str(out)]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
        needles = [str(shard), "1000 bytes"]
    elif damage == "corrupted":
        raw = bytearray(shard.read_bytes())
        raw[500] ^= 0xFF
        shard.write_bytes(bytes(raw))
        needles = [str(shard), "SHA-256 mismatch"]
    elif damage == "newer version":
        m = json.loads((out / "manifest.json").read_text())
        m["format_version"] = 7
        (out / "manifest.json").write_text(json.dumps(m))
        needles = [str(out / "manifest.json"), "format version 7"]
    else:
        args.append("vocab_size=200")
        needles = [str(out / "manifest.json"), "261", "vocab_size 200"]
    before = snapshot(out)
    assert_user_error(run_cli("data.verify", *args), *needles)
    assert snapshot(out) == before


def test_train_tokenizer_cli(tmp_path):
    out = tmp_path / "tok"
    proc = run_cli("data.train_tokenizer", "input=stdlib", f"output={out}", "vocab_size=300", "max_docs=20")
    assert proc.returncode == 0, proc.stderr
    assert (out / "tokenizer.json").is_file() and json.loads((out / "tokenizer_config.json").read_text())["eos_token"]
    before = snapshot(out)
    assert_user_error(run_cli("data.train_tokenizer", "input=stdlib", f"output={out}", "vocab_size=300"),
                      f"output={out}", "already holds tokenizer.json")
    assert snapshot(out) == before
    assert_user_error(run_cli("data.train_tokenizer", "input=stdlib", f"output={tmp_path / 'x'}", "vocab_size=100"),
                      "vocab_size=100")
    write_jsonl(tmp_path / "bad.jsonl", ["a"], key="body")
    assert_user_error(run_cli("data.train_tokenizer", f"input={tmp_path / 'bad.jsonl'}", f"output={tmp_path / 'y'}"),
                      str(tmp_path / "bad.jsonl"), "'text'")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    proc = run_cli("data.prepare", "input=stdlib", f"output={tmp_path / 'ds'}", f"tokenizer={out}", "max_docs=5")
    assert proc.returncode == 0 and "vocab 300" in proc.stdout


def test_sharded_preparation_and_merge_from_the_command_line(tmp_path):
    """Three `data.prepare … shard_index=i num_shards=3` runs, `data.merge`, `data.verify`: the merged
    dataset equals one preparation; the skipped-files note is one line; .jsonl.zst is read."""
    import zstandard

    from tests.data_helpers import doc_starts, stream

    src = tmp_path / "in"
    for i in range(4):
        raw = "".join(json.dumps({"text": d}) + "\n" for d in generated_documents(30, seed=i)).encode()
        (src / f"s{i}").mkdir(parents=True)
        (src / f"s{i}" / "data.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (src / "README.md").write_text("# card")
    (src / "LICENSE").write_text("MIT")
    common = [f"input={src}", "shard_tokens=2000", "val_fraction=0.1", "num_proc=1"]
    one = run_cli("data.prepare", *common, f"output={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    note = one.stderr.strip().splitlines()
    assert len(note) == 1
    assert "skipped 2 files that are not data: LICENSE (licence), README.md (dataset card)" in note[0]
    for i in range(3):
        proc = run_cli("data.prepare", *common, f"output={tmp_path / 'split'}", f"shard_index={i}", "num_shards=3")
        assert proc.returncode == 0, proc.stderr
        assert f"part-0000{i}-of-00003" in proc.stdout
    parts = [str(tmp_path / "split" / f"part-0000{i}-of-00003") for i in range(3)]
    merged = run_cli("data.merge", *parts, f"output={tmp_path / 'split'}")
    assert merged.returncode == 0 and merged.stdout.startswith("merged 3 parts") and "no bytes copied" in merged.stdout
    ok = run_cli("data.verify", str(tmp_path / "split"))
    assert ok.returncode == 0 and "(merged from 3 parts)" in ok.stdout
    for split in ("train", "val"):
        assert (stream(tmp_path / "one", split) == stream(tmp_path / "split", split)).all()
        assert (doc_starts(tmp_path / "one", split) == doc_starts(tmp_path / "split", split)).all()
    # Hostile: a part missing (exit 2, one line, nothing written), bad shard options.
    shutil.rmtree(parts[2])
    out = tmp_path / "merged2"
    assert_user_error(run_cli("data.merge", *parts[:2], f"output={out}"), "part 2 of 3 missing")
    assert not out.exists()
    assert_user_error(run_cli("data.prepare", *common, f"output={tmp_path / 'split'}", "num_shards=3", "merge=true"),
                      parts[2], "part 2 of 3 missing")
    assert_user_error(run_cli("data.prepare", *common, f"output={out}", "shard_index=5", "num_shards=3"),
                      "shard_index=5", "num_shards=3")
    assert_user_error(run_cli("data.prepare", *common, f"output={out}", "num_shards=0"), "num_shards=0")
    assert not out.exists()


def test_an_unknown_file_type_is_one_line_unless_skipped(tmp_path):
    write_jsonl(tmp_path / "in" / "a.jsonl", ["one", "two"])
    (tmp_path / "in" / "table.csv").write_text("a,b\n")
    out = tmp_path / "out"
    assert_user_error(run_cli("data.prepare", f"input={tmp_path / 'in'}", f"output={out}"),
                      str(tmp_path / "in" / "table.csv"), "unknown file type", "skip_unknown=true")
    assert not out.exists()
    proc = run_cli("data.prepare", f"input={tmp_path / 'in'}", f"output={out}", "skip_unknown=true", "val_fraction=0")
    assert proc.returncode == 0 and "table.csv (unknown type)" in proc.stderr and "train 2," in proc.stdout
