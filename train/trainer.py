"""The training loop: one loop for every layout, DeepSpeed as the engine.

Per optimizer step: draw grad_accum micro-batches from the stateful loader, forward through
the DeepSpeed engine (main CE + λ·MTP; the MoE balance loss arrives as an injected
gradient), backward, step; then the expert-bias update from the step's global expert load
(all-reduced over data-parallel ranks so every replica applies the same update), metrics,
evaluation, checkpoint. Pipelines run the same step inside DeepSpeed's `train_batch`.

Right before the update, on every rank, the step guard (`_decide`, installed into DeepSpeed's
optimizer step by parallel/engine.py) makes the step's one all-reduce: losses, a non-finite
gradient flag and the preemption flag. A non-finite value on any rank or a loss spike skips the
update everywhere (state bitwise unchanged); a preemption signal saves and leaves with exit 75.
Checkpoints (docs/checkpoints.md) hold layout-independent model and optimizer state
(parallel/state.py), per-rank RNG and the loader's global position; resume is bit-exact at the
same layout and continues at another.

Global batch semantics: each loader batch is one micro-batch on every rank and an optimizer
step consumes grad_accum of them; the loader slices each global batch over ranks so the set
of sequences in a step is the same for any dp (the loader's exactly-once property, docs/data.md), which
is what makes dp=1 and dp=2 losses equal. With a batch-size ramp the loader runs on the
micro-step grid (micro × dp) and the ramp only changes grad_accum.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
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
from parallel import state as pstate
from parallel.pipeline import BlockPipe, build_pipeline
from parallel.topology import Layout, build_groups

from . import checkpoint_dir as ckpt
from . import metrics as M
from .config import Config
from .faults import Faults, Preemption, SpikeDetector, inject
from .log import MetricsLogger
from .schedule import gamma_at, global_batch_at, lr_at, mtp_lambda_at, param_groups


class TrainError(RuntimeError):
    """A run that must stop (non-finite loss…): one line for the user, non-zero exit."""


class Preempted(RuntimeError):
    """A preemption signal arrived; the run saved a checkpoint and must leave (EXIT_PREEMPTED)."""


class LossModule(nn.Module):
    """What the engine runs: the model's losses combined as main + λ·MTP."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.mtp_lambda = 0.3
        self.fault: str | None = None  # injected fault of this step (tests; train/faults.py)

    def forward(self, input_ids, labels, position_ids=None):
        losses = self.model.losses(input_ids, labels, position_ids)
        total = inject(losses.main + self.mtp_lambda * losses.mtp, self.fault)
        return total, inject(losses.main.detach(), self.fault), losses.mtp.detach()


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


