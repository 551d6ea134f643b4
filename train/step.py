"""Step modules: one optimizer step of one execution path, behind one small interface.

    step_module.build()                                  model, DeepSpeed engine, optimizer, hooks
    step_module.train_step(batches, coefs) -> StepResult one optimizer step (or one skipped update)
    step_module.eval_step(batches) -> (Σ main loss, n)   validation forwards
    step_module.state_dict() / load_state_dict(...)      engine counters + weights and optimizer state

`EngineStep` runs DeepSpeed's engine: forward, backward, step per micro-batch (the last step is
the update). `PipelineStep` runs DeepSpeed's pipeline engine: one `train_batch` holds the 1F1B
schedule, the reductions and the update. In both, `model` is this rank's nn.Module holding the
parameters (the Transformer, or this stage's PipelineModule), `engine` is DeepSpeed's engine and
`loss` is the object that combines main + λ·MTP (LossModule, or the pipeline's loss function).

The step guard runs inside DeepSpeed's optimizer step on every rank (parallel/ds_hooks.py),
right before the update, and returns a `StepVerdict`: one all-reduce carries the step's losses,
the non-finite-gradient flag and the preemption flag, and its `.tolist()` is the step's only
host read. A non-finite value on any rank or a loss spike skips the update everywhere
(parameters and optimizer state bitwise unchanged). Losses accumulate as device tensors; the
gradient norm stays a tensor until the loop logs it. Followed OLMo-core's Trainer/TrainModule
split (the loop knows no execution path) and torchtitan's rule of reading values on the host
only when logging; docs/trainer.md draws the step.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model import Transformer, moe_layers, update_expert_bias
from model.linear import precision
from parallel import ds_hooks
from parallel import engine as ds_engine
from parallel import state as pstate
from parallel.build import build_model
from parallel.expert import configure_dispatch, mark_for_deepspeed, ranks_per_node
from parallel.pipeline import BlockPipe, build_pipeline
from parallel.topology import Groups

from .config import Config
from .faults import inject
from .schedule import param_groups


class TrainError(RuntimeError):
    """A run that must stop (non-finite loss…): one line for the user, non-zero exit."""


@dataclass(frozen=True)
class StepVerdict:
    """The step guard's decision, the same on every rank: the step's losses (means over data-parallel
    replicas and micro-batches), why the update is skipped (None: it is applied) and whether a
    preemption signal reached any rank, and whether a wall-time checkpoint is due on any rank."""

    loss: float
    mtp_loss: float
    balance_loss: float
    reason: str | None
    preempt: bool
    save_due: bool = False

    @property
    def skip(self) -> bool:
        return self.reason is not None


@dataclass
class StepResult:
    verdict: StepVerdict
    skipped: str | None  # why no update happened: the verdict's reason, or DeepSpeed's non-finite norm
    grad_norm: torch.Tensor | float | None  # a device value: read it only when logging
    load: torch.Tensor  # (MoE layers, experts) global token counts of the step, on the device


@dataclass(frozen=True)
class Coefficients:
    """The schedule's values for one step."""

    lr: float
    mtp_lambda: float
    bias_gamma: float
    fault: str | None = None  # injected loss fault of this step (tests; train/faults.py)


