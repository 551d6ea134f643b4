"""Startup never hangs silently: a stale torch-extensions lock and a rendezvous whose peer never
comes each end `python -m train` with one line `error: …` and exit 5 (parallel/startup.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TINY = ["trainer.seq_len=64", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.log_interval=1",
        "trainer.eval_interval=0", "logging.wandb.mode=disabled", "logging.progress_bar=false", "trainer.threads=1",
        "trainer.max_steps=1"]
EXIT_STARTUP_TIMEOUT = 5
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
             "TORCHELASTIC_RUN_ID", "MOEFORGE_EXIT_DIR")


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(MOEFORGE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               WANDB_SILENT="true", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), MOEFORGE_STARTUP_TIMEOUT_S="10")
    env.update(extra)
    return env


# A start that hangs (no watchdog) fails as TimeoutExpired. The bound is generous because the
# imports and config checks before init_distributed take seconds on an idle machine (each of
# these runs ends in 13-15 s) and half a minute on a loaded one.
def _run(cmd: list[str], env: dict, timeout: int = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def _plant_lock(ext: Path, age_s: float) -> Path:
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    past = time.time() - age_s
    os.utime(lock, (past, past))
    return lock


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == EXIT_STARTUP_TIMEOUT, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stale_shm_comm_lock_does_not_block_a_run(tmp_path, dataset):
    """A `lock` left by a killed build of DeepSpeed's CPU comm op in the extensions directory the
    run uses: the run no longer builds that op (parallel/engine.py `_without_shm_comm_op`), so it
    trains its step and leaves the lock alone. Before, it waited on the lock forever."""
    lock = _plant_lock(tmp_path / "ext", age_s=3 * 3600)
    env = _env(tmp_path, MOEFORGE_STARTUP_TIMEOUT_S="60")
    r, elapsed = _run([sys.executable, "-m", "train", f"data.path={dataset}", *TINY,
                       f"hydra.run.dir={tmp_path / 'run'}"], env, timeout=240)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "step 1/1" in r.stdout
    assert "deepspeed_shm_comm" not in r.stdout + r.stderr  # neither built ("… built successfully") nor waited for
    assert lock.exists()
    print(f"run with a stale shm-comm lock: {elapsed:.1f} s")


def test_stale_lock_is_named_and_ends_the_process(tmp_path, dataset):
    """The watchdog names a lock the process is stuck on, with its age.

    moeforge no longer builds the op whose lock used to block startup, so no lock wait is left
    on the CPU path of `python -m train`. To exercise the watchdog on a real lock wait, the child
    runs `python -m train` (its `main`, through runpy) with DeepSpeed's build of `deepspeed_shm_comm`
    put back (`_without_shm_comm_op` replaced by a no-op) and the op's `lock` planted, 3 h old, in
    its TORCH_EXTENSIONS_DIR: init_distributed then waits inside DeepSpeed's builder and torch's
    `FileBaton.wait`, exactly where a killed build left every later start.
    """
    lock = _plant_lock(tmp_path / "ext", age_s=3 * 3600)
    child = ("import runpy, sys; import parallel.engine as e; e._without_shm_comm_op = lambda ds: None; "
             "sys.argv = ['train', *sys.argv[1:]]; runpy.run_module('train', run_name='__main__', alter_sys=True)")
    r, elapsed = _run([sys.executable, "-c", child, f"data.path={dataset}", *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
                      _env(tmp_path))
    line = _one_error_line(r)
    assert f"waiting for the torch-extensions lock {lock} (3.0 h old)" in line, line
    assert "remove the file" in line and "Traceback" not in r.stderr
    print(f"stale lock reported in {elapsed:.1f} s: {line}")


def test_lock_wait_inside_deepspeed_initialize_is_named(tmp_path, dataset):
    """On GPU `deepspeed.initialize` JIT-builds the fused Adam op behind the same kind of lock; the
    watchdog also guards it (parallel/engine.py `initialize`). The child's deepspeed.initialize
    first waits on a planted 2 h old `fused_adam/lock` through torch's own `FileBaton.wait`, as
    DeepSpeed's builder does when a killed build left the lock."""
    lock = tmp_path / "ext" / "fused_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    past = time.time() - 2 * 3600
    os.utime(lock, (past, past))
    child = ("import runpy, sys, deepspeed; from torch.utils.file_baton import FileBaton; real = deepspeed.initialize\n"
             "def initialize(*a, **k):\n"
             f"    FileBaton({str(lock)!r}).wait()\n"
             "    return real(*a, **k)\n"
             "deepspeed.initialize = initialize\n"
             "sys.argv = ['train', *sys.argv[1:]]; runpy.run_module('train', run_name='__main__', alter_sys=True)")
    r, elapsed = _run([sys.executable, "-c", child, f"data.path={dataset}", *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
                      _env(tmp_path))
    line = _one_error_line(r)
    assert f"waiting for the torch-extensions lock {lock} (2.0 h old)" in line, line
    print(f"lock inside deepspeed.initialize reported in {elapsed:.1f} s: {line}")


@pytest.mark.parametrize("rank", [0, 1])
def test_rendezvous_whose_peer_never_comes(rank, tmp_path, dataset):
    """One rank of two started alone: rank 0 hosts the store and waits for rank 1; rank 1 cannot
    reach rank 0. Each names the rendezvous address and the rank that did not arrive."""
    port = _free_port()
    env = _env(tmp_path, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), MOEFORGE_DIST_TIMEOUT_S="600")
    r, elapsed = _run([sys.executable, "-m", "train", f"data.path={dataset}", *TINY,
                       f"hydra.run.dir={tmp_path / 'run'}"], env)
    line = _one_error_line(r)
    assert f"rank {rank} of 2 is waiting at the rendezvous 127.0.0.1:{port}" in line, line
    assert f"rank {1 - rank} did not arrive" in line, line
    print(f"rank {rank} alone reported in {elapsed:.1f} s: {line}")


def test_startup_timeout_values(monkeypatch):
    """$MOEFORGE_STARTUP_TIMEOUT_S overrides the configured value; anything but whole seconds is a one-line error."""
    from data.errors import UserError
    from parallel.startup import TIMEOUT_ENV, format_age, startup_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert startup_timeout(600) == 600 and startup_timeout(0) == 0
    monkeypatch.setenv(TIMEOUT_ENV, "10")
    assert startup_timeout(600) == 10
    monkeypatch.setenv(TIMEOUT_ENV, "ten")
    with pytest.raises(UserError, match="MOEFORGE_STARTUP_TIMEOUT_S=ten: must be whole seconds >= 0"):
        startup_timeout(600)
    monkeypatch.delenv(TIMEOUT_ENV)
    with pytest.raises(UserError, match="trainer.startup_timeout_s=-1"):
        startup_timeout(-1)
    assert [format_age(s) for s in (3, 840, 3 * 3600, 3 * 86400)] == ["3 s", "14 min", "3.0 h", "3.0 days"]
