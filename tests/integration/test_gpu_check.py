"""The GPU check (launch/gpu_check.sh, bench/gpu_check.py) without a GPU, and what it relies on
from a bare GPU image: the trainer runs with wandb and datasets absent, the benchmarks import
neither DeepSpeed nor Hydra, and a missing package is one line naming it (docs/gpu.md).

"Absent" is made by a sitecustomize.py on PYTHONPATH that puts None into sys.modules for the
names in MOEFORGE_TEST_ABSENT: `import wandb` then raises ImportError and
`importlib.util.find_spec("wandb")` returns None, as when the package is not installed, in the
process and in every Python process it starts."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["env", "pytest_gpu", "smoke_bf16", "smoke_fp8_torch", "smoke_fp8_te", "fp8_gemm", "model_step"]
SITECUSTOMIZE = """import os, sys
for _name in os.environ.get("MOEFORGE_TEST_ABSENT", "").split(","):
    if _name:
        sys.modules[_name] = None
"""


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gc():
    return load_gpu_check()


def absent_env(tmp_path: Path, *names: str) -> dict:
    site = tmp_path / "absent"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHON")}
    env.update(PYTHONPATH=str(site), MOEFORGE_TEST_ABSENT=",".join(names), MOEFORGE_CACHE=str(tmp_path / "cache"))
    return env


def run(argv: list[str], env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_every_step_and_its_command(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    r = run(["launch/gpu_check.sh", "--dry-run", "--work", str(tmp_path)], env)
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines() if line and not line.startswith((" ", "time "))]
    assert listed == STEPS
    commands = {name: line.strip() for name, line in zip(listed, [l for l in r.stdout.splitlines()
                                                                 if l.startswith("    ")])}
    for name in ("smoke_bf16", "smoke_fp8_torch", "smoke_fp8_te"):
        assert "-m train +experiment=smoke trainer.device=cuda trainer.dtype=bf16" in commands[name]
        assert "logging.wandb.mode=disabled" in commands[name]  # wandb is not on the GPU image
        assert f"hydra.run.dir={tmp_path / name}" in commands[name]
    assert "fp8=torch" in commands["smoke_fp8_torch"] and "fp8=te" in commands["smoke_fp8_te"]
    assert "only if `import transformer_engine.pytorch` works" in r.stdout
    assert "-m pytest -m gpu" in commands["pytest_gpu"]
    assert "bench/fp8_gemm.py" in commands["fp8_gemm"]
    assert "bench/model_step.py --device cuda" in commands["model_step"]
    assert not any(tmp_path.iterdir())  # a dry run runs and writes nothing

    r = run(["launch/gpu_check.sh", "--dry-run", "--steps", "env", "smoke_bf16", "nope"], env)
    assert r.returncode == 2 and r.stderr.startswith("error: --steps nope: unknown"), r.stderr


def test_without_packages_or_wheels_the_script_says_what_is_missing(tmp_path):
    env = absent_env(tmp_path, "deepspeed")
    env.update(PYTHON=sys.executable, MOEFORGE_WHEELS=str(tmp_path / "no-wheels"))
    r = run(["launch/gpu_check.sh", "--dry-run"], env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "no wheels in" in r.stderr and "launch/gpu_wheels.sh" in r.stderr


def test_results_file_records_each_failure_and_goes_on(gc, tmp_path):
    py = sys.executable
    steps = [
        gc.Step("good", [py, "-c", "print('final train loss   1.2500 nats/token')"], 30, "passes", gc.parse_smoke),
        gc.Step("broken", [py, "-c", "import sys; print('first'); print('boom: disk on fire', file=sys.stderr); "
                                      "sys.exit(3)"], 30, "fails"),
        gc.Step("needs_x", [py, "-c", "pass"], 30, "conditional", requires="import no_such_package_xyz"),
        gc.Step("hangs", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1, "too slow"),
        gc.Step("after", [py, "-c", "print('still ran')"], 30, "runs after the failures"),
    ]
    lines = []
    code = gc.run_check(steps, tmp_path / "out", tmp_path / "work", time_limit=120, echo=lines.append)
    assert code == 1
    text = (tmp_path / "out" / gc.RESULTS).read_text()
    payload = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])
    got = {s["name"]: s for s in payload["steps"]}
    assert payload["passed"] is False and list(got) == [s.name for s in steps]
    assert {k: (v["status"], v["exit_code"]) for k, v in got.items()} == {
        "good": ("pass", 0), "broken": ("fail", 3), "needs_x": ("skipped", None), "hangs": ("timeout", None),
        "after": ("pass", 0)}
    assert got["good"]["figures"] == {"final_train_loss": 1.25}
    assert "ModuleNotFoundError" in got["needs_x"]["reason"]
    assert "**FAILED**: 2 of 5 steps passed, 1 skipped" in text
    assert "| broken | fail | 3 |" in text
    broken = text.split("## broken: fail", 1)[1].split("## ", 1)[0]
    assert "exit code 3" in broken and "first" in broken and "boom: disk on fire" in broken  # its output's end
    hangs = text.split("## hangs: timeout", 1)[1].split("## ", 1)[0]
    assert "stopped after 1 s" in hangs and "started" in hangs
    assert (tmp_path / "work" / "logs" / "broken.log").read_text().count("boom") == 1

    # The check's own time limit: a running step is stopped at it, later ones are not started.
    slow = [gc.Step("hangs", steps[3].argv, 60, "too slow"), gc.Step("late", steps[4].argv, 30, "never started")]
    code = gc.run_check(slow, tmp_path / "out2", tmp_path / "work2", time_limit=2, echo=lines.append, min_step_s=1)
    text = (tmp_path / "out2" / gc.RESULTS).read_text()
    assert code == 1 and "| hangs | timeout |" in text and "| late | not run |" in text
    assert "time limit (2 s) was reached" in text

    code = gc.run_check(steps[:1] + steps[2:3], tmp_path / "out3", tmp_path / "work3", 120, echo=lines.append)
    assert code == 0 and "**PASSED**: 1 of 2 steps passed, 1 skipped" in (tmp_path / "out3" / gc.RESULTS).read_text()


def test_parsers_read_pytest_benchmark_and_model_step_output(gc, tmp_path):
    out = ("ssss.\n=== short test summary info ===\nSKIPPED [5] tests/unit/test_fp8.py:489: Transformer Engine tests "
           "need a CUDA GPU\n1 passed, 6 skipped, 426 deselected in 38.70s\n")
    assert gc.parse_pytest(out, None) == {"passed": 1, "skipped": 6, "deselected": 426, "skip_reasons": [
        "[5] tests/unit/test_fp8.py:489: Transformer Engine tests need a CUDA GPU"]}
    table = ("device NVIDIA H200, torch 2.11.0, M=8192 tokens\nbackends: bf16, torch/rowwise\n"
             "| preset | layers | in | out | bf16 ms | torch/rowwise × |\n|---|---|---|---|---|---|\n"
             "| tiny | experts.w1/w3 | 512 | 256 | 0.10 | 1.20 |\n")
    noise = "[2026-12-03 13:00:00] [INFO] compiling\n"
    assert gc.parse_fp8_gemm(noise + table + noise, None) == {"table": table.rstrip("\n")}
    rows = [{"config": "smoke", "device": "cuda", "ours_tok_s": 1e5, "hf_tok_s": 5e4, "ratio": 2.0, "hf_impls": {}}]
    (tmp_path / "ms.json").write_text(json.dumps(rows))
    step = gc.Step("model_step", [], 1, "", extra={"json": str(tmp_path / "ms.json")})
    assert gc.parse_model_step("", step) == {"rows": [{k: v for k, v in rows[0].items() if k != "hf_impls"}]}


def test_smoke_trains_with_wandb_and_datasets_absent(gc, tmp_path):
    """The GPU image has neither: the stdlib corpus with the byte tokenizer, prepared shards and a
    smoke run with logging.wandb.mode=disabled need none of them; features that do need them
    stop with one line naming the package. The check's smoke parser reads this run's output."""
    env = absent_env(tmp_path, "wandb", "datasets")
    probe = run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('wandb'), "
                                       "u.find_spec('datasets')); import wandb"], env)
    assert probe.stdout.startswith("None None") and "ModuleNotFoundError" in probe.stderr  # the stand-in works

    data = tmp_path / "stdlib"
    r = run([sys.executable, "-m", "data.prepare", "input=stdlib", f"output={data}", "tokenizer=byte",
             "max_chars=300000", "val_fraction=0.05", "progress=false"], env)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "run"
    smoke = [sys.executable, "-m", "train", "+experiment=smoke", f"data.path={data}", "trainer.max_steps=2",
             "trainer.eval_interval=2", "trainer.eval_batches=1", "trainer.log_interval=1", "trainer.seq_len=64",
             "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "logging.progress_bar=false"]
    r = run([*smoke, "logging.wandb.mode=disabled", f"hydra.run.dir={run_dir}"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = gc.parse_smoke(r.stdout, gc.Step("smoke", [], 1, "", run_dir=run_dir))
    assert figures["steps"] == 2 and figures["tokens_per_s"] > 0 and figures["mem_peak_gib"] > 0
    assert figures["final_train_loss"] == pytest.approx(figures["last_logged_loss"], abs=1e-4)
    assert 0 < figures["final_val_loss"] < 10 and figures["first_loss"] > 0

    # The smoke experiment's own default is wandb offline: without wandb, one line naming it.
    r = run([*smoke, f"hydra.run.dir={tmp_path / 'offline'}"], env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert re.match(r"error: logging\.wandb\.mode=offline: the wandb package is not installed", r.stderr)

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a document\n")
    # Local files are read by data/corpus.py itself: no `datasets` needed. A dataset by name needs it.
    r = run([sys.executable, "-m", "data.prepare", f"input={tmp_path / 'texts'}", f"output={tmp_path / 'out'}",
             "tokenizer=byte", "progress=false", "val_fraction=0"], env)
    assert r.returncode == 0 and (tmp_path / "out" / "manifest.json").is_file(), r.stderr
    for extra in ([], ["hub_streaming=true"]):
        r = run([sys.executable, "-m", "data.prepare", "input=someone/corpus", f"output={tmp_path / 'hub'}",
                 "tokenizer=byte", "progress=false", *extra], env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs the `datasets` package" in r.stderr, r.stderr
        assert not (tmp_path / "hub").exists()


def test_benchmarks_import_only_what_a_bare_gpu_image_has(tmp_path):
    """bench/fp8_gemm.py and bench/model_step.py as the GPU check runs them, with the trainer's
    packages absent: the whole module runs up to argument parsing (--help), so every import at
    the top is exercised; transformers (on the image) is imported later, inside functions."""
    env = absent_env(tmp_path, "deepspeed", "hydra", "omegaconf", "wandb", "datasets", "transformer_engine", "yaml")
    code = ("import runpy, sys\n"
            "for f in ('bench/fp8_gemm.py', 'bench/model_step.py'):\n"
            "    sys.argv = [f, '--help']\n"
            "    try:\n"
            "        runpy.run_path(f, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        print(f, 'exit', e.code)\n")
    r = run([sys.executable, "-c", code], env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bench/fp8_gemm.py exit 0" in r.stdout and "bench/model_step.py exit 0" in r.stdout, r.stdout[-2000:]
