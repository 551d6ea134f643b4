"""Faults: skipped updates, loss spikes, rollback, preemption, crashes during a save, bad resumes.

Every run is the real CLI in new processes, deterministic float32 on the CPU. Faults are injected
with MOEFORGE_FAULTS (train/faults.py): a NaN loss or NaN gradient on one rank, a loss ×20, a
SIGKILL of one rank at a phase of a save. Preemption is a real SIGTERM sent to one worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from parallel.state import Reader

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer.seq_len=64", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.log_interval=1",
        "trainer.eval_interval=0", "logging.wandb.mode=disabled", "logging.progress_bar=false", "trainer.threads=1",
        "trainer.deterministic=true", "data.num_workers=0"]
SPIKE = ["trainer.spike.window=4", "trainer.spike.warmup=4", "trainer.spike.k=3", "trainer.spike.min_rise=0.05"]


def command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(29500 + (os.getpid() * 3 + len(args) * 17) % 2000), "-m", "train", *args]


def environment(faults: str = "") -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MOEFORGE_FAULTS": faults}


def train(args: list[str], run_dir: Path, nproc: int = 1, faults: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(command([*args, f"hydra.run.dir={run_dir}"], nproc), cwd=ROOT, env=environment(faults),
                          capture_output=True, text=True, timeout=600)


def metrics(run_dir: Path) -> list[dict]:
    return [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "train"]


def tensors(path: Path) -> dict:
    r = Reader(path)
    return {(k, n): r.read(k, n) for k in r.fragments for n in r.names(k)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def trainer_json(path: Path) -> dict:
    return json.loads((path / "trainer.json").read_text())


@pytest.fixture(scope="module")
def skipped_run(tmp_path_factory, dataset):
    """dp=2, 10 steps, a checkpoint every step: NaN loss on rank 1 at step 3, NaN gradient on rank 0
    at step 5, a ×20 loss on both at step 9 (the spike detector, warmed up on 4 steps, skips it)."""
    work = tmp_path_factory.mktemp("skips")
    args = [f"data.path={dataset}", *TINY, *SPIKE, "trainer.max_steps=10", "checkpoint.interval=1",
            "checkpoint.keep=20", f"checkpoint.dir={work / 'ckpt'}"]
    r = train(args, work / "run", nproc=2, faults="nan_loss@3:1,nan_grad@5:0,spike@9")
    assert r.returncode == 0, r.stderr[-3000:]
    return work, args


@pytest.mark.slow
def test_nonfinite_values_and_spikes_on_any_rank_skip_the_update_on_all(skipped_run):
    work, _ = skipped_run
    steps = metrics(work / "run")
    reasons = {m["step"]: m["skipped"] for m in steps if m["skipped"]}
    assert reasons == {3: "non-finite loss", 5: "non-finite gradient", 9: "loss spike"}
    assert steps[-1]["skipped_updates"] == 3
    ck = {s: tensors(work / "ckpt" / f"step-{s:08d}") for s in (2, 3, 4, 5, 8, 9)}
    # Skipped: weights, fp32 master weights, Adam moments and router biases bitwise unchanged.
    assert same(ck[2], ck[3]) and same(ck[4], ck[5]) and same(ck[8], ck[9])
    assert not same(ck[3], ck[4])  # an applied step does change them
    assert trainer_json(work / "ckpt" / "step-00000010")["adam_step"] == 7  # 10 steps, 3 skipped


@pytest.mark.slow
def test_a_resumed_run_makes_the_same_spike_decision(skipped_run, tmp_path):
    """From step 8 (detector state in the checkpoint) the spike at step 9 is skipped again; a detector
    that had lost its state would still be warming up and apply it. Resumed on one process (dp 2 → 1)."""
    work, args = skipped_run
    args = [a for a in args if not a.startswith("checkpoint.")] + [
        f"checkpoint.resume={work / 'ckpt' / 'step-00000008'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    r = train(args, tmp_path / "run", faults="spike@9")
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = metrics(work / "run"), metrics(tmp_path / "run")
    assert [m["step"] for m in after] == [9, 10]
    assert after[0]["skipped"] == "loss spike" and after[1]["skipped"] is None
    assert abs(after[1]["loss"] - before[9]["loss"]) <= 1e-5 * before[9]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rollback_reloads_the_last_checkpoint_and_skips_the_data_since(dataset, tmp_path, mode, monkeypatch):
    """`async`: every background write is held back 2 s, so the save of step 6 is still in flight at
    step 7's spike; the rollback waits for it and goes back to step 6."""
    if mode == "async":
        monkeypatch.setenv("MOEFORGE_CHECKPOINT_DELAY_S", "2")
    args = [f"data.path={dataset}", *TINY, *SPIKE, "trainer.spike.action=rollback", "trainer.max_steps=10",
            "checkpoint.interval=2", "checkpoint.keep=10", f"checkpoint.dir={tmp_path / 'ckpt'}",
            f"checkpoint.async_save={mode == 'async'}"]
    r = train(args, tmp_path / "run", faults="spike@7")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rolled back to step-00000006" in r.stderr
    steps = metrics(tmp_path / "run")
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10]
    assert steps[6]["skipped"] == "loss spike" and steps[7]["skipped"] is None and steps[7]["rollbacks"] == 1
    state = trainer_json(tmp_path / "ckpt" / "step-00000010")
    # 10 applied steps, plus the one skipped window (step 7's batch): 11 global batches of 4 consumed.
    assert state["loader"]["sequences_consumed"] == 11 * 4 and state["rollbacks"] == 1
    assert steps[7]["loss"] != steps[6]["loss"] / 20  # the repeated step 7 trains on the next batch


