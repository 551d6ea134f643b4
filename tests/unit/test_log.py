"""MetricsLogger sinks: metrics.jsonl, the console line, the progress bar, wandb; rank ≠ 0 silent."""

import io
import json
import math
import re
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import ConfigError
from train.log import LoggingConfig, MetricsLogger, WandbConfig, console_line, jsonable

CONF = Path(__file__).resolve().parents[2] / "conf"
TRAIN = {"kind": "train", "loss": 3.214, "mtp_loss": 3.4019, "lr": 2.9e-4, "grad_norm": 0.8212,
         "tokens_per_s": 41234.0, "mfu": 0.3812, "mem_peak_gib": 12.3, "expert_load_max_over_mean": 1.3149}


def cfg(progress_bar=False, mode="disabled") -> LoggingConfig:
    return LoggingConfig(wandb=WandbConfig(mode=mode), progress_bar=progress_bar)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_console_line_reads_as_documented():
    assert console_line(120, 1000, TRAIN) == ("step 120/1000 | loss 3.2140 | mtp 3.402 | lr 2.90e-04 | gnorm 0.82 | "
                                              "41.2k tok/s | mfu 38.1% | mem 12.30 GiB | load max/mean 1.31")
    cpu = console_line(3, 10, {"loss": 5.0, "tokens_per_s": 812.4, "mfu": None})
    assert cpu == "step 3/10 | loss 5.0000 | 812 tok/s | mfu n/a"  # absent keys left out, null shown as n/a
    assert console_line(100, 1000, {"kind": "eval", "val_loss": 3.1, "val_ppl": 22.198}) == \
        "step 100/1000 | val loss 3.1000 | val ppl 22.20"


def test_console_line_shows_a_skipped_update_and_the_running_counts():
    """The trainer logs `skipped` (the reason or null), `skipped_updates` and `rollbacks`."""
    skipped = {"loss": 9.5, "skipped": "loss spike", "skipped_updates": 2, "rollbacks": 1}
    assert console_line(7, 10, skipped) == ("step 7/10 | loss 9.5000 | skipped: loss spike | skipped updates 2 | "
                                            "rollbacks 1")
    later = {"loss": 3.0, "skipped": None, "skipped_updates": 2, "rollbacks": 0}
    assert console_line(8, 10, later) == "step 8/10 | loss 3.0000 | skipped updates 2"
    clean = {"loss": 3.0, "skipped": None, "skipped_updates": 0, "rollbacks": 0}
    assert console_line(9, 10, clean) == "step 9/10 | loss 3.0000"  # nothing to report: nothing shown


def test_jsonl_gets_one_flushed_object_per_call_with_step_and_kind(tmp_path, capsys):
    log = MetricsLogger(tmp_path / "run", cfg(), rank=0, total_steps=10, run_config={})
    log.log(1, TRAIN)
    log.log(2, {"loss": 3.0})  # kind defaults to train
    rows = read(tmp_path / "run" / "metrics.jsonl")  # readable before close: flushed per line
    log.log(2, {"kind": "eval", "val_loss": 2.9, "val_ppl": 18.2})
    log.close()
    assert len(rows) == 2
    rows = read(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["kind"]) for r in rows] == [(1, "train"), (2, "train"), (2, "eval")]
    assert rows[0]["loss"] == 3.214 and rows[2]["val_ppl"] == 18.2 and isinstance(rows[0]["wall"], float)
    out = capsys.readouterr().out.splitlines()
    assert out == [console_line(1, 10, TRAIN), "step 2/10 | loss 3.0000", "step 2/10 | val loss 2.9000 | val ppl 18.20"]
    with pytest.raises(RuntimeError, match="after close"):
        log.log(3, {"loss": 1.0})


def test_a_resumed_run_appends(tmp_path):
    for step in (1, 2):
        with MetricsLogger(tmp_path, cfg(), rank=0, total_steps=2, run_config={}) as log:
            log.log(step, {"loss": 1.0})
    assert [r["step"] for r in read(tmp_path / "metrics.jsonl")] == [1, 2]


def test_values_are_made_json_safe(tmp_path):
    with MetricsLogger(tmp_path, cfg(), rank=0, total_steps=5, run_config={}) as log:
        log.log(1, {"loss": torch.tensor(2.5), "grad_norm": float("inf"), "balance_loss": float("nan"),
                    "tokens_seen": np.int64(4096), "mfu": np.float32(0.25), "expert_load": torch.ones(2, 3)})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    (row,) = read(tmp_path / "metrics.jsonl")
    assert row["loss"] == 2.5 and row["grad_norm"] is None and row["balance_loss"] is None
    assert row["tokens_seen"] == 4096 and row["mfu"] == 0.25 and row["expert_load"] == [[1.0] * 3] * 2
    assert jsonable({"x": (1, math.nan)}) == {"x": [1, None]}
    with pytest.raises(TypeError, match="object"):
        jsonable(object())


