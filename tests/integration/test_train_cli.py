"""The trainer's command line end to end: `python -m train` and `torchrun -m train` on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_train(args: list[str], tmp_path: Path, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOEFORGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


TINY = ["trainer.seq_len=64", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.log_interval=1",
        "trainer.eval_interval=0", "logging.wandb.mode=disabled", "logging.progress_bar=false", "trainer.threads=1"]


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("override, needle", [
    ("trainer.bogus=1", "trainer.bogus"),
    ("trainer.max_steps=many", "trainer.max_steps"),
    ("trainer.global_batch_size=5", "trainer.global_batch_size=5"),
    ("model.n_limited_groups=7", "model.n_limited_groups"),
    ("parallel.zero_stage=3", "parallel.zero_stage"),
    ("parallel.pp=2", "parallel.pp=2: does not divide the world size 1"),
    ("parallel.ep=2", "parallel.ep=2: does not divide dp=1"),
    ("parallel.partition=bogus", "parallel.partition='bogus'"),
    ("fp8=te", "fp8.backend=te: needs an NVIDIA GPU (device is cpu); fp8.backend=emulated runs here"),
    ("fp8.recipe=nope", "fp8.recipe='nope'"),
    ("parallel.ep_ranks_per_node=2", "parallel.ep_ranks_per_node=2: must divide parallel.ep=1"),
    ("parallel.moe_chunks=0", "parallel.moe_chunks=0: must be >= 1"),
    (["trainer.attention=flex", "data.document_aware=true"], "trainer.attention=flex: needs a CUDA device"),
    ("data.sources=[{path: /a, on_exhausted: bogus}]", "data.sources[].on_exhausted='bogus': must be one of"),
    ("data.sources=[{path: /a, weight: -1}]", "data.sources[0].weight=-1.0: must be a finite number >= 0"),
    ("trainer.gc_interval=-1", "trainer.gc_interval=-1: must be >= 0"),
])
def test_bad_config_is_one_line_and_builds_nothing(override, needle, tmp_path, dataset):
    run_dir = tmp_path / "run"
    args = override if isinstance(override, list) else [override]
    if not args[0].startswith("data.sources"):
        args = [f"data.path={dataset}", *args]
    r = run_train([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert_user_error(r, needle)
    assert not run_dir.exists()  # failed before any output was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: trainer.device=cuda is valid here")
def test_cuda_device_without_a_gpu_is_one_line(tmp_path, dataset):
    run_dir = tmp_path / "run"
    r = run_train([f"data.path={dataset}", "trainer.device=cuda", f"hydra.run.dir={run_dir}"], tmp_path)
    assert_user_error(r, "trainer.device=cuda: no CUDA device is visible")
    assert not run_dir.exists()


def test_data_path_without_manifest_is_named(tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    r = run_train([f"data.path={empty}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_user_error(r, str(empty / "manifest.json"))
    assert not (tmp_path / "run").exists()


def test_vocab_mismatch_between_data_and_model_is_named(tmp_path, dataset):
    r = run_train([f"data.path={dataset}", "model.vocab_size=200", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_user_error(r, "manifest.json", "model.vocab_size=200")


def test_non_finite_loss_stops_after_max_skipped_updates_without_saving(tmp_path, dataset):
    run_dir = tmp_path / "run"
    r = run_train([f"data.path={dataset}", *TINY, "trainer.max_steps=5", "model.init_std=1e38",
                   "trainer.max_skipped=3", f"hydra.run.dir={run_dir}"], tmp_path)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "3 consecutive updates skipped at step 3 (last: non-finite loss" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((run_dir / "checkpoints").glob("step-*"))  # the bad state is not saved
    skipped = [m for m in metrics(run_dir) if m.get("skipped")]
    assert [m["step"] for m in skipped] == [1, 2, 3]


def test_single_process_run_writes_run_directory(tmp_path, dataset):
    run_dir = tmp_path / "run"
    r = run_train([f"data.path={dataset}", *TINY, "trainer.max_steps=6", "trainer.eval_interval=3",
                   "trainer.eval_batches=2", "trainer.gc_interval=3", f"hydra.run.dir={run_dir}"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "moeforge run summary" in r.stdout
    assert "garbage collection 2 scheduled" in r.stdout  # steps 3 and 6 (train/garbage.py)
    train = metrics(run_dir)
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "expert_load_cv",
                "tokens_seen", "gpu_hours"):
        assert key in train[-1], key
    assert train[-1]["tokens_seen"] == 6 * 4 * 64
    assert all(m["grad_norm"] > 0 for m in train)
    evals = metrics(run_dir, "eval")
    assert [m["step"] for m in evals] == [3, 6] and all(m["val_loss"] > 0 for m in evals)
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["git"]["commit"] and prov["packages"]["torch"]
    assert "trainer:" in (run_dir / "config.yaml").read_text()
    from PIL import Image  # the summary renders the report's plots from this real run

    for name in ("loss.png", "lr.png", "throughput.png", "expert_load.png"):
        with Image.open(run_dir / "plots" / name) as im:
            assert im.size == (1200, 800)


def test_smoke_experiment_composes_to_the_documented_run():
    from train.config import compose, to_config

    cfg = to_config(compose(["+experiment=smoke"]))
    assert cfg.data.prepare_input == "stdlib" and cfg.data.tokenizer == "byte"
    assert cfg.model.dim == 128 and cfg.model.n_mtp_layers == 1
    assert cfg.trainer.max_steps == 200 and cfg.logging.wandb.mode == "offline"


# dp=2 against dp=1 through torchrun: tests/distributed/test_parity.py (dp2, 1e-5 on losses, every
# step) and the dp=2 CLI runs of tests/distributed/test_resume.py and tests/integration/test_faults.py.
