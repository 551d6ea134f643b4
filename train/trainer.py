"""The training loop: one loop for every layout, with DeepSpeed as the engine.

Each optimizer step does the following (docs/trainer.md draws it):
- Take the schedule's values: batch size (grad_accum), lr, MTP λ and bias γ.
- Draw grad_accum micro-batches from the stateful loader.
- Make one call to the step module (train/step.py). It runs forward and backward, the step
  guard, the update and the expert-bias update, on the DeepSpeed engine or on the pipeline
  engine.
- Update the counters and log at the interval. Make the evaluation, checkpoint and
  preemption decisions.

The loop does not know which execution path is running. Nothing in it reads a device tensor
on the host, except when logging. A preemption signal saves a checkpoint and leaves with exit
75. A loss spike rolls back to the last checkpoint when asked to. Checkpoints go through the
checkpoint manager (train/checkpoint.py): resume is bit-exact at the same layout and continues
at another layout.

Global batch semantics: each loader batch is one micro-batch on every rank, and an optimizer
step consumes grad_accum of them. The loader slices each global batch over the ranks, so the
set of sequences in a step is the same for any dp (the loader's exactly-once property,
docs/data.md). That is what makes dp=1 and dp=2 losses equal. With a batch-size ramp, the
loader runs on the micro-step grid (micro × dp) and the ramp only changes grad_accum.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from model import flops_per_token, moe_layers
from parallel.engine import resolve_device, resolve_dtype
from parallel.topology import Layout, build_groups

from . import metrics as M
from .checkpoint import CheckpointManager, seed_everything
from .config import Config
from .faults import Faults, Preemption, SpikeDetector
from .garbage import GarbageSchedule
from .log import MetricsLogger
from .schedule import gamma_at, global_batch_at, lr_at, mtp_lambda_at
from .step import Coefficients, TrainError, build_step_module

__all__ = ["Trainer", "TrainError", "Preempted", "DataExhausted", "Progress"]


class DataExhausted(RuntimeError):
    """The training data ended (a mixture's on_exhausted=stop): the run stops cleanly there."""


class Preempted(RuntimeError):
    """A preemption signal arrived; the run saved a checkpoint and must leave (EXIT_PREEMPTED)."""


@dataclass
class Progress:
    """The loop's counters. All but the last two are saved in checkpoints."""

    step: int = 0
    tokens_seen: int = 0
    skipped_total: int = 0  # updates skipped (non-finite values, loss spikes)
    consecutive_skips: int = 0
    rollbacks: int = 0
    last_finite_loss: float = float("nan")
    furthest_step: int = 0  # rollbacks that never get past it are capped by trainer.max_skipped
    rollbacks_without_progress: int = 0

    def advance(self, tokens: int, skipped: bool, loss: float) -> None:
        self.step += 1
        self.tokens_seen += tokens
        if skipped:
            self.skipped_total += 1
            self.consecutive_skips += 1
            return
        self.consecutive_skips = 0
        self.last_finite_loss = loss
        if self.step > self.furthest_step:
            self.furthest_step, self.rollbacks_without_progress = self.step, 0

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("step", "tokens_seen", "skipped_total", "consecutive_skips",
                                              "rollbacks", "last_finite_loss")}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_total, self.consecutive_skips = int(state["skipped_total"]), int(state["consecutive_skips"])
        self.rollbacks = int(state.get("rollbacks", 0))
        self.last_finite_loss = float(state.get("last_finite_loss", float("nan")))