class LossModule(nn.Module):
    """What the (non-pipeline) engine runs: the model's losses combined as main + λ·MTP."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.mtp_lambda = 0.3
        self.fault: str | None = None

    def forward(self, input_ids, labels, position_ids=None):
        losses = self.model.losses(input_ids, labels, position_ids)
        total = inject(losses.main + self.mtp_lambda * losses.mtp, self.fault)
        return total, inject(losses.main.detach(), self.fault), losses.mtp.detach()


class StepModule:
    """This rank's model, DeepSpeed engine and optimizer step (one subclass per execution path)."""

    def __init__(self, cfg: Config, groups: Groups, device: torch.device, dtype: torch.dtype, *,
                 is_spike: Callable[[float], bool], preempt_requested: Callable[[], bool],
                 save_due: Callable[[], bool] = lambda: False, before_update: Callable[[], None] = lambda: None):
        self.cfg, self.groups, self.layout = cfg, groups, groups.layout
        self.device, self.dtype = device, dtype
        self.is_spike, self.preempt_requested, self.save_due = is_spike, preempt_requested, save_due
        self.before_update = before_update  # e.g. an asynchronous checkpoint's snapshot still copying
        self.grad_accum = 1

    # ------------------------------------------------------------------ build
    def _build_model(self) -> list[nn.Module]:
        """Set model and loss; return the transformer blocks (compiled when asked)."""
        raise NotImplementedError

    def _configure_dispatch(self) -> None:
        """The expert dispatch options (parallel.ep_ranks_per_node, moe_overlap, moe_chunks, fp8_dispatch)."""
        p = self.cfg.parallel
        if p.ep == 1:
            return
        per_node = p.ep_ranks_per_node or ranks_per_node(
            self.layout.ep_ranks(self.groups.rank), int(os.environ.get("LOCAL_WORLD_SIZE", self.layout.world)))
        configure_dispatch(self.model, per_node=per_node, overlap=p.moe_overlap, chunks=p.moe_chunks,
                           fp8=p.fp8_dispatch)

    def build(self, grad_accum: int) -> None:
        cfg, t, layout = self.cfg, self.cfg.trainer, self.layout
        with precision(cfg.fp8.precision()):  # the Linear factory builds FP8 modules when asked
            blocks = self._build_model()
        for moe in moe_layers(self.model):
            moe.balance_alpha = t.balance_alpha
        self._configure_dispatch()
        if t.compile:
            for block in blocks:
                block.compile()
        ds_cfg = ds_engine.deepspeed_config(
            micro_batch_size=t.micro_batch_size, grad_accum=grad_accum,
            zero_stage=layout.zero_stage(cfg.parallel.zero_stage, self.dtype == torch.bfloat16),
            grad_clip=cfg.optim.grad_clip, bf16=self.dtype == torch.bfloat16, lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
            device_type=self.device.type, extra=cfg.parallel.deepspeed)
        groups = param_groups(self.model, cfg.optim.weight_decay)
        self.engine, self.optimizer = ds_engine.initialize(self._engine_module(), groups, ds_cfg,
                                                           t.startup_timeout_s)
        self.grad_accum = grad_accum
        self.hooks = ds_hooks.Hooks(self.engine)
        if ds_cfg["zero_optimization"]["stage"] == 0:
            self.hooks.install_grad_norm(self.groups.ep)
        if layout.dp == 1:  # nothing to reduce over data-parallel replicas
            self.engine.enable_backward_allreduce = False
        self.hooks.install_step_guard(self._decide)

    def _engine_module(self) -> nn.Module:
        return self.model

    def fp8_autocast(self):
        """Transformer Engine's FP8 context around forwards (other backends need none)."""
        if self.cfg.fp8.backend != "te":
            return contextlib.nullcontext()
        from model.fp8 import te

        return te.autocast(self.cfg.fp8.resolved_recipe(), group=self.groups.dp)

    # ------------------------------------------------------------------ step
    def set_grad_accum(self, grad_accum: int) -> None:
        """Micro-batches per optimizer step (a batch-size ramp changes it between steps)."""
        if grad_accum != self.grad_accum:
            self.engine.set_train_batch_size(grad_accum * self.cfg.trainer.micro_batch_size * self.layout.dp)
            self.grad_accum = grad_accum
        for moe in moe_layers(self.model):
            moe.balance_grad_scale = 1.0 / grad_accum  # as DeepSpeed scales the main loss

    def train_step(self, batches: list[dict], coefs: Coefficients) -> StepResult:
        """One optimizer step over `batches` (grad_accum micro-batches), guarded; then the expert-bias update."""
        if len(batches) != self.grad_accum:
            raise ValueError(f"{len(batches)} micro-batches for grad_accum={self.grad_accum}")
        for group in self.optimizer.param_groups:
            group["lr"] = coefs.lr
        skipped_before = self.engine.skipped_steps
        self._run(batches, coefs)
        try:
            verdict = self.hooks.take_verdict()
        except ds_hooks.HookBypassed as exc:
            raise TrainError(str(exc)) from None
        skipped = self.engine.skipped_steps > skipped_before
        reason = verdict.reason or ("non-finite gradient norm" if skipped else None)
        reduce = (lambda c: dist.all_reduce(c, group=self.groups.dp)) if self.layout.dp > 1 else None
        # A skipped update moves no expert bias either (the counts are still reduced and reset).
        load = update_expert_bias(self.model, 0.0 if skipped else coefs.bias_gamma, reduce_counts=reduce)
        return StepResult(verdict, reason, None if skipped else self.engine.get_global_grad_norm(), load)

    def _run(self, batches: list[dict], coefs: Coefficients) -> None:
        raise NotImplementedError

    def _local_means(self) -> torch.Tensor:
        """(main, mtp) averaged over this step's micro-batches on this rank, float64 on the device."""
        raise NotImplementedError

    def _balance_loss(self) -> torch.Tensor:
        """Σ over this rank's MoE layers of the balance losses since the last call (float64, device)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in moe_layers(self.model):
            if m.balance_loss_sum is not None:
                total = total + m.balance_loss_sum.double()
            m.balance_loss_sum = None
        return total

    def _decide(self) -> StepVerdict:
        """The step guard, on every rank right before the update (parallel/ds_hooks.py).

        One all-reduce over all ranks carries the step's losses, a non-finite-gradient flag, the
        preemption flag and the wall-time checkpoint flag; the decision is computed from the reduced values, so it is the same
        on every rank. Its `.tolist()` is the step's one host synchronisation."""
        self.before_update()  # nothing may change the weights or moments before this returns
        ga = self.grad_accum
        host = torch.tensor([float(self.preempt_requested()), float(self.save_due())], dtype=torch.float64)
        local = self._local_means()
        buf = torch.cat([torch.stack([local[0], local[1], self._balance_loss() / ga,
                                      ds_hooks.local_grads_nonfinite(self.engine).to(self.device)]),
                         host.to(self.device)])
        if dist.get_world_size() > 1:
            dist.all_reduce(buf)
        main, mtp, balance, nonfinite, preempted, save_due = buf.tolist()
        dp = self.layout.dp
        main, mtp, balance = main / dp, mtp / dp, balance / dp
        reason = None
        if not (math.isfinite(main) and math.isfinite(mtp)):
            reason = "non-finite loss"
        elif nonfinite > 0:
            reason = "non-finite gradient"
        elif self.is_spike(main):
            reason = "loss spike"
        return StepVerdict(main, mtp, balance, reason, preempted > 0, save_due > 0)

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def eval_step(self, batches: list[dict]) -> tuple[torch.Tensor, int]:
        """Σ over `batches` of the main loss on this rank (zeros off a pipeline's last stage), and the count."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The engine's counters (the weights and optimizer state go through `fragments`)."""
        return {"adam_step": pstate.adam_step(self.optimizer), "engine_global_steps": self.engine.global_steps,
                "engine_skipped_steps": self.engine.skipped_steps}

    def fragments(self, owner: bool, expert_owner: bool):
        """This rank's pieces of weights, master weights and Adam moments (parallel/state.py)."""
        return pstate.fragments(self.engine.module, self.optimizer, self.cfg.model.n_routed_experts,
                                owner, expert_owner)

    def load_state_dict(self, state: dict, reader: pstate.Reader) -> None:
        pstate.restore(reader, self.engine.module, self.optimizer, self.cfg.model.n_routed_experts,
                       state["adam_step"])
        self.engine.global_steps = int(state["engine_global_steps"])
        self.engine.skipped_steps = int(state["engine_skipped_steps"])


