"""Asynchronous checkpoints (checkpoint.async_save=true): the same bytes as a synchronous save, and
training goes on while the background thread writes.

Runs are the real CLI in new processes, deterministic float32 on the CPU (the helpers of
test_faults.py). The test-only MOEFORGE_CHECKPOINT_DELAY_S holds every background write back, so a
save is still in flight when the following steps run.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.test_faults import ROOT, TINY, command, environment, metrics, same, tensors


def run(args, run_dir, delay: float = 0.0) -> subprocess.CompletedProcess:
    """dp=2: ZeRO partitions (snapshotted as whole flat tensors) and two ranks' record files.
    `delay`: every background write starts that much later, and every snapshot copy (which
    runs beside the next step's forward and backward) a third of it: the optimizer update must
    wait for the copy, or the checkpoint would hold the next step's weights."""
    env = environment()
    if delay:
        env["MOEFORGE_CHECKPOINT_DELAY_S"] = str(delay)
        env["MOEFORGE_SNAPSHOT_DELAY_S"] = str(delay / 3)
    return subprocess.run(command([*args, f"hydra.run.dir={run_dir}"], 2), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def manifest(path):
    return json.loads((path / "manifest.json").read_text())["files"]


@pytest.mark.slow
def test_an_async_checkpoint_is_the_synchronous_one_and_training_goes_on_during_its_write(dataset, tmp_path):
    base = [f"data.path={dataset}", *TINY, "trainer.max_steps=6", "checkpoint.interval=3", "checkpoint.keep=10"]
    sync, slow = tmp_path / "sync", tmp_path / "async"
    r = run([*base, f"checkpoint.dir={sync / 'ckpt'}"], sync / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([*base, f"checkpoint.dir={slow / 'ckpt'}", "checkpoint.async_save=true"], slow / "run", delay=3.0)
    assert r.returncode == 0, r.stderr[-3000:]
    for step in (3, 6):
        a, b = sync / "ckpt" / f"step-{step:08d}", slow / "ckpt" / f"step-{step:08d}"
        ma, mb = manifest(a), manifest(b)
        assert sorted(ma) == sorted(mb)  # no record file left behind
        for name in ma:
            if name != "trainer.json":  # holds the wall time and the config (async_save differs)
                assert ma[name] == mb[name], (step, name)
        assert same(tensors(a), tensors(b))
        ta, tb = (json.loads((p / "trainer.json").read_text()) for p in (a, b))
        assert ta["loader"] == tb["loader"] and ta["step"] == tb["step"] == step
    assert (slow / "ckpt" / "latest").read_text().strip() == "step-00000006"
    # Step 3's background write waited 3 s. Step 5 was logged before step 3's manifest was written:
    # the snapshot time in trainer.json comes after step 3's log, so step 5's wall time is at most
    # that plus the loop-clock time between the two logs.
    logged = {m["step"]: m["time"] for m in metrics(slow / "run")}
    snapshot = json.loads((slow / "ckpt" / "step-00000003" / "trainer.json").read_text())["time"]
    manifest_written = (slow / "ckpt" / "step-00000003" / "manifest.json").stat().st_mtime
    assert manifest_written - snapshot >= 3.0
    assert snapshot + (logged[5] - logged[3]) < manifest_written