def test_unknown_kind_is_refused(tmp_path):
    with MetricsLogger(tmp_path, cfg(), rank=0, total_steps=5, run_config={}) as log:
        with pytest.raises(ValueError, match="kind='val'"):
            log.log(1, {"kind": "val", "val_loss": 1.0})


def test_other_ranks_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Tty())
    log = MetricsLogger(tmp_path / "r1", cfg(progress_bar=True, mode="offline"), rank=1, total_steps=5,
                        run_config={})
    for step in range(1, 4):
        log.progress(step)
        log.log(step, TRAIN, histograms={"expert_load/layer_0": [1.0, 2.0]})
    log.close()
    assert not (tmp_path / "r1").exists()
    assert capsys.readouterr().out == "" and sys.stderr.getvalue() == ""


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_keeps_console_lines_whole(tmp_path, capsys, monkeypatch):
    fake = _Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    log = MetricsLogger(tmp_path, cfg(progress_bar=True), rank=0, total_steps=10, run_config={})
    for step in range(1, 11):
        log.progress(step)
        if step % 5 == 0:
            log.log(step, {"loss": 1.0 / step})
    log.close()
    bar = fake.getvalue()
    assert re.search(r"train: +100%.* 10/10 \[\d\d:\d\d<\d\d:\d\d, ", bar)  # elapsed<ETA
    assert " 1/10 " in bar and " 0/10 " not in bar  # starts at the first step seen: ETA ignores warm-up
    assert capsys.readouterr().out.splitlines() == ["step 5/10 | loss 0.2000", "step 10/10 | loss 0.1000"]


def test_progress_bar_stays_off_when_disabled_or_not_a_terminal(tmp_path, capsys):
    for progress_bar in (False, True):  # pytest's captured stderr is not a terminal
        with MetricsLogger(tmp_path / str(progress_bar), cfg(progress_bar), rank=0, total_steps=5,
                           run_config={}) as log:
            for step in range(1, 6):
                log.progress(step)
            assert log._bar is None
    assert capsys.readouterr().err == ""


def test_wandb_disabled_never_imports_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    with MetricsLogger(tmp_path, cfg(mode="disabled"), rank=0, total_steps=2, run_config={}) as log:
        log.log(1, {"loss": 1.0}, histograms={"expert_load/layer_0": [1.0, 2.0]})
    assert read(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0
    assert not (tmp_path / "wandb").exists()


def test_wandb_offline_needs_no_account_and_writes_under_the_run_dir(tmp_path, monkeypatch):
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))  # keep wandb out of $HOME
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    log = MetricsLogger(run, cfg(mode="offline"), rank=0, total_steps=2, run_config={"optim": {"lr": 1e-3}})
    assert not (run / "wandb").exists()  # initialised lazily, at the first log
    log.log(1, {"loss": 1.5, "expert_load_cv_per_layer": [0.1, 0.2], "mfu": None},
            histograms={"expert_load/layer_0": [1.0, 2.0, 3.0]})
    log.log(1, {"kind": "eval", "val_loss": 1.4})
    log.close()
    (record,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    keys = (b"loss", b"expert_load_cv_per_layer/1", b"expert_load/layer_0", b"histogram", b"val_loss")
    deadline = time.monotonic() + 20  # wandb's service writes the records just after finish() returns
    while not all(k in record.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.02)
    data = record.read_bytes()
    for key in keys:
        assert key in data, key
    assert b"memory_percent" not in data  # system-metrics sampler off by default (logging.wandb.system_metrics)


def test_logging_config_validation_names_the_key():
    assert LoggingConfig().validate() == LoggingConfig()
    with pytest.raises(ConfigError, match="logging.wandb.mode='cloud'"):
        LoggingConfig(wandb=WandbConfig(mode="cloud")).validate()
    with pytest.raises(ConfigError, match="logging.peak_tflops=0"):
        LoggingConfig(peak_tflops=0.0).validate()
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        MetricsLogger(Path("/nonexistent"), cfg(mode="cloud"), rank=0, total_steps=1, run_config={})


def test_every_logging_key_is_documented_with_its_meaning():
    """The logging keys have no YAML (their defaults are the dataclass's): docs/config.md's table is their reference."""
    doc = (CONF.parent / "docs" / "config.md").read_text()
    section = doc.split("## logging (`train.log.LoggingConfig`)", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| key")}
    keys = {f.name for f in fields(LoggingConfig) if f.name != "wandb"} | {f"wandb.{f.name}" for f in fields(WandbConfig)}
    assert set(rows) == keys
    assert all(rows.values()), rows
    assert not (CONF / "logging").exists()  # a group file would restate the defaults