class EngineStep(StepModule):
    """No pipeline: engine(batch), engine.backward, engine.step per micro-batch."""

    def _build_model(self) -> list[nn.Module]:
        self.model = build_model(self.cfg.model, seed=self.cfg.trainer.seed, device=self.device, groups=self.groups)
        self.model.set_attention(str(self.cfg.trainer.attention))
        self.loss = LossModule(self.model)
        return list(self.model.layers.values())

    def _engine_module(self) -> nn.Module:
        return self.loss

    def _run(self, batches: list[dict], coefs: Coefficients) -> None:
        self.loss.mtp_lambda, self.loss.fault = coefs.mtp_lambda, coefs.fault
        self._sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in batches:
            with self.fp8_autocast():
                total, main, mtp = self.engine(batch["input_ids"], batch["labels"], batch.get("position_ids"))
            self._sums += torch.stack([main, mtp]).double()
            self.engine.backward(total)
            self.engine.step()  # the last one runs the step guard, then the update
        self.loss.fault = None

    def _local_means(self) -> torch.Tensor:
        return self._sums / self.grad_accum

    @torch.no_grad()
    def eval_step(self, batches: list[dict]) -> tuple[torch.Tensor, int]:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in batches:
            with self.fp8_autocast():
                total += self.model.losses(b["input_ids"], b["labels"], b.get("position_ids")).main.double()
        return total, len(batches)


