"""The training loop: one loop for every layout, DeepSpeed as the engine.

Per optimizer step: draw grad_accum micro-batches from the stateful loader, forward through
the DeepSpeed engine (main CE + λ·MTP; the MoE balance loss arrives as an injected
gradient), backward, step; then the expert-bias update from the step's global expert load
(all-reduced over data-parallel ranks so every replica applies the same update), metrics,
evaluation. The pipeline path (parallel issue) slots in behind `_forward_backward`.

Global batch semantics: each loader batch is one micro-batch on every rank and an optimizer
step consumes grad_accum of them; the loader slices each global batch over ranks so the set
of sequences in a step is the same for any dp (the data issue's exactly-once property), which
is what makes dp=1 and dp=2 losses equal. With a batch-size ramp the loader runs on the
micro-step grid (micro × dp) and the ramp only changes grad_accum.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model import Transformer, flops_per_token, moe_layers, update_expert_bias
from model.config import ConfigError
from model.linear import precision
from parallel import engine as ds_engine
from parallel.build import build_model
from parallel.expert import mark_for_deepspeed
from parallel.pipeline import BlockPipe, build_pipeline
from parallel.topology import Layout, build_groups

from . import metrics as M
from .config import Config
from .log import MetricsLogger
from .schedule import gamma_at, global_batch_at, lr_at, mtp_lambda_at, param_groups


class TrainError(RuntimeError):
    """A run that must stop (non-finite loss…): one line for the user, non-zero exit."""


class LossModule(nn.Module):
    """What the engine runs: the model's losses combined as main + λ·MTP."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.mtp_lambda = 0.3

    def forward(self, input_ids, labels, position_ids=None):
        losses = self.model.losses(input_ids, labels, position_ids)
        return losses.main + self.mtp_lambda * losses.mtp, losses.main.detach(), losses.mtp.detach()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda: no CUDA device is visible")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _pipe_item(b: dict) -> tuple:
    """A batch as DeepSpeed's pipeline wants it: ((input_ids, labels[, position_ids]), labels)."""
    return ((b["input_ids"], b["labels"]) + ((b["position_ids"],) if "position_ids" in b else ()), b["labels"])


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, world_size: int, rank: int):
        self.cfg = cfg
        self.run_dir = run_dir
        self.rank = rank
        self.world_size = world_size
        self.dp = world_size // cfg.parallel.pp
        self.device = resolve_device(cfg.trainer.device)
        self.dtype = resolve_dtype(cfg.trainer.dtype, self.device)
        t = cfg.trainer
        self.granularity = t.micro_batch_size * self.dp
        self.tokens_per_step_final = t.global_batch_size * t.seq_len
        self.total_tokens = t.max_steps * self.tokens_per_step_final
        self.step = 0
        self.tokens_seen = 0
        self.last_finite_loss = float("nan")

    # ----------------------------------------------------------------- setup
    def setup(self, train_loader, val_loader_factory) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(t.seed)
        p = cfg.parallel
        self.layout = Layout(self.world_size, p.pp, p.ep)
        self.groups = build_groups(self.layout, self.rank)
        self.pipelined = p.pp > 1
        with precision(cfg.fp8.precision()):  # the Linear factory builds FP8 modules when asked
            blocks = self._build_model()
        for moe in moe_layers(self.model):
            moe.balance_alpha = t.balance_alpha
        if t.compile:
            for block in blocks:
                block.compile()
        groups = param_groups(self.model, cfg.optim.weight_decay)
        ga = t.global_batch_size // self.granularity
        # With one data-parallel rank there is nothing to shard or reduce: ZeRO's flat buffers
        # and the gradient all-reduce only copy (measured: ~20% of a CPU step, bench/trainer.py).
        zero_stage = p.zero_stage if self.dp > 1 else 0
        ds_cfg = ds_engine.deepspeed_config(
            micro_batch_size=t.micro_batch_size, grad_accum=ga, zero_stage=zero_stage,
            grad_clip=cfg.optim.grad_clip, bf16=self.dtype == torch.bfloat16, lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
            device_type=self.device.type)
        self.engine, self.optimizer = ds_engine.initialize(self.module, groups, ds_cfg)
        if zero_stage == 0:
            ds_engine.record_grad_norm(self.engine, self.groups.ep)
        if self.dp == 1:
            self.engine.enable_backward_allreduce = False
        self.grad_accum = ga
        self.train_loader = train_loader
        self.train_iter = iter(train_loader)
        self.val_loader_factory = val_loader_factory
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.logger = MetricsLogger(self.run_dir, cfg.logging, self.rank, t.max_steps, run_config=asdict(cfg))

    def _build_model(self) -> list[nn.Module]:
        """This rank's share of the model (pipeline stage or whole model, experts sharded); its blocks."""
        cfg, t, p = self.cfg, self.cfg.trainer, self.cfg.parallel
        if self.pipelined:
            ep = (self.groups.ep, p.ep, self.groups.ep_rank) if p.ep > 1 else None
            self.module, self.pipe_loss = build_pipeline(
                cfg.model, pp=p.pp, seed=t.seed, partition=p.partition, layer_costs_override=p.layer_costs,
                seq_len=t.seq_len, activation_checkpoint_interval=p.activation_checkpoint_interval,
                expert_parallel=ep)
            self.model = self.module
            if p.ep > 1:
                mark_for_deepspeed(self.model, p.ep, self.groups.ep_group_name)
            return [m.block for m in self.module.modules() if isinstance(m, BlockPipe)]
        self.model = build_model(cfg.model, seed=t.seed, device=self.device, groups=self.groups)
        self.module = LossModule(self.model)
        return list(self.model.layers.values())

    def _fp8_autocast(self):
        """Transformer Engine's FP8 context around forwards (other backends need none)."""
        if self.cfg.fp8.backend != "te":
            return contextlib.nullcontext()
        from model.fp8 import te

        return te.autocast(self.cfg.fp8.resolved_recipe(), group=self.groups.dp)

    # ------------------------------------------------------------------ loop
    def _all_reduce_mean(self, values: list[float]) -> list[float]:
        buf = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(buf)
            buf /= self.dp
        return buf.tolist()

    def _set_batch_size(self) -> None:
        t = self.cfg.trainer
        gb = global_batch_at(self.cfg.schedule, self.tokens_seen, t.global_batch_size, self.granularity)
        ga = gb // self.granularity
        if ga != self.grad_accum:
            self.engine.set_train_batch_size(gb)
            self.grad_accum = ga
        for moe in moe_layers(self.model):
            moe.balance_grad_scale = 1.0 / ga  # as DeepSpeed scales the main loss

    def _batch(self) -> dict:
        batch = next(self.train_iter)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in
                ("input_ids", "labels", "position_ids")}

    def _balance_loss(self) -> float:
        """Sum over this rank's MoE layers of the balance losses since the last call."""
        total = 0.0
        for m in moe_layers(self.model):
            if m.balance_loss_sum is not None:
                total += float(m.balance_loss_sum)
            m.balance_loss_sum = None
        return total

    def train_step(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        self._set_batch_size()
        lr = lr_at(cfg.schedule, cfg.optim.lr, self.step, t.max_steps, self.tokens_seen, self.total_tokens)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mtp_lambda = mtp_lambda_at(cfg.schedule, self.tokens_seen, self.total_tokens)
        if self.pipelined:
            sums = self._pipeline_step(mtp_lambda)
        else:
            sums = self._engine_step(mtp_lambda)
        reduce = (lambda c: dist.all_reduce(c, group=self.groups.dp)) if self.dp > 1 else None
        gamma = gamma_at(cfg.schedule, self.tokens_seen, self.total_tokens)
        load = update_expert_bias(self.model, gamma, reduce_counts=reduce)
        tokens = self.grad_accum * self.granularity * t.seq_len
        self.step += 1
        self.tokens_seen += tokens
        self.last_finite_loss = sums[0]
        grad_norm = self.engine.get_global_grad_norm()
        return {"loss": sums[0], "mtp_loss": sums[1], "balance_loss": sums[2], "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "mtp_lambda": mtp_lambda, "bias_gamma": gamma, "tokens": tokens, "load": load}

    def _check_finite(self, sums: list[float]) -> None:
        if not math.isfinite(sums[0]) or not math.isfinite(sums[1]):
            raise TrainError(f"non-finite loss at step {self.step + 1} (last finite loss {self.last_finite_loss:.4f})")

    def _engine_step(self, mtp_lambda: float) -> list[float]:
        """Non-pipeline path: engine(batch), engine.backward, engine.step per micro-batch."""
        self.module.mtp_lambda = mtp_lambda
        main_sum, mtp_sum = 0.0, 0.0
        for micro in range(self.grad_accum):
            batch = self._batch()
            with self._fp8_autocast():
                total, main, mtp = self.engine(batch["input_ids"], batch["labels"], batch.get("position_ids"))
            main_sum += main.item()
            mtp_sum += mtp.item()
            if micro == self.grad_accum - 1:
                # Agree on the step's loss before the update is applied: a non-finite loss stops
                # every rank here, with the parameters of the last good step.
                sums = self._all_reduce_mean([main_sum / self.grad_accum, mtp_sum / self.grad_accum,
                                              self._balance_loss() / self.grad_accum])
                self._check_finite(sums)
            self.engine.backward(total)
            self.engine.step()
        return sums

    def _pipe_batches(self, n: int):
        """n micro-batches as DeepSpeed's pipeline wants them: ((input_ids, labels[, position_ids]), labels).

        Every stage draws them (middle stages discard theirs) so the loader position is the same
        on every rank."""
        return [_pipe_item(self._batch()) for _ in range(n)]

    def _pipeline_step(self, mtp_lambda: float) -> list[float]:
        """Pipeline path: DeepSpeed runs the 1F1B schedule, reduction and step in train_batch.

        The non-finite check comes after the step here (train_batch is one call); the run still
        stops at that step with the last finite loss."""
        self.pipe_loss.mtp_lambda = mtp_lambda
        with self._fp8_autocast():  # DeepSpeed runs forwards and backwards inside one call
            self.engine.train_batch(data_iter=iter(self._pipe_batches(self.grad_accum)))
        main, mtp = (self.pipe_loss.take() / self.grad_accum).tolist()  # zeros off the last stage
        sums = self._all_reduce_mean([main, mtp, self._balance_loss() / self.grad_accum])
        self._check_finite(sums)
        return sums

    @torch.no_grad()
    def evaluate(self) -> dict:
        t = self.cfg.trainer
        self.model.eval()
        loader = self.val_loader_factory()
        total, n = 0.0, 0
        try:
            batches = []
            for i, batch in enumerate(loader):
                if i >= t.eval_batches:
                    break
                batches.append({k: v.to(self.device) for k, v in batch.items()})
        finally:
            loader.close()
        if self.pipelined and batches:
            pipe = [_pipe_item(b) for b in batches]
            self.pipe_loss.take()
            with self._fp8_autocast():
                self.engine.eval_batch(iter(pipe), num_micro_batches=len(pipe))
            total, n = float(self.pipe_loss.take()[0]), len(pipe)
        else:
            for b in batches:
                with self._fp8_autocast():
                    total += self.model.losses(b["input_ids"], b["labels"], b.get("position_ids")).main.item()
                n += 1
        self.model.train()
        if n == 0:
            return {}
        (val,) = self._all_reduce_mean([total / n])
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def fit(self) -> dict:
        t = self.cfg.trainer
        self.model.train()
        throughput = M.Throughput()
        start = time.perf_counter()
        summary = {}
        while self.step < t.max_steps:
            out = self.train_step()
            throughput.update(out["tokens"], time.perf_counter())
            self.logger.progress(self.step)
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                self.logger.log(self.step, self._metrics(out, throughput, time.perf_counter() - start),
                                histograms=self._histograms(out["load"]))
            summary["train_loss"] = out["loss"]
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.max_steps):
                ev = self.evaluate()
                if ev:
                    self.logger.log(self.step, {"kind": "eval", **ev})
                    summary.update(ev)
        summary["tokens_per_s"] = throughput.overall()
        summary["elapsed_s"] = time.perf_counter() - start
        summary["tokens_seen"] = self.tokens_seen
        return summary

    def _metrics(self, out: dict, throughput, elapsed: float) -> dict:
        lc = self.cfg.logging
        tok_s = throughput.rate()
        per_device = tok_s / self.world_size if tok_s else None
        peak = M.peak_tflops(self.device, override=lc.peak_tflops)
        load = out["load"]
        rec = {"kind": "train", "loss": out["loss"], "mtp_loss": out["mtp_loss"], "balance_loss": out["balance_loss"],
               "lr": out["lr"], "grad_norm": out["grad_norm"], "mtp_lambda": out["mtp_lambda"],
               "bias_gamma": out["bias_gamma"], "tokens_seen": self.tokens_seen, "tokens_per_s": tok_s,
               "tflops_per_device": M.model_tflops(self.flops_per_token, per_device) if per_device else None,
               "mfu": M.mfu(self.flops_per_token, per_device, peak) if per_device else None,
               "time": elapsed}
        rec.update(M.memory_stats(self.device))
        if load.numel():
            rec.update(M.expert_load_summary(load))
            biases = torch.stack([m.gate.e_score_correction_bias for m in moe_layers(self.model)])
            rec.update(M.bias_summary(biases))
        rec.update(M.gpu_hours_and_cost(elapsed, self.world_size, lc.price_per_gpu_hour, self.tokens_seen,
                                        self.total_tokens))
        return rec

    def _histograms(self, load: torch.Tensor) -> dict:
        if not load.numel():
            return {}
        return {f"expert_load/layer_{i}": row.tolist() for i, row in enumerate(load)}

    def close(self) -> None:
        if getattr(self, "train_loader", None) is not None:
            self.train_loader.close()  # join its reader threads before the interpreter exits
        self.logger.close()
