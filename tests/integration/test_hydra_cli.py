"""The flags a Hydra app offers, on `python -m train`: --help, --cfg job [--resolve], -m/--multirun,
the one-line error for a wrong group option, and DeepSpeed settings passed through parallel.deepspeed."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import yaml

from tests.integration.test_train_cli import TINY, assert_user_error, metrics, run_train
from train.config import CONF_DIR, Config


def test_help_lists_groups_with_their_options_and_every_key_with_its_default(tmp_path):
    r = run_train(["--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("usage: python -m train"), out[:200]
    assert re.search(r"^  model:\s+16b, 236b, 671b, smoke, tiny \(default: smoke\)$", out, re.M), out
    assert re.search(r"^  experiment:\s+smoke \(\+experiment=NAME; none by default\)$", out, re.M), out
    for group in (d.name for d in CONF_DIR.iterdir() if d.is_dir()):
        assert re.search(rf"^  {group}:\s+\S", out, re.M), group
    for group in ("data", "parallel", "trainer", "logging", "checkpoint"):  # schema only
        assert re.search(rf"^  {group}:\s+no files: set its keys$", out, re.M), group
    for key in ("trainer.max_steps=1000", "trainer.spike.action=skip", "parallel.deepspeed={}", "model.dim=128",
                "optim.betas=[0.9,0.95]", "checkpoint.resume=auto", "hydra.sweep.dir=DIR"):
        assert key in out, key
    for f in fields(Config):  # every group's keys are listed
        assert f"  {f.name}." in out or f"  {f.name}=" in out, f.name
    assert "--cfg job" in out and "-m key=a,b" in out


def test_help_shows_the_values_the_overrides_give(tmp_path):
    r = run_train(["model=tiny", "trainer.max_steps=7", "-h"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "trainer.max_steps=7" in r.stdout and "model.dim=512" in r.stdout


def test_cfg_job_prints_the_composed_config_and_runs_nothing(tmp_path):
    run_dir = tmp_path / "run"
    r = run_train(["model=tiny", "trainer.max_steps=5", "trainer.eval_interval=${trainer.log_interval}",
                   f"hydra.run.dir={run_dir}", "--cfg", "job"], tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["trainer"]["max_steps"] == 5 and cfg["model"]["dim"] == 512 and "hydra" not in cfg
    assert cfg["trainer"]["eval_interval"] == "${trainer.log_interval}"  # as Hydra prints it: unresolved
    assert cfg["parallel"]["deepspeed"] == {}
    assert cfg["run"]["name"] == "tiny"  # as the run would write it: the model preset's name by default
    assert not run_dir.exists()
    r = run_train(["trainer.eval_interval=${trainer.log_interval}", "--cfg", "job", "--resolve"], tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["trainer"]["eval_interval"] == cfg["trainer"]["log_interval"] == 10


def test_cfg_job_with_a_bad_key_is_one_line(tmp_path):
    assert_user_error(run_train(["trainer.bogus=1", "--cfg", "job"], tmp_path), "trainer.bogus")
    assert_user_error(run_train(["trainer.max_steps=0", "--cfg", "job"], tmp_path), "trainer.max_steps=0")
    assert_user_error(run_train(["--cfg", "hydra"], tmp_path), "--cfg hydra", "--cfg job")
    assert_user_error(run_train(["--resolve"], tmp_path), "--resolve: only with --cfg job")
    assert_user_error(run_train(["--foo"], tmp_path), "--foo: unknown option")


def test_a_wrong_group_option_names_the_available_options(tmp_path, dataset):
    run_dir = tmp_path / "run"
    r = run_train([f"data.path={dataset}", "model=nonexistent", f"hydra.run.dir={run_dir}"], tmp_path)
    assert_user_error(r)
    assert r.stderr.strip() == "error: model=nonexistent: no such option; available: 16b, 236b, 671b, smoke, tiny"
    assert not run_dir.exists()


def test_a_comma_list_without_multirun_says_to_add_m(tmp_path, dataset):
    r = run_train([f"data.path={dataset}", "optim.lr=1e-3,3e-3", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_user_error(r, "optim.lr=1e-3,3e-3: a comma list is a sweep; add -m")


def test_multirun_runs_each_combination_in_its_own_run_directory(tmp_path, dataset):
    sweep = tmp_path / "sweep"
    r = run_train(["-m", "optim.lr=1e-3,3e-3", "trainer.max_steps=2", f"data.path={dataset}", *TINY,
                   f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "[multirun] 2 jobs in" in r.stdout and "[multirun] #1: optim.lr=0.003 ->" in r.stdout
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1"]
    lrs = []
    for n in ("0", "1"):
        assert [m["step"] for m in metrics(sweep / n)] == [1, 2]
        lrs.append(yaml.safe_load((sweep / n / "config.yaml").read_text())["optim"]["lr"])
    assert lrs == [1e-3, 3e-3]


def test_multirun_checks_every_combination_before_starting_any(tmp_path, dataset):
    sweep = tmp_path / "sweep"
    r = run_train(["-m", "trainer.max_steps=2,0", f"data.path={dataset}", *TINY, f"hydra.sweep.dir={sweep}"],
                  tmp_path)
    assert_user_error(r, "trainer.max_steps=0: must be > 0", "(job trainer.max_steps=0")
    assert not sweep.exists()
    r = run_train(["-m", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_user_error(r, "hydra.run.dir=", "set hydra.sweep.dir")
    assert_user_error(run_train(["-m", "optim.lr=interval(0,1)"], tmp_path), "optim.lr=interval(0,1)")
    assert_user_error(run_train(["-m", "trainer.max_steps=[1,2"], tmp_path), "trainer.max_steps=[1,2")


def test_deepspeed_settings_pass_through_and_train(tmp_path, dataset):
    run_dir = tmp_path / "run"
    r = run_train([f"data.path={dataset}", "trainer.max_steps=2", *TINY, f"hydra.run.dir={run_dir}",
                   "+parallel.deepspeed.zero_optimization.reduce_bucket_size=50000000",
                   "+parallel.deepspeed.communication_data_type=fp32"], tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert [m["step"] for m in metrics(run_dir)] == [1, 2]
    written = yaml.safe_load((run_dir / "config.yaml").read_text())["parallel"]["deepspeed"]
    assert written == {"zero_optimization": {"reduce_bucket_size": 50000000}, "communication_data_type": "fp32"}


def test_a_conflicting_or_unknown_deepspeed_key_is_one_line(tmp_path, dataset):
    run_dir = tmp_path / "run"
    base = [f"data.path={dataset}", *TINY, f"hydra.run.dir={run_dir}"]
    r = run_train([*base, "+parallel.deepspeed.gradient_clipping=0.5"], tmp_path)
    assert_user_error(r, "parallel.deepspeed.gradient_clipping: set by moeforge from optim.grad_clip; use that key")
    r = run_train([*base, "+parallel.deepspeed.zero_optimization.bogus_knob=1"], tmp_path)
    assert_user_error(r, "parallel.deepspeed.zero_optimization.bogus_knob: not a DeepSpeed ")
    r = run_train([*base, "+parallel.deepspeed.bogus_knob=1"], tmp_path)
    assert_user_error(r, "parallel.deepspeed.bogus_knob: not a DeepSpeed ")
    assert not run_dir.exists()


def test_help_and_cfg_job_write_nothing_in_the_working_directory(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(root), "MOEFORGE_CACHE": str(tmp_path / "cache")}
    for args in (["--help"], ["--cfg", "job"]):
        r = subprocess.run([sys.executable, "-m", "train", *args], cwd=work, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
    assert list(work.iterdir()) == []


def test_multirun_passes_a_preemption_signal_to_the_job_and_starts_no_other(tmp_path, dataset):
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    sweep = tmp_path / "sweep"
    env = {**os.environ, "MOEFORGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "train", "-m", "trainer.seed=1,2", "trainer.max_steps=100000",
                             f"data.path={dataset}", *TINY, f"hydra.sweep.dir={sweep}"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:  # the first job is training
        out.append(line)
        if line.startswith("step 1/"):
            proc.send_signal(signal.SIGTERM)
            break
    out += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 75, "".join(out)
    text = "".join(out)
    assert "[multirun]   #0 exit 75: trainer.seed=1" in text and "#1:" not in text, text
    assert "continues the sweep" in text
    assert sorted(p.name for p in sweep.iterdir()) == ["0"]