def pipe_item(b: dict) -> tuple:
    """A batch as DeepSpeed's pipeline wants it: ((input_ids, labels[, position_ids]), labels)."""
    return ((b["input_ids"], b["labels"]) + ((b["position_ids"],) if "position_ids" in b else ()), b["labels"])


class PipelineStep(StepModule):
    """DeepSpeed's pipeline engine: `train_batch` runs the 1F1B schedule, reductions, guard and update.

    Every stage draws the micro-batches (middle stages ignore theirs), so the loader position is
    the same on every rank."""

    def _build_model(self) -> list[nn.Module]:
        cfg, t, p = self.cfg, self.cfg.trainer, self.cfg.parallel
        ep = (self.groups.ep, p.ep, self.groups.ep_rank) if p.ep > 1 else None
        self.model, self.loss = build_pipeline(
            cfg.model, pp=p.pp, seed=t.seed, partition=p.partition, layer_costs_override=p.layer_costs,
            seq_len=t.seq_len, activation_checkpoint_interval=p.activation_checkpoint_interval,
            expert_parallel=ep, attention=str(t.attention))
        if p.ep > 1:
            mark_for_deepspeed(self.model, p.ep, self.groups.ep_group_name)
        return [m.block for m in self.model.modules() if isinstance(m, BlockPipe)]

    def _run(self, batches: list[dict], coefs: Coefficients) -> None:
        self.loss.mtp_lambda = coefs.mtp_lambda
        self.loss.fault = (lambda out: inject(out, coefs.fault)) if coefs.fault else None
        with self.fp8_autocast():  # DeepSpeed runs forwards and backwards inside one call
            self.engine.train_batch(data_iter=iter([pipe_item(b) for b in batches]))
        self.loss.take()
        self.loss.fault = None

    def _local_means(self) -> torch.Tensor:
        return (self.loss.peek() / self.grad_accum).to(self.device).double()  # zeros off the last stage

    @torch.no_grad()
    def eval_step(self, batches: list[dict]) -> tuple[torch.Tensor, int]:
        if not batches:
            return torch.zeros((), dtype=torch.float64, device=self.device), 0
        self.loss.take()
        with self.fp8_autocast():
            self.engine.eval_batch(iter([pipe_item(b) for b in batches]), num_micro_batches=len(batches))
        return self.loss.take()[0].double(), len(batches)


def build_step_module(cfg: Config, groups: Groups, device: torch.device, dtype: torch.dtype, **guard) -> StepModule:
    return (PipelineStep if groups.layout.pp > 1 else EngineStep)(cfg, groups, device, dtype, **guard)
