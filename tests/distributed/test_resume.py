"""Resume is bit-exact at the same layout and continues at another, and export works from any.

The uninterrupted runs are the parity runs of tests/distributed/conftest.py: 20 steps of the
smoke model with MTP, deterministic float32 on CPU, saving at steps 10 and 20. Each test here
starts NEW processes through the real CLI (`python -m train` / torchrun) with
`checkpoint.resume=<step 10>` and compares:
- same layout: per-step loss, MTP loss and gradient norm `==`, and every saved tensor (weights,
  fp32 master weights, Adam moments, router biases) and the loader position at step 20 equal;
- another layout (dp 4 → 2 → 1, ep 2 → 1, pp 1 → 2 → 1): the next step's loss within 1e-5 of the
  uninterrupted run, and the loader's global position exact (no sequence repeated or skipped).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.distributed.runs import BASE, LAYOUTS, ROOT, STEPS, assert_same_state, launcher, worker_env

pytestmark = pytest.mark.slow


def overrides(dataset: Path, layout_overrides: list[str], **extra) -> list[str]:
    """The parity worker's settings as CLI overrides (later keys replace earlier ones)."""
    merged: dict[str, str] = {}
    for item in BASE + [f"data.path={dataset}", "model.n_mtp_layers=1", "trainer.log_interval=1",
                        "checkpoint.resume=auto", *layout_overrides]:
        if item.startswith("parity."):  # the parity worker's own option
            continue
        key, value = item.split("=", 1)
        merged[key] = value
    merged.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in merged.items()]


def run_cli(nproc: int, args: list[str], tmp_path: Path, salt: int) -> tuple[subprocess.CompletedProcess, list[dict]]:
    run_dir = tmp_path / "run"
    cmd = launcher(nproc, salt) + ["-m", "train", *args, f"hydra.run.dir={run_dir}"]
    r = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return r, [m for m in map(json.loads, lines) if m["kind"] == "train"]


@pytest.mark.parametrize("layout", ["single", "dp2", "ep2", "pp2", "pp2_ep2"])
def test_resume_is_bit_exact(layout, parity_run, dataset, tmp_path):
    results, ckpt = parity_run(layout)
    nproc, layout_overrides = LAYOUTS[layout]
    uninterrupted = results["mtp1"]["steps"]
    args = overrides(dataset, layout_overrides, trainer__max_steps=STEPS,
                     checkpoint__resume=ckpt / "step-00000010", checkpoint__dir=tmp_path / "ckpt")
    r, steps = run_cli(nproc, args, tmp_path, salt=len(layout))
    assert "resumed from" in r.stdout and "step-00000010" in r.stdout
    assert [m["step"] for m in steps] == list(range(11, STEPS + 1))
    for m, u in zip(steps, uninterrupted[10:]):
        assert (m["loss"], m["mtp_loss"], m["grad_norm"]) == (u["loss"], u["mtp_loss"], u["grad_norm"]), m["step"]
    assert_same_state(ckpt / "step-00000020", tmp_path / "ckpt" / "step-00000020")


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_elastic_resume_across_dp_ep_and_pp(parity_run, dataset, tmp_path):
    """dp=4×ep=2 → (step 10) → pp=2×dp=2×ep=2 → (step 15) → one process (dp=1, ep=1) → 20.

    Every leg keeps max_steps=20: the LR and MTP-weight schedules are functions of it."""
    results, ckpt = parity_run("dp4_ep2")
    uninterrupted = results["mtp1"]["steps"]
    first = tmp_path / "first"
    args = overrides(dataset, ["parallel.pp=2", "parallel.ep=2"], trainer__max_steps=STEPS,
                     checkpoint__resume=ckpt / "step-00000010", checkpoint__dir=first / "ckpt", checkpoint__interval=5)
    _, steps_first = run_cli(4, args, first, salt=3)
    second = tmp_path / "second"
    args = overrides(dataset, [], trainer__max_steps=STEPS, checkpoint__resume=first / "ckpt" / "step-00000015",
                     checkpoint__dir=second / "ckpt")
    _, steps_second = run_cli(1, args, second, salt=5)
    assert [m["step"] for m in steps_first] == list(range(11, 21))
    assert [m["step"] for m in steps_second] == list(range(16, 21))
    for m in steps_first + steps_second:
        u = uninterrupted[m["step"] - 1]
        assert rel(m["loss"], u["loss"]) <= 1e-5, (m["step"], m["loss"], u["loss"])
        assert rel(m["mtp_loss"], u["mtp_loss"]) <= 1e-5, (m["step"], m["mtp_loss"], u["mtp_loss"])
    # The loader's global position: every step consumed exactly one global batch of 8 sequences.
    for path, step in ((first / "ckpt" / "step-00000015", 15), (second / "ckpt" / "step-00000020", 20)):
        loader = json.loads((path / "trainer.json").read_text())["loader"]
        assert (loader["epoch"], loader["sequences_consumed"]) == (0, step * 8), path
    ref = json.loads((ckpt / "step-00000020" / "trainer.json").read_text())["loader"]
    assert ref == json.loads((second / "ckpt" / "step-00000020" / "trainer.json").read_text())["loader"]