def worker_pids(parent: int) -> list[int]:
    """The torchrun agent's worker processes (its children)."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == parent:
            pids.append(int(status.parent.name))
    return sorted(pids)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigterm_on_one_rank_saves_and_exits_with_the_requeue_code(dataset, tmp_path, mode):
    """`async`: the save's background write is held back 2 s; the exit still waits for its commit."""
    ckpt_dir = tmp_path / "ckpt"
    args = [f"data.path={dataset}", *TINY, "trainer.max_steps=100000", f"checkpoint.dir={ckpt_dir}",
            f"hydra.run.dir={tmp_path / 'run'}", f"checkpoint.async_save={mode == 'async'}"]
    env = {**environment(), **({"MOEFORGE_CHECKPOINT_DELAY_S": "2"} if mode == "async" else {})}
    proc = subprocess.Popen(command(args, 2), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            path = tmp_path / "run" / "metrics.jsonl"
            if path.exists() and len(path.read_text().splitlines()) >= 3:
                break
            time.sleep(0.5)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        sent = time.time()
        os.kill(workers[1], signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        proc.kill()
    assert took <= 30, took
    assert "exitcode  : 75" in err  # every worker left with EXIT_PREEMPTED (torchrun itself reports 1)
    saved = sorted(ckpt_dir.glob("step-*"))
    assert len(saved) == 1 and (ckpt_dir / "latest").read_text().strip() == saved[0].name
    step = int(saved[0].name.split("-")[1])
    assert step >= 3 and trainer_json(saved[0])["step"] == step
    assert f"preempted by a signal: saved step {step}" in err
    # resume=auto continuing from it: test_a_crash_at_any_phase_of_a_save_leaves_the_previous_checkpoint,
    # and the two-node restart in tests/distributed/test_multinode.py.


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_crash_at_any_phase_of_a_save_leaves_the_previous_checkpoint(dataset, tmp_path, mode):
    """A chain of runs on one checkpoint directory, each killed (SIGKILL, one rank) at one phase of its
    second save; the next run resumes with resume=auto from the newest complete checkpoint and must
    reproduce the killed run's steps after it. `async`: the phases run in the background thread of
    checkpoint.async_save=true, while training goes on."""
    ckpt_dir = tmp_path / "ckpt"
    # One max_steps for every run: the LR, MTP-weight and bias-speed schedules depend on it. Each
    # run saves every 2 steps and is killed in its second save.
    base = [f"data.path={dataset}", *TINY, "trainer.max_steps=11", "checkpoint.interval=2", "checkpoint.keep=10",
            f"checkpoint.dir={ckpt_dir}", f"checkpoint.async_save={mode == 'async'}"]
    # (phase, processes, kill spec, checkpoint resume must pick)
    chain = [("writing", 2, "kill@save:writing:1#2", None),  # killed saving step 4
             ("shards", 1, "kill@save:shards#2", 2),  # resumes at 2; killed saving 6
             ("manifest", 1, "kill@save:manifest#2", 4),  # killed saving 8
             ("renamed", 1, "kill@save:renamed#2", 6),  # killed saving 10, after its rename
             ("done", 1, "", 10)]  # renamed before the pointer moved: that checkpoint is complete
    previous = None
    for i, (phase, nproc, fault, expect) in enumerate(chain):
        run_dir = tmp_path / f"run{i}"
        r = train(base, run_dir, nproc=nproc, faults=fault)
        if phase == "done":
            assert r.returncode == 0, r.stderr[-3000:]
        else:
            assert r.returncode != 0, f"{phase}: the injected kill did not happen"
        if expect is not None:
            assert f"resumed from {ckpt_dir / f'step-{expect:08d}'}" in r.stdout, (phase, r.stdout[-2000:])
            steps = {m["step"]: m for m in metrics(run_dir)}
            for step, m in previous.items():
                if step in steps:  # the steps both runs took from the same checkpoint
                    tol = 1e-5 if i == 1 else 0.0  # run 0 had dp=2; the others are one process
                    assert abs(steps[step]["loss"] - m["loss"]) <= tol * m["loss"], (phase, step)
            assert min(steps) == expect + 1
        previous = {m["step"]: m for m in metrics(run_dir)}
        assert not any(p.name.startswith("step-") and not (p / "manifest.json").exists() for p in ckpt_dir.iterdir())
    assert (ckpt_dir / "latest").read_text().strip() == "step-00000011"


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def fake_checkpoint(folder: Path, model: dict) -> Path:
    """A checkpoint directory with a manifest and the trainer state of `model` (no tensors needed:
    these inputs are refused before anything is loaded)."""
    from train import checkpoint_dir as ckpt

    path = folder / "step-00000002"
    path.mkdir(parents=True)
    (path / "trainer.json").write_text(json.dumps({"step": 2, "model": model}))
    ckpt.write_manifest(path, dict([ckpt.file_record(path / "trainer.json")]), 2)
    return path


def test_resume_from_a_missing_path_is_one_line_and_writes_nothing(dataset, tmp_path):
    r = train([f"data.path={dataset}", *TINY, f"checkpoint.resume={tmp_path / 'nope'}"], tmp_path / "run")
    assert_user_error(r, "checkpoint.resume=", "no such checkpoint directory")
    assert not (tmp_path / "run").exists()


def test_resume_with_another_model_names_the_first_differing_field(dataset, tmp_path):
    from dataclasses import asdict

    from train.config import compose, to_config

    model = asdict(to_config(compose([f"data.path={dataset}"])).model)  # the smoke model: 4 layers
    path = fake_checkpoint(tmp_path / "ckpt", model)
    r = train([f"data.path={dataset}", *TINY, "model.n_layers=3", f"checkpoint.resume={path}"], tmp_path / "run")
    assert_user_error(r, "model.n_layers is 4 in the checkpoint but 3 now")
    assert not (tmp_path / "run").exists()


def test_init_from_is_checked_before_any_worker_starts(dataset, tmp_path):
    """A wrong checkpoint.init_from is one line before the run directory exists: a missing folder,
    a folder that is neither kind, a checkpoint (or a directory of them) of another model."""
    from dataclasses import asdict

    from train.config import compose, to_config

    model = asdict(to_config(compose([f"data.path={dataset}"])).model)
    (tmp_path / "empty").mkdir()
    fake_checkpoint(tmp_path / "other", {**model, "dim": 96})
    for source, needles in ((tmp_path / "nope", ("no such folder",)),
                            (tmp_path / "empty", ("neither a Hugging Face folder",)),
                            (tmp_path / "other" / "step-00000002", ("incompatible model: model.dim",)),
                            (tmp_path / "other", ("step-00000002: incompatible model: model.dim",))):
        r = train([f"data.path={dataset}", *TINY, f"checkpoint.init_from={source}"], tmp_path / "run")
        assert_user_error(r, "checkpoint.init_from=", *needles)
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_from_a_corrupted_checkpoint_names_the_file_and_overwrites_nothing(skipped_run, tmp_path):
    work, args = skipped_run
    path = work / "ckpt" / "step-00000002"
    copy = tmp_path / "step-00000002"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    state = copy / "state-00001.safetensors"
    data = bytearray(state.read_bytes())
    data[-100] ^= 0x10
    state.write_bytes(bytes(data))
    before = digest(copy)
    args = [a for a in args if not a.startswith("checkpoint.")]
    r = train(args + [f"checkpoint.resume={copy}", f"checkpoint.dir={tmp_path}"], tmp_path / "run")
    assert_user_error(r, "state-00001.safetensors", "SHA-256 does not match")
    assert digest(copy) == before and sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002"]
