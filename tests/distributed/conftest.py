"""Shared runs of the distributed tests: each layout's 20-step parity run happens once per session.

tests/distributed/test_parity.py compares the runs' losses with the single process;
tests/distributed/test_resume.py resumes from the checkpoints the MTP run saved at steps 10 and
20 (so the uninterrupted run is not paid for twice).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.distributed.runs import LAYOUTS, ROOT, SAVE_EVERY, STEPS, WORKER, launcher, worker_env


@pytest.fixture(scope="session")
def parity_run(tmp_path_factory, dataset):
    """parity_run(layout) -> (results, checkpoint dir); runs the worker the first time it is asked."""
    cache: dict[str, tuple[dict, Path]] = {}

    def get(layout: str) -> tuple[dict, Path]:
        if layout not in cache:
            nproc, overrides = LAYOUTS[layout]
            work = tmp_path_factory.mktemp(f"parity_{layout}")
            out, ckpt = work / "result.json", work / "checkpoints"
            cmd = launcher(nproc, len(cache) * 31 + nproc) + [
                str(WORKER), str(out), str(dataset), str(STEPS), *overrides,
                f"checkpoint.dir={ckpt}", f"checkpoint.interval={SAVE_EVERY}", "checkpoint.keep=5"]
            r = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stderr[-4000:]
            cache[layout] = (json.loads(out.read_text()), ckpt)
        return cache[layout]

    return get
