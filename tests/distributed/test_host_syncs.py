"""No host synchronisation off the log interval, except the ones the design cannot avoid.

On a GPU every `.item()`, `.tolist()`, `.cpu()`, `float(t)` or `bool(t)` of a device tensor
stalls the CPU until the GPU drains. tests/distributed/sync_worker.py counts moeforge's own
calls during one loop step that is not logged, at dp=1 (one process), ep=2 and pp=2, and this
test asserts the counts, naming each allowed call site:

- the step guard's single read of its all-reduced losses and flags: once per optimizer step;
- the dispatcher's exchanged split sizes when ep > 1 (DeepEP pays the same): once per MoE
  layer forward;
- the experts' segment sizes, once per MoE layer forward: the CPU fallback's per-expert GEMMs
  and the FP8 grouped GEMMs take them as host integers (on CUDA, torch._grouped_mm reads them
  on the device and this call does not happen). The worker runs on the CPU, so it happens.

Anything else (a loss `.item()` per micro-batch, a `.cpu()` per parameter in the norm, an
accounting read in the dispatcher) fails the test with its call site.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.distributed.runs import ROOT, launcher, worker_env

WORKER = ROOT / "tests" / "distributed" / "sync_worker.py"
LAYOUTS = {"dp1": (1, []), "ep2": (2, ["parallel.ep=2"]), "pp2": (2, ["parallel.pp=2"])}
GUARD = "train/step.py:_decide:tolist"
SEGMENTS = "model/moe.py:forward:tolist"
SPLITS = "parallel/a2a.py:split_counts:tolist"  # one per dispatch exchange (the split sizes)


@pytest.fixture(scope="module")
def counts(tmp_path_factory, dataset):
    out = {}
    for i, (name, (nproc, overrides)) in enumerate(LAYOUTS.items()):
        path = tmp_path_factory.mktemp(f"syncs_{name}") / "out.json"
        cmd = launcher(nproc, 97 + i) + [str(WORKER), str(path), str(dataset), *overrides]
        r = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        out[name] = json.loads(path.read_text())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_step_off_the_log_interval_makes_only_the_allowed_host_syncs(counts, layout):
    for rank, r in enumerate(counts[layout]):
        assert r["step"] == 3
        forwards = r["moe_layers"] * r["grad_accum"]
        allowed = {GUARD: 1}
        if forwards:
            allowed[SEGMENTS] = forwards
            if layout == "ep2":
                allowed[SPLITS] = forwards
        assert r["counts"] == allowed, (layout, rank, r)
    assert any(r["moe_layers"] for r in counts[layout])  # the MoE paths were exercised
