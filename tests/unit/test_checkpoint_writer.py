"""The asynchronous checkpoint's writer process (train/checkpoint_writer.py) on its own: it commits
the same files a synchronous save writes, reports a failure as one line in the trainer, and dies
with its trainer without committing anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from parallel import snapshot
from parallel import state as pstate
from train import checkpoint_dir as ckpt
from train import checkpoint_writer as writer

ROOT = Path(__file__).resolve().parents[2]


def fragments():
    g = torch.Generator().manual_seed(3)
    return [("param", "w", 0, torch.randn(40_000, generator=g)),
            ("exp_avg", "w", 0, torch.randn(40_000, generator=g)),
            ("buffer", "b", 0, torch.randn(7, generator=g))]


def job(root: Path, step: int, image: snapshot.RankImage, **extra) -> dict:
    tmp = root / f"{ckpt.TMP_PREFIX}{ckpt.step_dir_name(step)}"
    tmp.mkdir(parents=True)
    return {"op": "save", "tmp": str(tmp), "final": str(root / ckpt.step_dir_name(step)), "step": step, "rank": 0,
            "world": 1, "keep": 1, "size": image.size, "rows": image.rows, "shapes": {"w": [200, 200], "b": [7]},
            "rng": {"seed": step}, "trainer": {"step": step, "model": {}}, "kill": [], **extra}


def test_the_writer_process_commits_what_a_synchronous_save_writes(tmp_path):
    img = snapshot.RankImage()
    img.prepare(fragments())
    img.fill()
    proc = writer.WriterProcess(img.fd)
    try:
        root = tmp_path / "ckpt"
        for step in (1, 2):  # the second save retires the first (keep=1), deleting it in the writer
            proc.submit(job(root, step, img))
            proc.result()
        final = root / "step-00000002"
        ckpt.verify(final)
        rows, _ = pstate.write_rank_file(tmp_path / "ref.safetensors", fragments())
        assert (final / "state-00000.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
        assert json.loads((final / "rank-00000.json").read_text()) == {"seed": 2}
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
        assert pstate.Reader(final).read("exp_avg", "w").equal(fragments()[1][3])
        assert not any(p.name.startswith(writer.RECORD_PREFIX) for p in final.iterdir())

        # A failure in the writer is raised in the trainer as one line, and the writer goes on.
        bad = job(root, 3, img)
        Path(bad["tmp"]).rmdir()
        proc.submit(bad)
        with pytest.raises(ckpt.CheckpointError, match=r"^checkpoint save of step 3 failed: .*No such file"):
            proc.result()
        proc.submit(job(root, 4, img))
        proc.result()
        ckpt.verify(root / "step-00000004")
    finally:
        proc.stop()
        img.close()
    assert proc.proc.returncode == 0  # it left when the socket closed


def test_a_writer_that_dies_mid_save_is_an_error_in_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv(writer.DELAY_ENV, "30")
    img = snapshot.RankImage()
    img.prepare(fragments())
    img.fill()
    proc = writer.WriterProcess(img.fd)
    try:
        proc.submit(job(tmp_path / "ckpt", 1, img))
        assert not proc.done()
        proc.proc.kill()
        with pytest.raises(ckpt.CheckpointError, match=r"writer process stopped during a save \(exit code -9\)"):
            proc.result()
    finally:
        proc.stop()
        img.close()
    assert not (tmp_path / "ckpt" / "step-00000001").exists()


def test_the_writer_dies_with_its_trainer_and_commits_nothing(tmp_path):
    """A trainer killed (SIGKILL) while its save is in flight: its writer process goes too, at once,
    and the save never becomes a checkpoint."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from parallel import snapshot
        from train import checkpoint_writer as writer
        from tests.unit.test_checkpoint_writer import fragments, job
        img = snapshot.RankImage()
        img.prepare(fragments())
        img.fill()
        proc = writer.WriterProcess(img.fd)
        proc.submit(job(Path({str(tmp_path / 'ckpt')!r}), 1, img))
        print(proc.proc.pid, flush=True)
        time.sleep(60)
    """)
    env = {**os.environ, writer.DELAY_ENV: "3"}
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid = int(trainer.stdout.readline())
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=10)
        deadline = time.time() + 5
        while time.time() < deadline and Path(f"/proc/{pid}").exists() and not _zombie(pid):
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), "the writer outlived its trainer"
    finally:
        trainer.kill()
    time.sleep(3.5)  # past the held-back write: nothing may appear
    assert not (tmp_path / "ckpt" / "step-00000001").exists()
    assert not list((tmp_path / "ckpt").glob(".tmp-step-00000001/state-*"))


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
