"""`python -m train.report`: plots of a realistic metrics.jsonl, and one-line errors on bad input."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from train import metrics as M
from train import report
from train.log import LoggingConfig, MetricsLogger

ROOT = Path(__file__).resolve().parents[2]
PLOTS = ["loss.png", "lr.png", "throughput.png", "expert_load.png"]


def realistic_records(steps: int = 12, moe: bool = True, peak: float | None = 100.0) -> list[tuple[int, dict]]:
    """What the trainer logs: every documented key, from the real metric helpers."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for step in range(1, steps + 1):
        rec = {"kind": "train", "loss": 5.0 * math.exp(-step / 8), "mtp_loss": 5.3 * math.exp(-step / 8),
               "balance_loss": 0.02 / step, "lr": 3e-4 * min(1.0, step / 4), "grad_norm": 1.5 / step,
               "mtp_lambda": 0.3, "bias_gamma": 0.001, "tokens_seen": step * 4096, "time": 2.0 * step,
               "tokens_per_s": 2000.0 + 10 * step, "skipped": None, "skipped_updates": 0, "rollbacks": 0}
        rec["tflops_per_device"] = M.model_tflops(3e7, rec["tokens_per_s"])
        rec["mfu"] = M.mfu(3e7, rec["tokens_per_s"], peak)
        rec.update(M.memory_stats("cpu"))
        rec.update(M.gpu_hours_and_cost(rec["time"], 1, 2.0, rec["tokens_seen"], steps * 4096))
        if moe:
            load = torch.randint(0, 200, (2, 8), generator=gen).float()  # (MoE layers, experts)
            rec.update(M.expert_load_summary(load))
            rec.update(M.bias_summary(torch.randn(2, 8, generator=gen) * 1e-3))
        out.append((step, rec))
        if step % 6 == 0:
            out.append((step, {"kind": "eval", "val_loss": rec["loss"] + 0.1, "val_ppl": math.exp(rec["loss"] + 0.1)}))
    return out


def write_run(run_dir: Path, **kwargs) -> Path:
    with MetricsLogger(run_dir, LoggingConfig(progress_bar=False), rank=0, total_steps=12, run_config={}) as log:
        for step, rec in realistic_records(**kwargs):
            log.log(step, rec)
    return run_dir


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.report", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_writes_every_plot_as_a_1200x800_png(tmp_path):
    run = write_run(tmp_path / "run")
    r = run_cli(str(run))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(run / "plots" / name) for name in PLOTS]
    for name in PLOTS:
        with Image.open(run / "plots" / name) as im:
            im.verify()
        with Image.open(run / "plots" / name) as im:
            assert im.format == "PNG" and im.size == (1200, 800)
            if name == "expert_load.png":  # two heatmaps: many colours, not an empty frame
                assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 200
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "plots"]  # no temporary folder left


def test_dense_run_on_cpu_has_no_expert_plot_and_no_mfu_axis(tmp_path):
    run = write_run(tmp_path, moe=False, peak=None)
    written = report.render(run)
    assert [p.name for p in written] == PLOTS[:3]
    assert not (run / "plots" / "expert_load.png").exists()
    rows = report.read_metrics(run)
    assert all(r.get("mfu") is None for r in rows)


def test_every_logged_key_is_documented():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set()
    for line in doc.splitlines():
        if line.startswith("| ") and not line.startswith("| key"):
            documented |= set(re.findall(r"[a-z][a-z0-9_]*", line.split("|")[1]))
    keys = {"step", "kind", "wall"} | {k for _, rec in realistic_records() for k in rec}
    assert keys - documented == set()
    gpu_only = {"mem_allocated_gib", "mem_reserved_gib", "mem_alloc_retries"}  # memory_stats on CUDA
    assert gpu_only <= documented


def _check_error(rc: int, err: str, needle: str, run: Path) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    if run.is_dir():
        assert not (run / "plots").exists() and not list(run.glob(".plots-*"))


