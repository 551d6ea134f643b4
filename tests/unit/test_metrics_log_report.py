import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from train import metrics as M
from train.log import LoggingConfig, MetricsLogger, console_line

ROOT = Path(__file__).resolve().parents[2]


def test_mfu_and_peaks():
    assert M.model_tflops(6e9, 1000) == 6.0
    assert M.mfu(6e9, 1000, 12.0) == 0.5
    assert M.mfu(6e9, 1000, None) is None
    assert M.peak_tflops(torch.device("cpu")) is None  # no fake MFU on a CPU
    assert M.peak_tflops(torch.device("cpu"), override=100.0) == 100.0
    assert M.PEAK_TFLOPS["H800"][0] == 989.0


def test_expert_load_and_bias_summary():
    load = torch.tensor([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0]])
    s = M.expert_load_summary(load)
    assert s["expert_load_max_over_mean_per_layer"] == [1.0, 4.0]
    assert s["expert_load_cv_per_layer"][0] == 0.0 and s["expert_load_cv_per_layer"][1] > 1.5
    assert s["expert_load"][1] == [4.0, 0.0, 0.0, 0.0]
    b = M.bias_summary(torch.tensor([[-1.0, 1.0]]))
    assert b["expert_bias_min"] == -1.0 and b["expert_bias_max"] == 1.0 and b["expert_bias_mean"] == 0.0


def test_cost_projection():
    c = M.gpu_hours_and_cost(3600, 8, 2.0, tokens_done=100, tokens_total=400)
    assert c["gpu_hours"] == 8 and c["cost_usd"] == 16 and c["projected_gpu_hours"] == 32


def test_throughput_skips_the_warmup_step():
    t = M.Throughput()
    t.update(100, 10.0)  # warm-up step: not counted
    t.update(100, 11.0)
    t.update(100, 12.0)
    assert t.rate() == 100.0 and t.overall() == 100.0
    assert t.rate() is None  # nothing new since


def records():
    rows = []
    for step in range(1, 6):
        rows.append({"kind": "train", "loss": 5 - step * 0.3, "mtp_loss": 5.2 - step * 0.3, "lr": 1e-3 * step,
                     "tokens_per_s": 1000.0 + step, "mfu": 0.3,
                     "expert_load": [[1.0, 2.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]]})
    rows.append({"kind": "eval", "val_loss": 3.9})
    return rows


def test_logger_writes_jsonl_on_rank0_only(tmp_path, capsys):
    cfg = LoggingConfig(progress_bar=False)
    log0 = MetricsLogger(tmp_path / "r0", cfg, rank=0, total_steps=5, run_config={})
    log1 = MetricsLogger(tmp_path / "r1", cfg, rank=1, total_steps=5, run_config={})
    for step, r in enumerate(records(), 1):
        log0.log(step, r)
        log1.log(step, r)
    log0.close()
    log1.close()
    lines = [json.loads(x) for x in (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6] and lines[-1]["kind"] == "eval"
    assert not (tmp_path / "r1").exists()
    assert "step 1/5 | loss 4.7000" in capsys.readouterr().out


def test_console_line_reads_well():
    line = console_line(3, 10, {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 41200.0, "mfu": 0.381,
                                "mem_peak_gib": 12.3, "grad_norm": 0.8})
    assert "41.2k tok/s" in line and "mfu 38.1%" in line and "mem 12.30 GiB" in line


def test_wandb_offline_needs_no_account(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(tmp_path, _offline(), rank=0, total_steps=2, run_config={"a": 1})
    log.log(1, {"loss": 1.0}, histograms={"expert_load/layer_0": [1.0, 2.0]})
    log.close()
    assert any((tmp_path / "wandb").glob("offline-run-*"))


def _offline():
    cfg = LoggingConfig(progress_bar=False)
    cfg.wandb.mode = "offline"
    return cfg


def test_report_renders_valid_images(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, r in enumerate(records(), 1):
            f.write(json.dumps({"step": step, **r}) + "\n")
    r = subprocess.run([sys.executable, "-m", "train.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("loss.png", "lr.png", "throughput.png", "expert_load.png"):
        with Image.open(tmp_path / "plots" / name) as im:
            im.verify()
        with Image.open(tmp_path / "plots" / name) as im:
            assert im.size == (1200, 800)


def test_report_errors_are_one_line(tmp_path):
    for target in (tmp_path / "missing", tmp_path):
        r = subprocess.run([sys.executable, "-m", "train.report", str(target)], cwd=ROOT, capture_output=True,
                           text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    r = subprocess.run([sys.executable, "-m", "train.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "metrics.jsonl:1" in r.stderr and not (tmp_path / "plots").exists()
