"""parallel/ds_hooks.py against the installed DeepSpeed: every optimizer kind the trainer can get.

The hooks reach into DeepSpeed internals (`has_overflow`, the wrapped `optimizer.step`,
`clip_fp32_gradients`, `_global_grad_norm`, the gradient buffers). A DeepSpeed upgrade that
stops calling one fails here: the applied step then raises HookBypassed, or the skipped step
changes parameters, or the recorded norm is not the gradient's. The worker also bypasses each
hook on purpose and the trainer's check must catch it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ds_hooks_worker.py")
OPTIMIZER = {"fp32_stage0": "AdamW", "fp32_zero1": "DeepSpeedZeroOptimizer", "bf16_stage1": "BF16_Optimizer",
             "bf16_zero2": "DeepSpeedZeroOptimizer"}


@pytest.fixture(scope="module")
def hooks_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("hooks") / "out.json"
    r = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", sorted(OPTIMIZER))
def test_every_hook_fires_once_per_step_and_skips_leave_state_unchanged(hooks_run, kind):
    r = hooks_run[kind]
    assert r["optimizer"] == OPTIMIZER[kind], r
    assert r["applied_changed"], r
    assert r["skip_unchanged"] and r["skip_counted"], r
    # the guard read the flag at each of the three steps: finite, finite, NaN
    assert r["flags"] == [0.0, 0.0, 1.0], r
    if r["stage"] == 0:
        assert r["norm_is_tensor"], r  # no host read in the hook
        assert r["norm"] == pytest.approx(r["true_norm"], rel=1e-12), r
        assert r["true_norm"] > 1.0  # the clip mattered


@pytest.mark.parametrize("kind", sorted(OPTIMIZER))
def test_a_bypassed_hook_is_loud(hooks_run, kind):
    r = hooks_run[kind]
    expected = {"guard", "norm"} if r["stage"] == 0 else {"guard"}
    assert set(r["bypass"]) == expected
    for what, message in r["bypass"].items():
        hook = {"guard": "step guard", "norm": "stage-0 gradient norm"}[what]
        assert f"without moeforge's '{hook}' hook" in message, (what, message)
        assert "written for DeepSpeed 0.19.8" in message, message

