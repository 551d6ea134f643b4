"""Metric sinks of rank 0: a console line per log call, a progress bar, metrics.jsonl, wandb.

Only rank 0 logs: the trainer reduces the numbers over ranks before calling, so every other
rank's `MetricsLogger` is a no-op (no file, no directory, no wandb, no bar). Keys of
metrics.jsonl are documented in docs/metrics.md.

- metrics.jsonl: one JSON object per `log` call, appended and flushed line by line, so a
  crashed run keeps everything up to its last log, and a resumed run appends. Values are made
  JSON-safe: tensors and numpy scalars become numbers/lists, NaN and ±inf become null (strict
  JSON readers such as jq reject NaN; the trainer stops on a non-finite loss anyway).
- console: one line per call on stdout, written with `tqdm.write` so an active bar (on stderr)
  is cleared and redrawn around it rather than garbled.
- progress bar: tqdm with ETA on stderr, shown only when stderr is a terminal: in a log file a
  bar is thousands of carriage-return updates. Created at the first `progress` call, with that
  step as its start, so the ETA ignores the first (compile, warm-up) step and a resumed run.
- wandb: initialised lazily at the first `log` call (a run that fails during setup leaves no
  empty wandb run, and construction stays cheap), as torchtitan's WandBLogger does it:
  `wandb.init(dir=run_dir, config=…)`. mode=disabled never imports wandb; mode=offline writes
  under run_dir/wandb and needs no account or network. Scalars are logged as they are, 1-D
  lists as `key/i`, and `histograms` as wandb.Histogram. wandb's system-metrics sampler is
  off unless logging.wandb.system_metrics (it slowed the 2-core smoke run, bench/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.config import ConfigError

WANDB_MODES = ("online", "offline", "disabled")
KINDS = ("train", "eval")


@dataclass
class WandbConfig:
    """Weights & Biases (logging.wandb).

    mode: online | offline (files under <run dir>/wandb, sync later with `wandb sync`) |
        disabled (wandb is never imported).
    project, entity, name: wandb's own; None = wandb's default.
    group, tags: wandb's run grouping and labels (None / empty: none).
    The run id is kept in <run dir>/wandb_id and passed with resume="allow", so every start of
    the same run (a restart, a requeue, the same command again) continues one wandb run.
    system_metrics: wandb's background sampler of CPU/GPU/disk/network use. Off by default:
        on the 2-core CPU smoke run it caused periodic 2× slow intervals (bench/RESULTS.md,
        "Smoke run"); turn it on where spare cores exist and GPU power/utilisation matter.
    """

    mode: str = "disabled"
    project: str = "moeforge"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    system_metrics: bool = False


@dataclass
class LoggingConfig:
    """Metric sinks (`logging.*` keys; docs/config.md lists them).

    wandb: see WandbConfig.
    progress_bar: tqdm bar with ETA on rank 0's stderr (only when stderr is a terminal).
    price_per_gpu_hour: USD per device-hour for cost_usd; DeepSeek-V3's cost table assumes $2
        per H800 GPU-hour (report Table 1).
    peak_tflops: device peak TFLOP/s for MFU; None = look the device up in
        train.metrics.PEAK_TFLOPS (on a CPU there is none and MFU is null).
    """

    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    price_per_gpu_hour: float = 2.0
    peak_tflops: float | None = None

    def validate(self) -> "LoggingConfig":
        """Raise ConfigError naming the first bad key; return self."""
        if self.wandb.mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb.mode={self.wandb.mode!r}: must be online, offline or disabled")
        if self.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"logging.wandb.mode={self.wandb.mode}: the wandb package is not installed "
                              "(pip install wandb, or logging.wandb.mode=disabled)")
        if self.price_per_gpu_hour < 0:
            raise ConfigError(f"logging.price_per_gpu_hour={self.price_per_gpu_hour}: must be >= 0")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"logging.peak_tflops={self.peak_tflops}: must be > 0, or null to look the device up")
        return self


def jsonable(value):
    """`value` as plain JSON types: tensors/numpy → numbers or lists, non-finite floats → None."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # torch/numpy array or scalar
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not a number, list or string")


