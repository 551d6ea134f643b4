"""Metric sinks of rank 0: a console line per interval, a progress bar, metrics.jsonl, wandb.

Other ranks log nothing (every method is a no-op there). Keys are documented in docs/metrics.md.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "moeforge"
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    price_per_gpu_hour: float = 2.0  # USD; DeepSeek-V3's cost table assumes $2 per H800 GPU-hour
    peak_tflops: float | None = None  # override of the device peak used for MFU


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def console_line(step: int, total: int, m: dict) -> str:
    if m.get("kind") == "eval":
        return f"step {step}/{total} | val loss {_fmt(m.get('val_loss'), '.4f')} | val ppl {_fmt(m.get('val_ppl'), '.2f')}"
    tok = m.get("tokens_per_s")
    mem = m.get("mem_peak_gib")
    parts = [f"step {step}/{total}", f"loss {_fmt(m.get('loss'), '.4f')}", f"mtp {_fmt(m.get('mtp_loss'), '.3f')}",
             f"lr {_fmt(m.get('lr'), '.2e')}", f"gnorm {_fmt(m.get('grad_norm'), '.2f')}",
             f"{tok / 1e3:.1f}k tok/s" if tok else "tok/s n/a",
             f"mfu {m['mfu'] * 100:.1f}%" if m.get("mfu") is not None else "mfu n/a",
             f"mem {mem:.2f} GiB" if mem is not None else "mem n/a",
             f"load max/mean {_fmt(m.get('expert_load_max_over_mean'), '.2f')}"]
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, rank: int, total_steps: int, run_config: dict):
        self.enabled = rank == 0
        self.cfg, self.total = cfg, total_steps
        self.run_dir = Path(run_dir)
        self._bar = None
        self._wandb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a")
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, file=sys.stderr, desc="train", dynamic_ncols=True, leave=False)
        if cfg.wandb.mode != "disabled":
            import wandb

            self._wandb = wandb.init(mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity,
                                     name=cfg.wandb.name, dir=str(self.run_dir), config=run_config)

    def log(self, step: int, metrics: dict, histograms: dict | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": metrics.get("kind", "train"), "wall": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        line = console_line(step, self.total, record)
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, flush=True)
        if self._wandb is not None:
            import wandb

            data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
            for name, values in (histograms or {}).items():
                data[name] = wandb.Histogram(values)
            self._wandb.log(data, step=step)

    def progress(self, step: int) -> None:
        if self.enabled and self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if not self._file.closed:
            self._file.close()