GOOD = json.dumps({"step": 1, "kind": "train", "loss": 2.0})
BAD_FILES = [
    ("", "metrics.jsonl: no training records"),
    ("\n\n", "metrics.jsonl: no training records"),
    (json.dumps({"step": 1, "kind": "eval", "val_loss": 2.0}) + "\n", "no training records"),
    (GOOD + "\n{not json\n", "metrics.jsonl:2: not valid JSON"),
    (GOOD + "\n[1, 2]\n", "metrics.jsonl:2: expected a JSON object"),
    ('{"kind": "train", "loss": 1}\n', "metrics.jsonl:1: 'step'"),
    ('{"step": "3", "kind": "train"}\n', "metrics.jsonl:1: 'step'"),
    ('{"step": 1, "kind": "valid"}\n', "metrics.jsonl:1: 'kind'"),
    ('{"step": 1, "kind": "train", "loss": "low"}\n', "metrics.jsonl:1: 'loss' is not a number"),
    ('{"step": 1, "kind": "train", "expert_load": [[1, 2], [3]]}\n', "metrics.jsonl:1: 'expert_load'"),
    ('{"step": 1, "kind": "train", "expert_load": [[1, 1]]}\n'
     '{"step": 2, "kind": "train", "expert_load": [[1, 1, 1]]}\n',
     "metrics.jsonl:2: expert_load is 1×3, but 1×2 on line 1"),
]


@pytest.mark.parametrize("content, needle", BAD_FILES, ids=range(len(BAD_FILES)))
def test_bad_metrics_file_is_one_line_naming_it_and_writes_nothing(content, needle, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(content)
    rc = report.main([str(tmp_path)])
    err = capsys.readouterr().err
    _check_error(rc, err, needle, tmp_path)
    assert str(tmp_path / "metrics.jsonl") in err


def test_missing_directory_or_file_is_named(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such run directory\n"
    assert report.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'metrics.jsonl'}: missing")
    assert not (tmp_path / "plots").exists()


def test_cli_error_exits_2_without_traceback(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(GOOD + "\n{broken\n")
    r = run_cli(str(tmp_path))
    _check_error(r.returncode, r.stderr, "metrics.jsonl:2: not valid JSON", tmp_path)
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_usage(capsys):
    assert report.main([]) == 2 and capsys.readouterr().err.startswith("usage: python -m train.report")
    assert report.main(["--help"]) == 0 and "expert_load.png" in capsys.readouterr().out


def test_a_last_line_cut_by_a_crash_is_skipped_with_a_warning(tmp_path, capsys):
    run = write_run(tmp_path, moe=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "kind": "tr')  # killed mid-write: no newline
    assert report.main([str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"warning: {run / 'metrics.jsonl'}:15: skipping a truncated last line\n"  # 12 + 2 eval
    assert (run / "plots" / "loss.png").is_file()


def test_a_failed_render_leaves_earlier_plots_untouched_and_no_partial_ones(tmp_path, monkeypatch):
    run = write_run(tmp_path)
    report.render(run)
    before = {p.name: p.read_bytes() for p in (run / "plots").iterdir()}

    def broken(train, evals):
        raise RuntimeError("matplotlib fell over")

    monkeypatch.setattr(report, "PLOTS", report.PLOTS[:2] + (("throughput.png", broken),))
    with pytest.raises(RuntimeError, match="fell over"):
        report.render(run)
    assert {p.name: p.read_bytes() for p in (run / "plots").iterdir()} == before
    assert not list(run.glob(".plots-*"))


def test_steps_logged_again_by_a_resumed_run_replace_the_earlier_lines(tmp_path):
    rows = [{"step": s, "kind": "train", "loss": 5.0 - s, "expert_load": [[1.0, 1.0]]} for s in (1, 2, 3, 4)]
    rows += [{"step": s, "kind": "train", "loss": 10.0 + s, "expert_load": [[0.5, 1.5]]} for s in (3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    latest = report._latest([r for r in report.read_metrics(tmp_path) if r["kind"] == "train"])
    assert [(r["step"], r["loss"]) for r in latest] == [(1, 4.0), (2, 3.0), (3, 13.0), (4, 14.0), (5, 15.0)]
    assert latest[-1]["expert_load"].tolist() == [[0.5, 1.5]]  # only the last matrix is kept in memory
    assert all("expert_load" not in r for r in latest[:-1]) and latest[0]["_layer_max"].tolist() == [1.0]
    assert [p.name for p in report.render(tmp_path)] == PLOTS
