"""Trainer options through the real CLI: torch.compile of the blocks, the batch-size ramp (issue: trainer)."""

from __future__ import annotations

import pytest

from train.config import compose, to_config
from train.schedule import global_batch_at

from test_train_cli import TINY, metrics, run_train

SMALL = [*TINY, "model.n_layers=2", "model.n_mtp_layers=1"]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


@pytest.mark.slow
def test_compiled_blocks_compute_the_same_losses(tmp_path, dataset):
    runs = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile_{compiled}"
        r = run_train([f"data.path={dataset}", *SMALL, "trainer.max_steps=4", f"trainer.compile={str(compiled).lower()}",
                       f"hydra.run.dir={run_dir}"], tmp_path, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[compiled] = losses(run_dir)
    assert len(runs[True]) == len(runs[False]) == 4
    for eager, compiled in zip(runs[False], runs[True]):
        assert abs(eager - compiled) <= 1e-4 * abs(eager), (runs[False], runs[True])


RAMP_KEYS = ["trainer.global_batch_size=16", "schedule.batch_ramp_tokens=2000", "schedule.batch_ramp_start=4"]
RAMP = [o for o in TINY if not o.startswith("trainer.global_batch_size=")] + RAMP_KEYS  # seq 64, micro 2


def expected_tokens_per_step(steps: int, dp: int) -> list[int]:
    cfg = to_config(compose(RAMP + [f"trainer.max_steps={steps}"]))
    assert cfg.trainer.seq_len == 64 and cfg.trainer.micro_batch_size == 2
    t = cfg.trainer
    seen, out = 0, []
    for _ in range(steps):
        gb = global_batch_at(cfg.schedule, seen, t.global_batch_size, t.micro_batch_size * dp)
        out.append(gb * t.seq_len)
        seen += gb * t.seq_len
    return out


def test_batch_ramp_grows_the_global_batch_to_the_configured_size(tmp_path, dataset):
    run_dir = tmp_path / "ramp"
    steps = 6
    r = run_train([f"data.path={dataset}", *RAMP, f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [rec["tokens_seen"] for rec in metrics(run_dir)]
    per_step = [b - a for a, b in zip([0, *seen], seen)]
    # TINY's seq_len is 64; the ramp starts at 4 sequences and reaches 16 after 2000 tokens.
    expected = expected_tokens_per_step(steps, 1)
    assert per_step == expected, (per_step, expected)
    assert per_step[0] == 4 * 64 and per_step[-1] == 16 * 64 and len(set(per_step)) > 2
    assert all(loss == loss and loss < 100 for loss in losses(run_dir))


@pytest.mark.slow
def test_batch_ramp_dp2_matches_dp1(tmp_path, dataset):
    """The ramp rounds to micro × dp, so dp=2 runs micro 1 to keep dp=1's grid of 2 sequences."""
    runs = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"ramp_dp{nproc}"
        micro = [] if nproc == 1 else ["trainer.micro_batch_size=1"]
        overrides = [o for o in RAMP if not (micro and o.startswith("trainer.micro_batch_size="))] + micro
        r = run_train([f"data.path={dataset}", *overrides, "trainer.max_steps=6", f"hydra.run.dir={run_dir}"],
                      tmp_path, nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[nproc] = metrics(run_dir)
    assert [m["tokens_seen"] for m in runs[1]] == [m["tokens_seen"] for m in runs[2]]
    assert len({b - a for a, b in zip([0] + [m["tokens_seen"] for m in runs[1]], [m["tokens_seen"] for m in runs[1]])}) > 2
    for a, b in zip(runs[1], runs[2]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
