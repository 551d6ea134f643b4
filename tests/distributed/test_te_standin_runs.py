"""fp8=te end to end on the CPU through the Transformer Engine stand-in (tests/te_standin).

Every run goes through the real command line (`python -m train`, torchrun for two processes)
with the parity settings (tests/distributed/runs.py BASE: deterministic float32, SGD-like AdamW)
plus MTP, `fp8=te fp8.recipe=delayed` (TE's default recipe on Hopper; the stand-in emulates it
with per-tensor scales, and its `_extra_state` is the stateful kind) and 6 steps:

- one process, checkpoints at steps 3 and 6: the smoke run and the reference;
- expert parallel (ep=2, two processes) from scratch against it;
- a pipeline (pp=2, two processes) resumed from the one-process checkpoint of step 3, against
  its steps 4–6 (save → resume at another layout);
- `train.export` of the pipeline's last checkpoint to a folder that transformers loads.

Tolerances. The pipeline splits no micro-batch and no FP8 scale group: it computes what one
process computes up to float reassociation (measured ≤ 4e-8 relative), bound 1e-6. Expert
parallelism does change FP8 scale groups: a routed expert's rows on an ep=2 rank are the tokens
of both ranks' micro-batches, so its per-tensor scales (one per expert segment) see other amaxes.
Measured against one process: step 1 (identical weights, only the expert activations' scales
differ) 2.6e-6, steps 2–6 ≤ 5e-5 relative; the bounds are 1e-5 and 2.5e-4. For scale: fp8=te
against fp8=off differs by 4.6e-5 at step 1 and 5e-4 – 8e-4 over steps 3–6 at these settings.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests import te_standin
from tests.distributed.runs import BASE, ROOT, launcher, worker_env

pytestmark = pytest.mark.slow

STEPS = 6
SETTINGS = BASE + ["trainer.log_interval=1", "model.n_mtp_layers=1", "fp8=te", "fp8.recipe=delayed",
                   f"trainer.max_steps={STEPS}"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def env() -> dict:
    if te_standin.real_te_installed():
        pytest.skip("the real Transformer Engine is installed: the gpu-marked tests use it, not the stand-in")
    return te_standin.env_with_standin(worker_env())


def run_cli(nproc: int, args: list[str], run_dir: Path, env: dict, salt: int) -> tuple[str, list[dict]]:
    merged = dict(item.split("=", 1) for item in SETTINGS + args)  # later values replace earlier ones
    cmd = launcher(nproc, salt) + ["-m", "train", *(f"{k}={v}" for k, v in merged.items()),
                                   f"hydra.run.dir={run_dir}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return r.stdout, [m for m in map(json.loads, lines) if m["kind"] == "train"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, dataset, env) -> tuple[list[dict], Path]:
    work = tmp_path_factory.mktemp("te_single")
    _, steps = run_cli(1, [f"data.path={dataset}", f"checkpoint.dir={work / 'ckpt'}", "checkpoint.interval=3"],
                       work / "run", env, salt=41)
    return steps, work / "ckpt"


@pytest.fixture(scope="module")
def pipeline_resumed(tmp_path_factory, dataset, env, single) -> tuple[str, list[dict], Path]:
    work = tmp_path_factory.mktemp("te_pp2")
    stdout, steps = run_cli(2, [f"data.path={dataset}", "parallel.pp=2", f"checkpoint.dir={work / 'ckpt'}",
                                f"checkpoint.resume={single[1] / 'step-00000003'}"], work / "run", env, salt=43)
    return stdout, steps, work / "ckpt"


def test_te_smoke_run_through_the_cli(single, parity_run):
    steps, ckpt = single
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in steps]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 1.0, losses
    # FP8 really ran: the first loss (same weights and batch) differs from fp8=off's by FP8
    # rounding only (measured 4.6e-5 relative), neither equal nor far.
    off = parity_run("single")[0]["mtp1"]["steps"][0]["loss"]
    assert 1e-6 < rel(losses[0], off) < 1e-3, (losses[0], off)
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-")) == ["step-00000003", "step-00000006"]


def test_te_expert_parallel_matches_one_process(single, dataset, env, tmp_path):
    ref = single[0]
    _, steps = run_cli(2, [f"data.path={dataset}", "parallel.ep=2", "checkpoint.resume=never",
                           f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_at_end=false"],
                       tmp_path / "run", env, salt=47)
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert rel(steps[0]["loss"], ref[0]["loss"]) <= 1e-5, (steps[0], ref[0])
    for m, r in zip(steps, ref):
        for key in ("loss", "mtp_loss"):
            assert rel(m[key], r[key]) <= 2.5e-4, (m["step"], key, m[key], r[key])


def test_te_resume_at_a_pipeline_layout_continues_the_run(single, pipeline_resumed):
    ref = single[0]
    stdout, steps, ckpt = pipeline_resumed
    assert "resumed from" in stdout and "step-00000003" in stdout
    assert [m["step"] for m in steps] == list(range(4, STEPS + 1))
    for m in steps:
        r = ref[m["step"] - 1]
        for key in ("loss", "mtp_loss", "grad_norm"):
            assert rel(m[key], r[key]) <= 1e-6, (m["step"], key, m[key], r[key])
    state = json.loads((ckpt / f"step-{STEPS:08d}" / "trainer.json").read_text())
    assert state["loader"]["sequences_consumed"] == STEPS * 8  # one global batch of 8 per step


def test_te_checkpoint_exports_to_a_folder_transformers_loads(single, pipeline_resumed, tmp_path):
    from transformers import AutoModelForCausalLM

    from train.export import ExportArgs, export, load_model

    source = export(ExportArgs(checkpoint=str(pipeline_resumed[2]), output=str(tmp_path / "hf"), dtype="fp32"))
    assert source.name == f"step-{STEPS:08d}"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    ours = load_model(source)
    one_process = load_model(single[1] / f"step-{STEPS:08d}")
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(x)
        assert (logits - theirs(x).logits).abs().max().item() <= 1e-4
        assert (logits - one_process(x)).abs().max().item() <= 1e-4  # measured 1.2e-6
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