def test_export_from_a_pipeline_expert_parallel_checkpoint_loads_in_transformers(parity_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from train.export import ExportArgs, export, load_model

    _, ckpt = parity_run("pp2_ep2")
    export(ExportArgs(checkpoint=str(ckpt), output=str(tmp_path / "hf"), dtype="fp32"))  # the newest: step 20
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    ours = load_model(ckpt / "step-00000020")
    single = load_model(parity_run("single")[1] / "step-00000020")
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(x)
        assert (logits - theirs(x).logits).abs().max().item() <= 1e-4
        assert (logits - single(x)).abs().max().item() <= 1e-3  # the same training in another layout
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_init_from_a_hugging_face_folder_at_pp2_ep2(dataset, tmp_path):
    """`checkpoint.init_from=<HF folder>` at pp=2 × ep=2 (4 processes, each reading only the
    tensors and experts it holds): after one step at lr 1e-30 (an update far below float32's
    resolution of the weights; no router-bias update) every saved weight equals `model.hf.load`
    of the folder (a weight that is exactly 0.0 moves by ~1e-35), and the optimizer, step and data position are fresh. Then a resume of that
    checkpoint with reset_optimizer and reset_data restarts the Adam moments and the data."""
    import yaml

    from model import ModelConfig, Transformer
    from model import hf
    from parallel.state import Reader

    cfg = ModelConfig(**{**yaml.safe_load((ROOT / "conf" / "model" / "smoke.yaml").read_text()),
                         "n_mtp_layers": 1}).validate()
    torch.manual_seed(7)
    source = Transformer(cfg)
    source.init_weights(7)
    with torch.no_grad():
        for name, b in source.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.rand_like(b) - 0.1)
    hf.save(source, tmp_path / "hf", max_shard_bytes=2_000_000)
    reference = hf.load(tmp_path / "hf").state_dict()
    common = dict(trainer__max_steps=1, optim__lr=1e-30, schedule__bias_update_gamma=0.0,
                  checkpoint__dir=tmp_path / "ckpt")
    args = overrides(dataset, ["parallel.pp=2", "parallel.ep=2"], checkpoint__init_from=tmp_path / "hf", **common)
    r, steps = run_cli(4, args, tmp_path / "first", salt=11)
    assert "initialized weights from" in r.stdout and [m["step"] for m in steps] == [1]
    saved = tmp_path / "ckpt" / "step-00000001"
    reader = Reader(saved)
    assert sorted(reader.names("param") + reader.names("buffer")) == sorted(reference)
    for name, want in reference.items():
        kind = "param" if reader.has("param", name) else "buffer"
        got = reader.read(kind, name).view(want.shape)
        assert torch.equal(got[want != 0], want[want != 0].float()), name  # the step moved none of them
        assert (got - want).abs().max().item() <= 1e-30, name  # an exact 0.0 moves by ~1e-35
    state = json.loads((saved / "trainer.json").read_text())
    assert (state["step"], state["adam_step"], state["loader"]["sequences_consumed"]) == (1, 1, 8)

    common.update(trainer__max_steps=2, checkpoint__dir=tmp_path / "ckpt2")
    args = overrides(dataset, [], checkpoint__resume=saved, checkpoint__reset_optimizer="true",
                     checkpoint__reset_data="true", **common)
    r, steps = run_cli(1, args, tmp_path / "second", salt=13)
    assert "resumed from" in r.stdout and "reset_optimizer, reset_data" in r.stdout
    state = json.loads((tmp_path / "ckpt2" / "step-00000002" / "trainer.json").read_text())
    assert (state["step"], state["adam_step"], state["loader"]["sequences_consumed"]) == (2, 1, 8)

    # A moeforge checkpoint directory (its newest verified checkpoint) in one process: the same weights.
    common.update(trainer__max_steps=1, checkpoint__dir=tmp_path / "ckpt3")
    r, _ = run_cli(1, overrides(dataset, [], checkpoint__init_from=tmp_path / "ckpt", **common), tmp_path / "third", 17)
    assert f"initialized weights from {saved}" in r.stdout
    again = Reader(tmp_path / "ckpt3" / "step-00000001")
    for name in reader.names("param"):
        got, want = again.read("param", name).view(reference[name].shape), reference[name]
        assert torch.equal(got[want != 0], want[want != 0]) and (got - want).abs().max().item() <= 1e-30, name
    missing = tmp_path / "missing"
    common.update(checkpoint__dir=tmp_path / "ckpt4")
    cmd = launcher(1, 0) + ["-m", "train", *overrides(dataset, [], checkpoint__init_from=missing, **common),
                            f"hydra.run.dir={tmp_path / 'fourth'}"]
    bad = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert bad.returncode == 2 and f"error: checkpoint.init_from={missing}: no such folder" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
