"""Every layout computes what one process computes (issue: parallelism).

20 training steps of the smoke model under ep=2, pp=2, dp=2, pp=2×dp=2×ep=2, dp=4×ep=2
(expert-data-parallel 2) and pp=2 with activation checkpointing, with MTP (and, for the
pipelines, also without), against the single-process run with the same global batch: per-step
loss and MTP loss within 1e-5 relative, gradient norms within 1e-3 relative (see the test), and the expert
biases after 20 steps identical on every rank (and equal to the single process's), and for the
dp = 1 pipelines the validation loss after training (DeepSpeed's eval_batch) within 1e-5.
"""

from __future__ import annotations

import pytest

from tests.distributed.runs import LAYOUTS, STEPS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(parity_run) -> dict:
    return parity_run("single")[0]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "single"])
def test_layout_matches_single_process(layout, parity_run, reference):
    nproc, overrides = LAYOUTS[layout]
    got = parity_run(layout)[0]
    for mtp in [k for k in ("mtp1", "mtp0") if k in got]:
        ref, par = reference[mtp], got[mtp]
        assert len(par["steps"]) == len(ref["steps"]) == STEPS
        assert ref["steps"][-1]["loss"] < ref["steps"][0]["loss"] - 2.0  # the run really trains
        for step, (a, b) in enumerate(zip(par["steps"], ref["steps"]), start=1):
            assert rel(a["loss"], b["loss"]) <= 1e-5, (mtp, step, a, b)
            # The gradient norm is more sensitive than the loss: on one corpus sample every dp=2
            # layout read 13.749–13.755 against 13.747 at a gradient spike (5.5e-4) while the
            # losses agreed to 1e-7; elsewhere ≤ 1e-5. 1e-3 still catches any wrong scaling
            # (a missing 1/dp or a double-counted stage is ≥ 1e-1).
            assert rel(a["grad_norm"], b["grad_norm"]) <= 1e-3, (mtp, step, a, b)
            if mtp == "mtp1":
                assert rel(a["mtp_loss"], b["mtp_loss"]) <= 1e-5, (mtp, step, a, b)
            else:
                assert a["mtp_loss"] == 0.0
            assert rel(a["balance_loss"], b["balance_loss"]) <= 1e-4, (mtp, step, a, b)
        # Evaluation reads trainer.eval_batches micro-batches per data-parallel rank, so only
        # dp = 1 layouts (pipelines) see the reference's validation sequences.
        pp = 2 if "parallel.pp=2" in overrides else 1
        if nproc // pp == 1:
            assert rel(par["val_loss"], ref["val_loss"]) <= 1e-5, (mtp, par["val_loss"], ref["val_loss"])
        # Expert biases after 20 steps: identical on every rank that holds the layer, and equal
        # to the single process's (the bias update is ±γ from global integer counts).
        ref_bias = ref["biases"][0]
        seen = set()
        for rank_bias in par["biases"]:
            for layer, values in rank_bias.items():
                assert values == ref_bias[layer], (mtp, layer)
                seen.add(layer)
        assert seen == set(ref_bias)  # every MoE layer lives on some rank
        assert any(v != 0.0 for vals in ref_bias.values() for v in vals)  # the biases did move