@dataclass
class _Clock:
    throughput: M.Throughput = field(default_factory=M.Throughput)
    start: float = field(default_factory=time.perf_counter)
    saved_step: int = -1
    summary: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, world_size: int, rank: int):
        t = cfg.trainer
        self.cfg, self.run_dir, self.rank, self.world_size = cfg, run_dir, rank, world_size
        self.layout = Layout(world_size, cfg.parallel.pp, cfg.parallel.ep)
        self.dp = self.layout.dp
        self.device = resolve_device(t.device)
        self.dtype = resolve_dtype(t.dtype, self.device)
        self.granularity = t.micro_batch_size * self.dp
        self.total_tokens = t.max_steps * t.global_batch_size * t.seq_len
        self.progress = Progress()
        self.spike = SpikeDetector(t.spike.window, t.spike.k, t.spike.min_rise, t.spike.warmup)
        self.preemption = Preemption()
        self.faults = Faults.from_environ(rank)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        self._clock: _Clock | None = None
        self._last_save = time.monotonic()  # wall-time checkpoints count from the start
        self.garbage = GarbageSchedule(t.gc_interval)

    # what tests, benchmarks and the CLI read
    step = property(lambda self: self.progress.step)
    tokens_seen = property(lambda self: self.progress.tokens_seen)
    model = property(lambda self: self.step_module.model)  # this rank's parameters
    engine = property(lambda self: self.step_module.engine)
    optimizer = property(lambda self: self.step_module.optimizer)
    resumed_from = property(lambda self: self.checkpointer.resumed_from)

    # ----------------------------------------------------------------- setup
    def setup(self, train_loader, val_loader_factory) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        self.train_loader, self.val_loader_factory = train_loader, val_loader_factory  # close() ends it
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Deterministic mode also fills every torch.empty with NaN by default. DeepSpeed's
            # pipeline ZeRO path allocates its 5e8-element reduce bucket with torch.empty each
            # step: the fill touched 2 GB per buffer (measured: ~4.4 GB RSS per process and a
            # 7-minute pp2×ep2 parity run). Nothing here reads uninitialised memory.
            torch.utils.deterministic.fill_uninitialized_memory = False
        seed_everything(t.seed)
        self.groups = build_groups(self.layout, self.rank)
        self.step_module = build_step_module(
            cfg, self.groups, self.device, self.dtype,
            is_spike=lambda loss: t.spike.action != "off" and self.spike.is_spike(loss),
            preempt_requested=lambda: self.preemption.requested, save_due=self._save_due,
            before_update=lambda: self.checkpointer.snapshot_taken())
        self.step_module.build(grad_accum=t.global_batch_size // self.granularity)
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.checkpointer = CheckpointManager(cfg, self.ckpt_root, self.layout, self.rank, steps=self.step_module,
                                              loader=train_loader, spike=self.spike, progress=self.progress,
                                              faults=self.faults)
        self.checkpointer.restore()
        self.train_iter = iter(train_loader)
        self.preemption.install()
        self.logger = MetricsLogger(self.run_dir, cfg.logging, self.rank, t.max_steps, run_config=asdict(cfg))
        self.garbage.start()  # last: what setup built is frozen out of every later collection

    # ------------------------------------------------------------------ step
    def _batch(self) -> dict:
        try:
            batch = next(self.train_iter)
        except StopIteration:  # a mixture that stops (data/mixture.py): the step is not taken
            reason = getattr(self.train_loader, "exhausted", None) or "the training data ended"
            raise DataExhausted(reason) from None
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in
                ("input_ids", "labels", "position_ids")}

    def train_step(self) -> dict:
        """One optimizer step (or one skipped update: non-finite values or a loss spike).

        Values are host numbers except `grad_norm` and `load`, which stay on the device until logged."""
        cfg, t, pr = self.cfg, self.cfg.trainer, self.progress
        gb = global_batch_at(cfg.schedule, pr.tokens_seen, t.global_batch_size, self.granularity)
        self.step_module.set_grad_accum(gb // self.granularity)
        ga = self.step_module.grad_accum
        coefs = Coefficients(lr=lr_at(cfg.schedule, cfg.optim.lr, pr.step, t.max_steps, pr.tokens_seen,
                                      self.total_tokens),
                             mtp_lambda=mtp_lambda_at(cfg.schedule, pr.tokens_seen, self.total_tokens),
                             bias_gamma=gamma_at(cfg.schedule, pr.tokens_seen, self.total_tokens),
                             fault=self.faults.loss_fault(pr.step + 1))
        res = self.step_module.train_step([self._batch() for _ in range(ga)], coefs)
        v, tokens = res.verdict, ga * self.granularity * t.seq_len
        pr.advance(tokens, res.skipped is not None, v.loss)
        if res.skipped is None and t.spike.action != "off":
            self.spike.accept(v.loss)
        self.garbage.step(pr.step)
        return {"loss": v.loss, "mtp_loss": v.mtp_loss, "balance_loss": v.balance_loss, "lr": coefs.lr,
                "grad_norm": res.grad_norm, "mtp_lambda": coefs.mtp_lambda, "bias_gamma": coefs.bias_gamma,
                "tokens": tokens, "load": res.load, "skipped": res.skipped, "preempt": v.preempt,
                "save_due": v.save_due}

    def _check_skips(self, reason: str | None) -> None:
        pr, t = self.progress, self.cfg.trainer
        if reason and pr.consecutive_skips >= t.max_skipped:
            last = "none" if math.isnan(pr.last_finite_loss) else f"{pr.last_finite_loss:.4f}"
            raise TrainError(f"{pr.consecutive_skips} consecutive updates skipped at step {pr.step} "
                             f"(last: {reason}; last applied loss {last}); trainer.max_skipped={t.max_skipped}")

    # ------------------------------------------------------------------ loop
    def loop_step(self) -> dict:
        """One iteration of the loop: the step, then logging, evaluation, checkpoint and preemption."""
        t, c = self.cfg.trainer, self.cfg.checkpoint
        clock = self._loop_clock()
        out = self.train_step()
        clock.throughput.update(out["tokens"], time.perf_counter())
        self.logger.progress(self.step)
        if out["skipped"] or self.step % t.log_interval == 0 or self.step == t.max_steps:
            self.logger.log(self.step, self._metrics(out, clock), histograms=self._histograms(out["load"]))
        clock.summary["train_loss"] = out["loss"]
        self._check_skips(out["skipped"])
        if out["skipped"] == "loss spike" and t.spike.action == "rollback":
            self.rollback()
        if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.max_steps):
            ev = self.evaluate()
            if ev:
                self.logger.log(self.step, {"kind": "eval", **ev})
                clock.summary.update(ev)
        if out["preempt"]:
            self.save_checkpoint()
            self.checkpointer.flush()  # an asynchronous save is committed before the exit
            raise Preempted(f"preempted by a signal: saved step {self.step} in {self.ckpt_root}")
        if out["save_due"] or (c.interval and self.step % c.interval == 0):
            self.save_checkpoint()
            clock.saved_step = self.step
        return out

    def _save_due(self) -> bool:
        """This rank's wall clock says a checkpoint is due (the guard's all-reduce makes it everyone's)."""
        minutes = self.cfg.checkpoint.interval_minutes
        return bool(minutes) and time.monotonic() - self._last_save >= 60.0 * minutes

    def _loop_clock(self) -> _Clock:
        if self._clock is None:  # a resumed run does not save its starting step again at the end
            self._clock = _Clock(saved_step=self.step if self.resumed_from is not None else -1)
        return self._clock

    def fit(self) -> dict:
        t, c = self.cfg.trainer, self.cfg.checkpoint
        self.model.train()
        clock = self._loop_clock()
        while self.step < t.max_steps:
            try:
                self.loop_step()
            except DataExhausted as exc:
                if self.rank == 0:
                    print(f"stopping at step {self.step} of trainer.max_steps={t.max_steps}: {exc}", flush=True)
                clock.summary["stopped"] = str(exc)
                break
        if c.save_at_end and clock.saved_step != self.step:
            self.save_checkpoint()
        self.checkpointer.flush()  # an asynchronous save in flight is committed before fit returns
        return {**clock.summary, "tokens_per_s": clock.throughput.overall(),
                "elapsed_s": time.perf_counter() - clock.start, "tokens_seen": self.tokens_seen,
                "skipped_updates": self.progress.skipped_total, "gc_collections": self.garbage.collections,
                "gc_s": self.garbage.seconds, "gc_freed": self.garbage.freed}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """val_loss (and val_ppl) on the validation split; with a mixture (the factory returns
        {name: loader}) also val_loss/<name> per source, and val_loss their mean weighted by the
        mixture's weights."""
        t = self.cfg.trainer
        self.model.eval()
        made = self.val_loader_factory()
        loaders = made if isinstance(made, dict) else {"": made}
        means = []
        for loader in loaders.values():
            batches = []
            try:
                for i, batch in enumerate(loader):
                    if i >= t.eval_batches:
                        break
                    batches.append({k: v.to(self.device) for k, v in batch.items()})
            finally:
                loader.close()
            total, n = self.step_module.eval_step(batches)
            means.append((total / n).reshape(1).to(torch.float64) if n else None)
        self.model.train()
        if any(m is None for m in means):
            return {}
        buf = torch.cat(means)
        if self.world_size > 1:
            dist.all_reduce(buf)
            buf /= self.dp
        vals = buf.tolist()
        if not isinstance(made, dict):
            val = vals[0]
            return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        weights = getattr(self.train_loader, "source_weights", None) or {name: 1.0 for name in loaders}
        total_w = sum(weights[name] for name in loaders)
        val = sum(weights[name] * v for name, v in zip(loaders, vals)) / total_w
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
                **{f"val_loss/{name}": v for name, v in zip(loaders, vals)}}

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        path = self.checkpointer.save()
        self._last_save = time.monotonic()
        return path

    def rollback(self) -> None:
        """After a loss spike: reload the newest complete checkpoint, keep the data position (the
        window since that checkpoint, spike included, is skipped)."""
        pr, t = self.progress, self.cfg.trainer
        self.checkpointer.flush()  # a save in flight may be the newest checkpoint
        path = self.checkpointer.latest()
        if path is None:
            if self.rank == 0:
                print(f"warning: loss spike at step {pr.step}: no checkpoint to roll back to; update skipped",
                      file=sys.stderr, flush=True)
            return
        skipped_to = pr.step
        pr.rollbacks_without_progress += 1
        if pr.rollbacks_without_progress >= t.max_skipped:
            raise TrainError(f"{pr.rollbacks_without_progress} rollbacks without getting past step "
                             f"{pr.furthest_step} (loss spikes keep recurring); trainer.max_skipped={t.max_skipped}")
        self.checkpointer.load(path, with_loader=False)
        pr.rollbacks += 1
        self.train_iter.close()
        self.train_iter = iter(self.train_loader)
        if self.rank == 0:
            print(f"loss spike at step {skipped_to}: rolled back to {path.name} (step {pr.step}); "
                  f"its data since then is skipped", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- metrics
    def _metrics(self, out: dict, clock: _Clock) -> dict:
        lc = self.cfg.logging
        tok_s = clock.throughput.rate()
        per_device = tok_s / self.world_size if tok_s else None
        peak = M.peak_tflops(self.device, override=lc.peak_tflops)
        load, norm = out["load"], out["grad_norm"]
        rec = {"kind": "train", "loss": out["loss"], "mtp_loss": out["mtp_loss"], "balance_loss": out["balance_loss"],
               "lr": out["lr"], "grad_norm": float(norm) if norm is not None else None,
               "mtp_lambda": out["mtp_lambda"], "bias_gamma": out["bias_gamma"], "tokens_seen": self.tokens_seen,
               "tokens_per_s": tok_s, "skipped": out["skipped"], "skipped_updates": self.progress.skipped_total,
               "rollbacks": self.progress.rollbacks,
               "tflops_per_device": M.model_tflops(self.flops_per_token, per_device) if per_device else None,
               "mfu": M.mfu(self.flops_per_token, per_device, peak) if per_device else None,
               "time": time.perf_counter() - clock.start}
        per_source = getattr(self.train_loader, "tokens_per_source", None)
        if per_source is not None:  # a mixture: cumulative input tokens per source, from the loader's position
            rec.update({f"tokens/{name}": n for name, n in per_source().items()})
        rec.update(M.memory_stats(self.device))
        if load.numel():
            rec.update(M.expert_load_summary(load))
            biases = torch.stack([m.gate.e_score_correction_bias for m in moe_layers(self.model)])
            rec.update(M.bias_summary(biases))
        rec.update(M.gpu_hours_and_cost(rec["time"], self.world_size, lc.price_per_gpu_hour, self.tokens_seen,
                                        self.total_tokens))
        return rec

    def _histograms(self, load: torch.Tensor) -> dict:
        if not load.numel():
            return {}
        return {f"expert_load/layer_{i}": row.tolist() for i, row in enumerate(load)}

    def close(self) -> None:
        self.garbage.close()
        if getattr(self, "checkpointer", None) is not None:
            self.checkpointer.close()  # a save in flight: this rank's files finish (flush() commits it)
        if getattr(self, "train_loader", None) is not None:
            self.train_loader.close()  # join its reader threads before the interpreter exits
        if getattr(self, "logger", None) is not None:
            self.logger.close()
