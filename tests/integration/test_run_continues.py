"""A run continues after any failure: the same command started again resumes it.

The README's smoke command with a fixed `run.name` (shortened: 12 steps, a checkpoint every 4, the
test dataset) is killed with SIGKILL after its first periodic checkpoint — no graceful save —
and then started again, unchanged. It resumes from that checkpoint, its remaining per-step losses
equal an uninterrupted run's bit for bit, and wandb (offline) shows one run id across both starts.
The same through launch/torchrun.sh with 2 processes and MAX_RESTARTS=1, where one worker is
killed: torchrun restarts both, and they resume from the run's checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 12, 4


def command(dataset: Path, name: str, *extra: str) -> list[str]:
    return ["+experiment=smoke", f"run.name={name}", f"data.path={dataset}", f"trainer.max_steps={STEPS}",
            f"checkpoint.interval={EVERY}", "trainer.log_interval=1", "trainer.eval_interval=0",
            "logging.progress_bar=false", "trainer.threads=1", *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}


def losses(run_dir: Path) -> dict[int, tuple]:
    """step → (loss, mtp_loss), the last record of each step (a killed start may have logged some)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            out[r["step"]] = (r["loss"], r["mtp_loss"])
    return out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not path.is_dir():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {path.name} appeared"
        assert time.monotonic() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def workers_of(pid: int) -> list[int]:
    """The training workers below `pid` (their command line runs train.launch; the agent's runs torchrun)."""
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train.launch" in cmd and b"torch.distributed.run" not in cmd:
            found.append(p)
        todo += children(p)
    return sorted(found)


def runs_root() -> Path:
    return Path(os.environ["MOEFORGE_RUNS"])


@pytest.mark.slow
def test_the_same_command_resumes_a_killed_run_bit_exactly(dataset):
    py = [sys.executable, "-m", "train"]
    ref = subprocess.run(py + command(dataset, "reference", "logging.wandb.mode=disabled"), cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = py + command(dataset, "killed", "logging.wandb.mode=offline")
    proc = subprocess.Popen(run, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = runs_root() / "killed"
    wait_for(run_dir / "checkpoints" / f"step-{EVERY:08d}", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    again = subprocess.run(run, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    starts = [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]
    begun = [s for s in starts if s["event"] == "start"]
    assert len(begun) == 2 and begun[0]["step"] == 0 and begun[1]["restart"] == 1
    resumed = begun[1]["step"]
    assert resumed >= EVERY and begun[1]["resumed_from"].endswith(f"step-{resumed:08d}")
    a, b = losses(runs_root() / "reference"), losses(run_dir)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(resumed + 1, STEPS + 1):
        assert b[step] == a[step], (step, a[step], b[step])  # bit for bit
    run_id = (run_dir / "wandb_id").read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{run_id}") for name in offline), (run_id, offline)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes(dataset, tmp_path):
    def launch(name: str, restarts: int, port: int) -> subprocess.Popen:
        e = {**env(), "NNODES": "1", "GPUS_PER_NODE": "2", "MAX_RESTARTS": str(restarts), "MASTER_PORT": str(port),
             "PYTHON": sys.executable}
        for k in ("NODE_RANK", "MASTER_ADDR", "RDZV_ID", "CLUSTER_ENV"):
            e.pop(k, None)
        return subprocess.Popen(["launch/torchrun.sh", *command(dataset, name, "logging.wandb.mode=disabled")],
                                cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    base = 29600 + os.getpid() % 300
    ref = launch("tr-reference", 0, base)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]
    proc = launch("tr-killed", 1, base + 1)
    run_dir = runs_root() / "tr-killed"
    try:
        wait_for(run_dir / "checkpoints" / f"step-{EVERY:08d}", proc)
        workers = workers_of(proc.pid)  # launch/torchrun.sh → torchrun agent → workers
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    begun = [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]
    begun = [s for s in begun if s["event"] == "start"]
    assert len(begun) == 2 and begun[1]["step"] >= EVERY, begun
    a, b = losses(runs_root() / "tr-reference"), losses(run_dir)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(begun[1]["step"] + 1, STEPS + 1):
        assert b[step] == a[step], (step, a[step], b[step])


def test_wall_time_checkpoints_are_taken_without_a_step_interval(dataset, tmp_path):
    """checkpoint.interval=0 and a tiny checkpoint.interval_minutes: a save after every step (the
    flag rides in the step guard's all-reduce), none at the end (save_at_end=false)."""
    from test_train_cli import TINY, run_train

    r = run_train([f"data.path={dataset}", *TINY, "trainer.max_steps=3", "checkpoint.interval=0",
                   "checkpoint.interval_minutes=0.00001", "checkpoint.save_at_end=false", "checkpoint.keep=5",
                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert saved == [f"step-{s:08d}" for s in (1, 2, 3)], saved
