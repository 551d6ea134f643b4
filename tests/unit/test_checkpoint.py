"""Checkpoint directory protocol, manifest verification, state index, spike detector, RNG."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from parallel import snapshot
from parallel import state as pstate
from train import checkpoint_dir as ckpt
from train.faults import Faults, SpikeDetector, inject
from train.checkpoint import rng_state, set_rng_state


def make_checkpoint(root, step: int, payload: bytes = b"weights") -> "Path":
    """A complete checkpoint directory written through the commit protocol."""
    name = ckpt.step_dir_name(step)
    tmp = root / f"{ckpt.TMP_PREFIX}{name}"
    tmp.mkdir(parents=True)
    (tmp / "state-00000.safetensors").write_bytes(payload * 100)
    (tmp / "trainer.json").write_text(json.dumps({"step": step, "model": {"dim": 8}}))
    (tmp / "index.json").write_text("{}")
    records = dict(ckpt.file_record(tmp / n) for n in ("state-00000.safetensors", "trainer.json", "index.json"))
    ckpt.write_manifest(tmp, records, step)
    ckpt.commit(tmp, root / name)
    ckpt.update_pointer(root, name)
    return root / name


def test_a_committed_checkpoint_verifies_and_the_pointer_names_it(tmp_path):
    path = make_checkpoint(tmp_path, 10)
    ckpt.verify(path)
    assert (tmp_path / "latest").read_text().strip() == "step-00000010"
    assert not list(tmp_path.glob(".tmp-*"))
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"state-00000.safetensors", "trainer.json", "index.json"}
    assert manifest["files"]["trainer.json"]["size"] == (path / "trainer.json").stat().st_size


def test_a_flipped_byte_is_detected_and_named(tmp_path):
    path = make_checkpoint(tmp_path, 10)
    f = path / "state-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="state-00000.safetensors: SHA-256 does not match"):
        ckpt.verify(path)


def test_truncated_and_missing_files_are_named(tmp_path):
    path = make_checkpoint(tmp_path, 10)
    good = (path / "state-00000.safetensors").read_bytes()
    (path / "state-00000.safetensors").write_bytes(b"short")
    with pytest.raises(ckpt.CheckpointError, match="size 5 bytes, the manifest says 700"):
        ckpt.verify(path)
    (path / "state-00000.safetensors").write_bytes(good)
    ckpt.verify(path)
    (path / "trainer.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="trainer.json: missing"):
        ckpt.verify(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="manifest.json: missing"):
        ckpt.verify(path)


def test_verification_is_shared_between_ranks(tmp_path):
    path = make_checkpoint(tmp_path, 10)
    (path / "trainer.json").write_text("{}")  # size differs; only one rank checks that file
    results = [ckpt.verify_files(path, sorted(json.loads((path / "manifest.json").read_text())["files"])[r::2],
                                 json.loads((path / "manifest.json").read_text())["files"]) for r in range(2)]
    assert sum(r is not None for r in results) == 1
    with pytest.raises(ckpt.CheckpointError, match="trainer.json"):
        ckpt.verify(path, rank=0, world=2, gather=lambda problem: results)


def test_select_skips_a_corrupt_newest_with_a_warning_and_ignores_temporaries(tmp_path):
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    (tmp_path / ".tmp-step-00000030").mkdir()  # a save that crashed
    (newest / "index.json").write_text("{ }")
    warnings = []
    chosen = ckpt.select(tmp_path, warn=warnings.append)
    assert chosen.name == "step-00000010"
    assert len(warnings) == 1 and "step-00000020" in warnings[0] and "index.json" in warnings[0]
    assert ckpt.select(tmp_path / "nothing") is None


def test_retention_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        make_checkpoint(tmp_path, step)
    retired = ckpt.retain(tmp_path, keep=2, delete=False)  # renamed out of sight; the caller deletes
    assert [p.name for p in retired] == [".tmp-del-step-00000010", ".tmp-del-step-00000020"]
    assert all(p.is_dir() for p in retired)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    assert ckpt.select(tmp_path).name == "step-00000040"
    ckpt.remove_stale_temporaries(tmp_path)  # what the next save does with a deletion left unfinished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000030", "step-00000040"]
    ckpt.retain(tmp_path, keep=0)  # never deletes the newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000040"]


def test_first_difference_names_the_field():
    assert ckpt.first_difference({"dim": 8, "n_layers": 4}, {"dim": 8, "n_layers": 4}) is None
    assert ckpt.first_difference({"dim": 8, "n_heads": 2}, {"dim": 16, "n_heads": 2}) == \
        "dim is 8 in the checkpoint but 16 now"
    assert ckpt.first_difference({"a": {"b": [1, 2]}}, {"a": {"b": (1, 2)}}) is None


def test_precheck_refuses_missing_paths_and_other_models(tmp_path):
    path = make_checkpoint(tmp_path, 10)
    ckpt.precheck("auto", {"dim": 1})
    ckpt.precheck(str(path), {"dim": 8})
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint directory"):
        ckpt.precheck(str(tmp_path / "missing"), {"dim": 8})
    with pytest.raises(ckpt.CheckpointError, match="model.dim is 8 in the checkpoint but 16 now"):
        ckpt.precheck(str(path), {"dim": 16})


def write_state(tmp_path, frags_per_rank, shapes):
    files = {}
    for r, frags in enumerate(frags_per_rank):
        name = f"state-{r:05d}.safetensors"
        files[name], _ = pstate.write_rank_file(tmp_path / name, frags)
    ckpt.write_index(tmp_path / ckpt.INDEX, shapes, files)
    return pstate.Reader(tmp_path)


def test_reader_reassembles_ranges_written_by_other_ranks(tmp_path):
    full = torch.arange(24, dtype=torch.float32)
    reader = write_state(tmp_path, [[("param", "w", 0, full[:10])], [("param", "w", 10, full[10:])]],
                         {"w": (4, 6)})
    assert torch.equal(reader.read("param", "w"), full)
    assert torch.equal(reader.read("param", "w", 7, 6), full[7:13])  # spans both files
    with pytest.raises(pstate.StateError, match="outside w"):
        reader.read("param", "w", 20, 10)


def test_reader_refuses_an_index_with_a_gap(tmp_path):
    full = torch.arange(24, dtype=torch.float32)
    with pytest.raises(pstate.StateError, match="param of w has a gap or overlap at element 10"):
        write_state(tmp_path, [[("param", "w", 0, full[:10])], [("param", "w", 12, full[12:])]], {"w": (24,)})


def test_spike_detector_flags_only_after_warmup_and_round_trips():
    det = SpikeDetector(window=10, k=3.0, min_rise=0.05, warmup=5)
    for x in (3.0, 3.1, 2.9, 3.0):
        assert not det.is_spike(100.0)  # still warming up
        det.accept(x)
    det.accept(3.05)
    assert det.is_spike(4.0) and not det.is_spike(3.1)
    copy = SpikeDetector(window=10, k=3.0, min_rise=0.05, warmup=5)
    copy.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert copy.threshold() == det.threshold()


def test_fault_specs_parse_steps_ranks_and_phases():
    f = Faults("nan_loss@5:1,spike@7,kill@save:shards:1#2,kill@save:renamed", rank=1)
    assert f.loss_fault(5) == "nan_loss" and f.loss_fault(7) == "spike" and f.loss_fault(6) is None
    assert Faults("nan_loss@5:1", rank=0).loss_fault(5) is None
    assert ("kill", "save:shards", 1, 2) in f.items and ("kill", "save:renamed", None, 1) in f.items
    x = torch.tensor(2.0, requires_grad=True)
    y = inject(x * 1.0, "nan_grad")
    y.backward()
    assert torch.isfinite(y) and torch.isnan(x.grad)


def test_rng_states_round_trip_through_json(tmp_path):
    """Also packed (an asynchronous save hands the writer hex strings): the file it writes is the
    unpacked state's."""
    from train.checkpoint_writer import write_rng

    torch.rand(5)
    state = json.loads(json.dumps(rng_state()))
    name, record = write_rng(tmp_path, 3, json.loads(json.dumps(rng_state(packed=True))))
    assert (tmp_path / name).read_text() == json.dumps(state) and record["size"] == (tmp_path / name).stat().st_size
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_streamed_rank_file_is_byte_identical_to_safetensors_and_hashed_inline(tmp_path):
    """write_rank_file streams tensors without serialising the file in memory: its bytes equal
    safetensors' own writer's, and the record's SHA-256 and size are the file's."""
    import hashlib

    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    frags = [("param", "b.w", 0, torch.randn(7, generator=g)),
             ("exp_avg", "a", 3, torch.randn(5, 3, generator=g).reshape(-1)),
             ("param", "a.x", 0, torch.randn(130, generator=g).to(torch.bfloat16))]
    rows, record = pstate.write_rank_file(tmp_path / "s.safetensors", frags)
    data = (tmp_path / "s.safetensors").read_bytes()
    assert data == save({f"{k}:{n}:{s}": t.float().reshape(-1).contiguous() for k, n, s, t in frags})
    assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert rows == [[k, n, s, t.numel()] for k, n, s, t in frags]


