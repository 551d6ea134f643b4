"""The all-to-all token dispatcher on 2 and 4 gloo ranks (float64; the checks live in dispatch_worker.py).

Round trip dispatch → identity experts → combine returns the input exactly; received rows and
per-expert copies equal the routing; bytes sent equal the routing minimum; a MoE layer under
expert parallelism equals the single-device layer in output, input gradient, router, shared
and expert gradients and load counts, including when every token goes to the same experts and
some ranks receive nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("nproc", [2, 4, 8])
def test_dispatcher_matches_single_device(nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = 29500 + (os.getpid() + 31 * nproc) % 1000
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_port", str(port), str(ROOT / "tests" / "distributed" / "dispatch_worker.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert f"dispatch checks passed on {nproc} ranks" in r.stdout