def rng_state() -> dict:
    """This process's RNG states as JSON-able values (checkpoints load them without unpickling)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


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
        self.skipped_total = 0  # updates skipped (non-finite values, loss spikes)
        self.consecutive_skips = 0
        self.rollbacks = 0
        sp = cfg.trainer.spike
        self.spike = SpikeDetector(sp.window, sp.k, sp.min_rise, sp.warmup)
        self.preemption = Preemption()
        self.faults = Faults.from_environ(rank)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        self.resumed_from: Path | None = None
        self._furthest_step = 0  # rollbacks that never get past it are capped by trainer.max_skipped
        self._rollbacks_without_progress = 0
        self._guard: dict | None = None

    # ----------------------------------------------------------------- setup
    def setup(self, train_loader, val_loader_factory) -> None:
        cfg, t = self.cfg, self.cfg.trainer
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
        if ds_cfg["zero_optimization"]["stage"] == 0:  # bf16 runs at least stage 1 (parallel/engine.py)
            ds_engine.record_grad_norm(self.engine, self.groups.ep)
        if self.dp == 1:
            self.engine.enable_backward_allreduce = False
        ds_engine.install_step_guard(self.engine, self._decide)
        self.grad_accum = ga
        self.train_loader = train_loader
        self.val_loader_factory = val_loader_factory
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self._resume()
        self.train_iter = iter(train_loader)
        self.preemption.install()
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
        """One optimizer step (or one skipped update: non-finite values or a loss spike)."""
        cfg, t = self.cfg, self.cfg.trainer
        self._set_batch_size()
        lr = lr_at(cfg.schedule, cfg.optim.lr, self.step, t.max_steps, self.tokens_seen, self.total_tokens)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mtp_lambda = mtp_lambda_at(cfg.schedule, self.tokens_seen, self.total_tokens)
        fault = self.faults.loss_fault(self.step + 1)
        skipped_before = self.engine.skipped_steps
        self._guard = None
        if self.pipelined:
            self._pipeline_step(mtp_lambda, fault)
        else:
            self._engine_step(mtp_lambda, fault)
        if self._guard is None:
            raise TrainError("internal: the optimizer step ran without the step guard (DeepSpeed API change?)")
        sums, reason = self._guard["sums"], self._guard["reason"]
        skipped = self.engine.skipped_steps > skipped_before
        if skipped and reason is None:
            reason = "non-finite gradient norm"
        reduce = (lambda c: dist.all_reduce(c, group=self.groups.dp)) if self.dp > 1 else None
        gamma = gamma_at(cfg.schedule, self.tokens_seen, self.total_tokens)
        # A skipped update moves no expert bias either (the counts are still reduced and reset).
        load = update_expert_bias(self.model, 0.0 if skipped else gamma, reduce_counts=reduce)
        tokens = self.grad_accum * self.granularity * t.seq_len
        self.step += 1
        self.tokens_seen += tokens
        if skipped:
            self.skipped_total += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
            self.last_finite_loss = sums[0]
            if self.step > self._furthest_step:
                self._furthest_step, self._rollbacks_without_progress = self.step, 0
            if cfg.trainer.spike.action != "off":
                self.spike.accept(sums[0])
        grad_norm = None if skipped else self.engine.get_global_grad_norm()
        out = {"loss": sums[0], "mtp_loss": sums[1], "balance_loss": sums[2], "lr": lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "mtp_lambda": mtp_lambda, "bias_gamma": gamma, "tokens": tokens, "load": load,
               "skipped": reason, "preempt": self._guard["preempt"]}
        return out

    def _check_skips(self, reason: str | None) -> None:
        t = self.cfg.trainer
        if reason and self.consecutive_skips >= t.max_skipped:
            last = "none" if math.isnan(self.last_finite_loss) else f"{self.last_finite_loss:.4f}"
            raise TrainError(f"{self.consecutive_skips} consecutive updates skipped at step {self.step} "
                             f"(last: {reason}; last applied loss {last}); trainer.max_skipped={t.max_skipped}")

    def _local_loss_sums(self) -> list[float]:
        if self.pipelined:
            return (self.pipe_loss.peek() / self.grad_accum).tolist()  # zeros off the last stage
        return [self._main_sum / self.grad_accum, self._mtp_sum / self.grad_accum]

    def _decide(self) -> bool:
        """The step guard (parallel/engine.py), on every rank right before the update: skip it?

        One all-reduce over all ranks carries the step's losses, a non-finite-gradient flag and
        the preemption flag; the decision is computed from the reduced values, so it is the same
        on every rank."""
        main, mtp = self._local_loss_sums()
        flags = [0.0 if ds_engine.local_grads_finite(self.engine) else 1.0, 1.0 if self.preemption.requested else 0.0]
        buf = torch.tensor([main, mtp, self._balance_loss() / self.grad_accum] + flags, dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(buf)
        sums = (buf[:3] / self.dp).tolist()
        reason = None
        if not (math.isfinite(sums[0]) and math.isfinite(sums[1])):
            reason = "non-finite loss"
        elif buf[3] > 0:
            reason = "non-finite gradient"
        elif self.cfg.trainer.spike.action != "off" and self.spike.is_spike(sums[0]):
            reason = "loss spike"
        self._guard = {"sums": sums, "reason": reason, "preempt": bool(buf[4] > 0)}
        return reason is not None

    def _engine_step(self, mtp_lambda: float, fault: str | None) -> None:
        """Non-pipeline path: engine(batch), engine.backward, engine.step per micro-batch."""
        self.module.mtp_lambda = mtp_lambda
        self.module.fault = fault
        self._main_sum, self._mtp_sum = 0.0, 0.0
        for _ in range(self.grad_accum):
            batch = self._batch()
            with self._fp8_autocast():
                total, main, mtp = self.engine(batch["input_ids"], batch["labels"], batch.get("position_ids"))
            self._main_sum += main.item()
            self._mtp_sum += mtp.item()
            self.engine.backward(total)
            self.engine.step()  # the last one runs the step guard, then the update
        self.module.fault = None

    def _pipe_batches(self, n: int):
        """n micro-batches as DeepSpeed's pipeline wants them: ((input_ids, labels[, position_ids]), labels).

        Every stage draws them (middle stages discard theirs) so the loader position is the same
        on every rank."""
        return [_pipe_item(self._batch()) for _ in range(n)]

    def _pipeline_step(self, mtp_lambda: float, fault: str | None) -> None:
        """Pipeline path: DeepSpeed runs the 1F1B schedule, reduction, guard and step in train_batch."""
        self.pipe_loss.mtp_lambda = mtp_lambda
        self.pipe_loss.fault = (lambda out: inject(out, fault)) if fault else None
        with self._fp8_autocast():  # DeepSpeed runs forwards and backwards inside one call
            self.engine.train_batch(data_iter=iter(self._pipe_batches(self.grad_accum)))
        self.pipe_loss.take()
        self.pipe_loss.fault = None

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
        t, c = self.cfg.trainer, self.cfg.checkpoint
        self.model.train()
        throughput = M.Throughput()
        start = time.perf_counter()
        summary = {}
        saved_step = self.step if self.resumed_from is not None else -1
        while self.step < t.max_steps:
            out = self.train_step()
            throughput.update(out["tokens"], time.perf_counter())
            self.logger.progress(self.step)
            if out["skipped"] or self.step % t.log_interval == 0 or self.step == t.max_steps:
                self.logger.log(self.step, self._metrics(out, throughput, time.perf_counter() - start),
                                histograms=self._histograms(out["load"]))
            summary["train_loss"] = out["loss"]
            self._check_skips(out["skipped"])
            if out["skipped"] == "loss spike" and t.spike.action == "rollback":
                self.rollback()
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.max_steps):
                ev = self.evaluate()
                if ev:
                    self.logger.log(self.step, {"kind": "eval", **ev})
                    summary.update(ev)
            if out["preempt"]:
                self.save_checkpoint()
                raise Preempted(f"preempted by a signal: saved step {self.step} in {self.ckpt_root}")
            if c.interval and self.step % c.interval == 0:
                self.save_checkpoint()
                saved_step = self.step
        if c.save_at_end and saved_step != self.step:
            self.save_checkpoint()
        summary["tokens_per_s"] = throughput.overall()
        summary["elapsed_s"] = time.perf_counter() - start
        summary["tokens_seen"] = self.tokens_seen
        summary["skipped_updates"] = self.skipped_total
        return summary

    # ------------------------------------------------------------ checkpoints
    def _gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _owners(self) -> tuple[bool, bool]:
        """(dense owner, expert owner): who writes replicated tensors when there is no ZeRO."""
        dp_rank = self.layout.dp_rank_of(self.rank)
        return dp_rank == 0, self.layout.edp_ranks(self.rank)[0] == self.rank

    def trainer_state(self) -> dict:
        from . import provenance

        p = self.cfg.parallel
        return {"format_version": ckpt.FORMAT_VERSION, "step": self.step, "tokens_seen": self.tokens_seen,
                "adam_step": pstate.adam_step(self.optimizer), "engine_global_steps": self.engine.global_steps,
                "engine_skipped_steps": self.engine.skipped_steps, "skipped_total": self.skipped_total,
                "consecutive_skips": self.consecutive_skips, "rollbacks": self.rollbacks,
                "last_finite_loss": self.last_finite_loss, "spike": self.spike.state_dict(),
                "loader": self.train_loader.state_dict(),
                "layout": {"world": self.world_size, "pp": p.pp, "dp": self.dp, "ep": p.ep},
                "model": asdict(self.cfg.model), "config": asdict(self.cfg), "code": provenance.git_state(),
                "time": time.time()}

    def save_checkpoint(self) -> Path:
        """Every rank writes its files; rank 0 commits (train/checkpoint_dir.py). Returns the final path."""
        root, name = self.ckpt_root, ckpt.step_dir_name(self.step)
        tmp, final = root / f"{ckpt.TMP_PREFIX}{name}", root / name
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(root)
            tmp.mkdir()
        self._barrier()
        owner, expert_owner = self._owners()
        frags, shapes = pstate.fragments(self.module, self.optimizer, self.cfg.model.n_routed_experts,
                                         owner, expert_owner)
        state_file = tmp / f"state-{self.rank:05d}.safetensors"
        rows = pstate.write_rank_file(state_file, frags, crash=lambda: self.faults.crash_point("writing"))
        rng_file = tmp / f"rank-{self.rank:05d}.json"
        ckpt.write_durable(rng_file, json.dumps(rng_state()).encode())
        records = dict(ckpt.file_record(f) for f in (state_file, rng_file))
        gathered = self._gather((state_file.name, rows, shapes, records))
        self.faults.crash_point("shards")
        if self.rank == 0:
            all_shapes, all_records, files = {}, {}, {}
            for fname, r, sh, rec in gathered:
                all_shapes.update(sh)
                all_records.update(rec)
                files[fname] = r
            pstate.write_index(tmp / pstate.INDEX, all_shapes, files)
            ckpt.write_durable(tmp / "trainer.json", json.dumps(self.trainer_state(), indent=1).encode())
            all_records.update(dict(ckpt.file_record(tmp / n) for n in (pstate.INDEX, "trainer.json")))
            ckpt.write_manifest(tmp, all_records, self.step)
            self.faults.crash_point("manifest")
            ckpt.commit(tmp, final)
            self.faults.crash_point("renamed")
            ckpt.update_pointer(root, name)
            ckpt.retain(root, self.cfg.checkpoint.keep)
        self._barrier()  # nobody reads or rolls back to it before it is in place
        return final

    def _find_checkpoint(self) -> Path | None:
        """The checkpoint to start from: resume=auto → newest verified in dir; <path> → that one."""
        how = self.cfg.checkpoint.resume
        if how == "never":
            return None
        gather = self._gather if self.world_size > 1 else None
        if how == "auto":
            return ckpt.select(self.ckpt_root, self.rank, self.world_size, gather)
        path = Path(how)
        if not path.is_dir():
            raise ckpt.CheckpointError(f"checkpoint.resume={how}: no such checkpoint directory")
        ckpt.verify(path, self.rank, self.world_size, gather)
        return path

    def _resume(self) -> None:
        path = self._find_checkpoint()
        if path is None:
            return
        state = self._load_state(path)
        self.train_loader.load_state_dict(state["loader"])
        self.resumed_from = path
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _load_state(self, path: Path) -> dict:
        """Weights, optimizer state, RNG and counters of `path` into this (possibly other) layout."""
        state = ckpt.read_trainer_state(path)
        diff = ckpt.first_difference(state.get("model", {}), asdict(self.cfg.model))
        if diff:
            raise ConfigError(f"checkpoint {path}: incompatible model: model.{diff}")
        reader = pstate.Reader(path)
        pstate.restore(reader, self.module, self.optimizer, self.cfg.model.n_routed_experts, state["adam_step"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_total, self.consecutive_skips = int(state["skipped_total"]), int(state["consecutive_skips"])
        self.rollbacks = int(state.get("rollbacks", 0))
        self.last_finite_loss = float(state.get("last_finite_loss", float("nan")))
        self.spike.load_state_dict(state.get("spike", {}))
        self.engine.global_steps = int(state["engine_global_steps"])
        self.engine.skipped_steps = int(state["engine_skipped_steps"])
        rng_file = path / f"rank-{self.rank:05d}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
        else:  # more ranks than the saving layout had: a fresh, rank-distinct seed
            seed_everything(self.cfg.trainer.seed + 1000003 * (self.rank + 1) + self.step)
        return state

    def rollback(self) -> None:
        """After a loss spike: reload the newest complete checkpoint, keep the data position (the
        window since that checkpoint, spike included, is skipped)."""
        gather = self._gather if self.world_size > 1 else None
        path = ckpt.select(self.ckpt_root, self.rank, self.world_size, gather)
        if path is None:
            if self.rank == 0:
                print(f"warning: loss spike at step {self.step}: no checkpoint to roll back to; update skipped",
                      file=sys.stderr, flush=True)
            return
        skipped_to = self.step
        self._rollbacks_without_progress += 1
        if self._rollbacks_without_progress >= self.cfg.trainer.max_skipped:
            raise TrainError(f"{self._rollbacks_without_progress} rollbacks without getting past step "
                             f"{self._furthest_step} (loss spikes keep recurring); trainer.max_skipped="
                             f"{self.cfg.trainer.max_skipped}")
        self._load_state(path)
        self.rollbacks += 1
        self.train_iter.close()
        self.train_iter = iter(self.train_loader)
        if self.rank == 0:
            print(f"loss spike at step {skipped_to}: rolled back to {path.name} (step {self.step}); "
                  f"its data since then is skipped", file=sys.stderr, flush=True)

    def _metrics(self, out: dict, throughput, elapsed: float) -> dict:
        lc = self.cfg.logging
        tok_s = throughput.rate()
        per_device = tok_s / self.world_size if tok_s else None
        peak = M.peak_tflops(self.device, override=lc.peak_tflops)
        load = out["load"]
        rec = {"kind": "train", "loss": out["loss"], "mtp_loss": out["mtp_loss"], "balance_loss": out["balance_loss"],
               "lr": out["lr"], "grad_norm": out["grad_norm"], "mtp_lambda": out["mtp_lambda"],
               "bias_gamma": out["bias_gamma"], "tokens_seen": self.tokens_seen, "tokens_per_s": tok_s,
               "skipped": out["skipped"], "skipped_updates": self.skipped_total, "rollbacks": self.rollbacks,
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