def test_rank_image_writes_the_same_file_straight_from_its_memory(tmp_path, monkeypatch):
    """The asynchronous save's snapshot (RankImage) holds the rank file's bytes: written, the file
    equals write_rank_file's, with the same rows and record; the image is page-aligned, so its
    bytes reach the file without the staging copy (only the unaligned tail is staged); a second
    fill reuses the buffer; the crash-injection path and a second image write the same file;
    another process reads the same bytes through the image's descriptor."""
    import ctypes
    import os
    import subprocess
    import sys

    from data import durable
    from train.checkpoint_writer import write_image

    g = torch.Generator().manual_seed(1)
    frags = [("param", "b.w", 0, torch.randn(300_000, generator=g)),
             ("exp_avg", "a", 3, torch.randn(5, 3, generator=g).reshape(-1)),
             ("param", "a.x", 0, torch.randn(130_000, generator=g).to(torch.bfloat16))]
    want_rows, want = pstate.write_rank_file(tmp_path / "ref.safetensors", frags)
    copied = []
    real = ctypes.memmove
    monkeypatch.setattr(durable.ctypes, "memmove", lambda d, s, n: copied.append(n) or real(d, s, n))
    img = snapshot.RankImage()
    img.prepare(frags)
    img.fill()
    buf = img._img
    rows, record = img.rows, write_image(img.view(), tmp_path / "img.safetensors")
    assert (tmp_path / "img.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert (rows, record) == (want_rows, want)
    probe = durable.StreamWriter(tmp_path / "probe")
    probe.close()
    if probe.direct:
        assert sum(copied) < durable.StreamWriter.ALIGN  # only the last partial block was staged
    frags[0][3].mul_(2)
    img.prepare(frags)
    img.fill()
    assert img._img is buf
    calls = []
    record = write_image(img.view(), tmp_path / "crash.safetensors", crash=lambda: calls.append(1))
    assert calls == [1] and record == pstate.write_rank_file(tmp_path / "ref2.safetensors", frags)[1]
    shared = snapshot.RankImage()
    shared.prepare(frags)
    shared.fill()
    assert write_image(shared.view(), tmp_path / "shared.safetensors") == record
    img.prepare(frags[1:])  # other fragments: a new layout in the same memory
    img.fill()
    assert img._img is buf
    assert write_image(img.view(), tmp_path / "fewer.safetensors") == \
        pstate.write_rank_file(tmp_path / "ref3.safetensors", frags[1:])[1]
    # Another process sees the image through its file descriptor (the writer process maps it).
    seen = subprocess.run([sys.executable, "-c", "import mmap, sys, hashlib; fd = int(sys.argv[1]); "
                           "m = mmap.mmap(fd, 0, prot=mmap.PROT_READ); "
                           "print(hashlib.sha256(m[:int(sys.argv[2])]).hexdigest())", str(shared.fd),
                           str(shared.size)], pass_fds=(shared.fd,), capture_output=True, text=True, check=True)
    assert seen.stdout.strip() == record["sha256"]
    fd = shared.fd
    shared.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_rank_image_copies_in_the_background_hands_over_when_done_and_raises_in_settle(tmp_path, monkeypatch):
    """An asynchronous save's snapshot: `fill(then=...)` returns at once, the copy runs on a thread
    and calls `then` once it is complete (the bytes `then` sees are the fragments'); `settle()`
    waits for it and raises an error of the copy or of `then`."""
    import time

    from train.checkpoint_writer import write_image

    monkeypatch.setenv(snapshot.SNAPSHOT_DELAY_ENV, "0.5")
    g = torch.Generator().manual_seed(2)
    frags = [("param", "w", 0, torch.randn(50_000, generator=g)), ("exp_avg", "w", 0, torch.randn(50_000, generator=g))]
    img = snapshot.RankImage()
    handed = []
    t0 = time.perf_counter()
    img.prepare(frags)
    img.fill(then=lambda: handed.append(write_image(img.view(), tmp_path / "bg.safetensors")))
    assert time.perf_counter() - t0 < 0.4 and img.copying() and not handed
    img.settle()
    assert not img.copying() and handed == [pstate.write_rank_file(tmp_path / "ref.safetensors", frags)[1]]
    img.prepare(frags)
    img.fill(then=lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        img.settle()
    img.settle()  # reported once
    img.close()


@pytest.mark.parametrize("direct", [True, False])
def test_stream_writer_bytes_hash_and_partial_flush(tmp_path, monkeypatch, direct):
    """StreamWriter: the file holds exactly the bytes written, across staging-buffer boundaries and
    a short last block (O_DIRECT pads it and cuts the file back); the hash is the file's; a
    partial flush (a crash mid-write) leaves a prefix of them on disk. Also where O_DIRECT is
    not available (the page-cache path)."""
    import hashlib
    import os

    from data import durable

    if not direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    monkeypatch.setattr(durable.StreamWriter, "CHUNK", 1 << 14)
    rng = np.random.default_rng(0)
    parts = [rng.bytes(n) for n in (13, 40_000, 4096, 1, 70_001)]
    w = durable.StreamWriter(tmp_path / "f.bin")
    for p in parts[:3]:
        w.write(p)
    w.flush_partial()
    on_disk = (tmp_path / "f.bin").read_bytes()
    assert len(on_disk) > 40_000 and b"".join(parts)[:len(on_disk)] == on_disk
    for p in parts[3:]:
        w.write(p)
    record = w.close()
    data = (tmp_path / "f.bin").read_bytes()
    assert data == b"".join(parts)
    assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