def _num(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _rate(tok_s: float | None) -> str:
    if tok_s is None:
        return "tok/s n/a"
    if tok_s >= 1e6:
        return f"{tok_s / 1e6:.2f}M tok/s"
    return f"{tok_s / 1e3:.1f}k tok/s" if tok_s >= 1e3 else f"{tok_s:.0f} tok/s"


def console_line(step: int, total: int, m: dict) -> str:
    """One readable line, e.g. `step 120/1000 | loss 3.2140 | mtp 3.402 | lr 2.90e-04 | gnorm 0.82 |
    41.2k tok/s | mfu 38.1% | mem 12.30 GiB | load max/mean 1.31`. Keys absent from `m` are
    left out; present but null ones print "n/a" (mfu on a CPU). A skipped update ends the line
    with `| skipped: <reason>`, and the running counts `skipped updates N` and `rollbacks N`
    follow once they are non-zero."""
    parts = [f"step {step}/{total}"]
    if m.get("kind") == "eval":
        parts.append(f"val loss {_num(m.get('val_loss'), '.4f')}")
        if "val_ppl" in m:
            parts.append(f"val ppl {_num(m['val_ppl'], '.2f')}")
        return " | ".join(parts)
    fields = [("loss", "loss", ".4f"), ("mtp_loss", "mtp", ".3f"), ("lr", "lr", ".2e"), ("grad_norm", "gnorm", ".2f")]
    parts += [f"{label} {_num(m[key], spec)}" for key, label, spec in fields if key in m]
    if "tokens_per_s" in m:
        parts.append(_rate(m["tokens_per_s"]))
    if "mfu" in m:
        parts.append("mfu n/a" if m["mfu"] is None else f"mfu {100 * m['mfu']:.1f}%")
    if "mem_peak_gib" in m:
        parts.append(f"mem {_num(m['mem_peak_gib'], '.2f')} GiB")
    if "expert_load_max_over_mean" in m:
        parts.append(f"load max/mean {_num(m['expert_load_max_over_mean'], '.2f')}")
    if m.get("skipped"):
        parts.append(f"skipped: {m['skipped']}")
    if m.get("skipped_updates"):
        parts.append(f"skipped updates {m['skipped_updates']}")
    if m.get("rollbacks"):
        parts.append(f"rollbacks {m['rollbacks']}")
    return " | ".join(parts)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class MetricsLogger:
    """Rank 0's metric sinks; on any other rank every method is a no-op.

    `log(step, metrics, histograms)` writes one metrics.jsonl line ({"step", "kind", "wall",
    **metrics}; kind "train" unless metrics say "eval"), one console line, and a wandb step.
    `progress(step)` advances the bar; `close()` finishes wandb, the bar and the file
    (idempotent; also on `with MetricsLogger(...) as log:` exit).
    """

    def __init__(self, run_dir: Path, cfg: LoggingConfig, rank: int, total_steps: int, run_config: dict):
        self.enabled = rank == 0
        self.cfg = cfg
        self.total = total_steps
        self.run_dir = Path(run_dir)
        self.run_config = run_config
        self._file = None
        self._bar = None
        self._wandb = None
        if not self.enabled:
            return
        if cfg.wandb.mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb.mode={cfg.wandb.mode!r}: must be online, offline or disabled")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, step: int, metrics: dict, histograms: dict[str, list[float]] | None = None) -> None:
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log after close()")
        kind = metrics.get("kind", "train")
        if kind not in KINDS:
            raise ValueError(f"metrics kind={kind!r}: must be train or eval")
        record = jsonable({"step": int(step), "kind": kind, "wall": time.time(),
                           **{k: v for k, v in metrics.items() if k != "kind"}})
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        self._write_line(console_line(step, self.total, record))
        if self.cfg.wandb.mode != "disabled":
            self._log_wandb(step, record, histograms or {})

    def _write_line(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)  # clears and redraws a bar on the terminal
        sys.stdout.flush()

    def _wandb_id(self) -> str:
        """This run's wandb id: made at its first start, read back at every later one."""
        path = self.run_dir / "wandb_id"
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        import uuid

        run_id = uuid.uuid4().hex[:16]
        path.write_text(run_id + "\n")
        return run_id

    def _log_wandb(self, step: int, record: dict, histograms: dict) -> None:
        import wandb

        if self._wandb is None:
            w = self.cfg.wandb
            self._wandb = wandb.init(mode=w.mode, project=w.project, entity=w.entity, name=w.name,
                                     group=w.group, tags=list(w.tags) or None, id=self._wandb_id(),
                                     resume="allow", dir=str(self.run_dir), config=self.run_config,
                                     settings=wandb.Settings(x_disable_stats=not w.system_metrics))
        data = {}
        for key, value in record.items():
            if key in ("step", "kind", "wall") or value is None or isinstance(value, (bool, str)):
                continue
            if isinstance(value, (int, float)):
                data[key] = value
            elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                data.update({f"{key}/{i}": v for i, v in enumerate(value) if v is not None})
            # lists of lists (the expert_load matrix) stay in metrics.jsonl and the report
        for name, values in histograms.items():
            data[name] = wandb.Histogram(jsonable(list(values)))
        self._wandb.log(data, step=int(step))

    def progress(self, step: int) -> None:
        """Move the bar to `step` optimizer steps done (rank 0, progress_bar on, stderr a TTY)."""
        if not self.enabled or not self.cfg.progress_bar:
            return
        if self._bar is None:
            if not _isatty(sys.stderr):
                return
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=step, file=sys.stderr, desc="train", unit="step",
                             dynamic_ncols=True, leave=False)
            return
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._file is not None:
            self._file.close()
            self._file = None
