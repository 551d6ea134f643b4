"""train/run.py: the run's name and directory, refused and recorded config changes, the restart-loop stop."""

from __future__ import annotations

import time

import pytest

from model.config import ConfigError
from train import run

FIRST = "model:\n  dim: 64\n  n_layers: 4\ntrainer:\n  max_steps: 100\n  seed: 0\nrun:\n  name: a\n"


def test_default_name_is_the_experiment_else_the_model_preset():
    assert run.default_name(["+experiment=smoke", "model=tiny"]) == "smoke"
    assert run.default_name(["model=16b", "trainer.max_steps=5"]) == "16b"
    assert run.default_name(["trainer.max_steps=5"]) == "smoke"


def test_run_dir_is_stable_and_resolves_interpolations(monkeypatch, tmp_path):
    monkeypatch.delenv("MOEFORGE_RUNS", raising=False)
    assert str(run.resolve_run_dir(None, "x")) == "runs/x"
    monkeypatch.setenv("MOEFORGE_RUNS", str(tmp_path))
    assert run.resolve_run_dir(None, "x") == tmp_path / "x"
    assert str(run.resolve_run_dir("out/${now:%Y}", "x")) == f"out/{time.strftime('%Y')}"


def test_a_model_or_data_order_change_is_refused_and_others_are_recorded(tmp_path):
    assert run.config_changes(tmp_path, FIRST, allow=False) == {}  # a first start
    (tmp_path / "config.yaml").write_text(FIRST)
    raised = FIRST.replace("max_steps: 100", "max_steps: 200")
    assert run.config_changes(tmp_path, raised, allow=False) == {"trainer.max_steps": [100, 200]}
    for changed, key in ((FIRST.replace("n_layers: 4", "n_layers: 3"), "model.n_layers"),
                         (FIRST.replace("seed: 0", "seed: 1"), "trainer.seed")):
        with pytest.raises(ConfigError, match=rf"other values of {key} .*\+run\.allow_config_change=true"):
            run.config_changes(tmp_path, changed, allow=False)
        assert key in run.config_changes(tmp_path, changed, allow=True)


def test_a_run_that_keeps_failing_at_one_step_is_not_started_again(tmp_path):
    def start(n, step, exit_code=None):
        run.append(tmp_path, {"event": "start", "restart": n, "step": step})
        if exit_code is not None:
            run.append(tmp_path, {"event": "end", "start": n, "exit": exit_code, "step": step})

    start(0, 0, 0)
    start(1, 40)          # killed: no end record
    start(2, 40, 1)       # failed
    run.check_not_looping(tmp_path, 40)  # two failures at step 40: one more try is allowed
    start(3, 40, 4)
    with pytest.raises(ConfigError, match="last 3 starts all began at step 40"):
        run.check_not_looping(tmp_path, 40)
    run.check_not_looping(tmp_path, 60)  # progress was made: a start at a later step is fine
    start(4, 40, 75)      # a preemption that saved is not a failure
    run.check_not_looping(tmp_path, 40)
