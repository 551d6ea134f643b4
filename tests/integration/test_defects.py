"""Regression tests of defects found end to end: each runs the real command line on a tiny input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_train_cli import TINY, assert_user_error, run_train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    """Four short text files: about 2,600 byte tokens, all in the train split (val is empty)."""
    folder = tmp_path_factory.mktemp("tiny") / "text"
    folder.mkdir()
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(f"hello world, some text number {i}. " * 20)
    return folder


@pytest.fixture(scope="module")
def tiny_dataset(tiny_text) -> Path:
    out = tiny_text.parent / "prepared"
    r = subprocess.run([sys.executable, "-m", "data.prepare", f"input={tiny_text}", f"output={out}", "tokenizer=byte",
                        "progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def test_dataset_smaller_than_one_global_batch_is_a_one_line_error(tiny_dataset, tmp_path):
    # 2,6xx tokens hold 41 sequences of 64; one global batch of 64 needs 64 × 64 + 1 tokens.
    r = run_train([f"data.path={tiny_dataset}", *TINY, "trainer.global_batch_size=64",
                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=300)
    assert_user_error(r, str(tiny_dataset / "manifest.json"), "split 'train'", "41 sequences of 64",
                      "trainer.global_batch_size=64 × trainer.seq_len=64 = 4,097 tokens")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_dataset_prepared_on_demand_too_small_is_a_one_line_error(tiny_text, tmp_path):
    """data.prepare_input: rank 0 prepares it after init, and the same check follows."""
    r = run_train([f"data.prepare_input={tiny_text}", "data.tokenizer=byte", *TINY, "trainer.global_batch_size=64",
                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=300)
    assert_user_error(r, "split 'train'", "trainer.global_batch_size=64 × trainer.seq_len=64")


def test_empty_val_split_with_evaluation_on_is_a_one_line_error(tiny_dataset, tmp_path):
    args = [a for a in TINY if not a.startswith("trainer.eval_interval=")]
    r = run_train([f"data.path={tiny_dataset}", *args, "trainer.eval_interval=2", "trainer.max_steps=4",
                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=300)
    assert_user_error(r, "split 'val' has 0 tokens", "trainer.eval_interval=0")


def test_render_of_a_run_without_training_records_draws_nothing(tmp_path, capsys):
    """The trainer's summary of a run started at its last step: metrics.jsonl exists but has no
    training line. In-process that is no plots; the command line still calls it an error."""
    from train import report

    (tmp_path / "metrics.jsonl").write_text("")
    assert report.render(tmp_path) == []
    assert not (tmp_path / "plots").exists() and not list(tmp_path.glob(".plots-*"))
    assert report.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'metrics.jsonl'}: no training records\n"


def test_a_finished_run_started_again_exits_0_and_raising_max_steps_continues_it(tiny_dataset, tmp_path):
    ckpt = tmp_path / "ckpt"

    def train(max_steps: int, run: str) -> subprocess.CompletedProcess:
        return run_train([f"data.path={tiny_dataset}", *TINY, f"trainer.max_steps={max_steps}",
                          f"checkpoint.dir={ckpt}", f"hydra.run.dir={tmp_path / run}"], tmp_path, timeout=300)

    r = train(2, "r1")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002"]
    r = train(2, "r2")  # the newest checkpoint is at trainer.max_steps: nothing to do
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002"]
    assert not (tmp_path / "r2" / "plots").exists()
    r = train(3, "r3")  # a higher trainer.max_steps resumes from step 2
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "r3" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3]
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002", "step-00000003"]


def _prose(path: str) -> str:
    return " ".join((ROOT / path).read_text().split())


def test_docs_agree_with_the_code_on_when_a_non_finite_step_is_decided():
    """train/step.py `_decide` runs inside DeepSpeed's optimizer step (parallel/ds_hooks.py), on
    every rank right before the update, pipelines included (`train_batch` calls that step)."""
    import inspect

    from parallel import ds_hooks
    from train import step

    assert "right before" in inspect.getdoc(step.StepModule._decide)
    assert "right before each optimizer update" in inspect.getdoc(ds_hooks.Hooks.install_step_guard)
    assert "guard and update" in inspect.getdoc(step.PipelineStep)  # train_batch holds the guard
    for path in ("docs/parallel.md", "docs/checkpoints.md"):
        text = _prose(path)
        assert "inside deepspeed's optimizer step" in text.lower() and "right before the update" in text, path
        assert "non-finite-gradient flag and the preemption flag" in text, path
        assert "after `train_batch`" not in text and "has been applied when the run stops" not in text, path
    assert "Pipelines decide at the same point: `train_batch` runs the optimizer step" in _prose("docs/checkpoints.md")
