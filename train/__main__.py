"""`python -m train [hydra overrides]` — and `torchrun --nproc_per_node N -m train …`.

parse → validate (before any process group or model) → init distributed → data → train → summary.
A user's mistake ends with one line `error: …` and exit code 2 (a bad checkpoint to resume
from included); a run that must stop (too many skipped updates) with one line and exit code 3;
a preempted run (SIGTERM / SIGUSR1 on any rank) saves a checkpoint and exits with 75
(EX_TEMPFAIL: run again, it resumes).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from data.errors import EXIT_USER_ERROR, UserError

EXIT_TRAIN_ERROR = 3


def split_run_dir(argv: list[str]) -> tuple[list[str], str | None, bool]:
    """Take the launch arguments out of the overrides (we compose with Hydra's API, not @hydra.main):
    `hydra.run.dir=…` and `+run.allow_config_change=true`. Other `hydra.*` keys are refused."""
    from model.config import ConfigError

    from .run import ALLOW_CONFIG_CHANGE

    rest, run_dir, allow = [], None, False
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            run_dir = arg.split("=", 1)[1]
        elif arg == ALLOW_CONFIG_CHANGE:
            allow = True
        elif arg.lstrip("+~").startswith("hydra."):
            raise ConfigError(f"{arg}: moeforge reads only hydra.run.dir (and hydra.sweep.dir with -m); "
                              "other hydra.* keys would be ignored")
        else:
            rest.append(arg)
    return rest, run_dir, allow


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .cli import handle

    code = handle(argv, __doc__)  # --help, --cfg job [--resolve], -m/--multirun
    if code is not None:
        return code
    from omegaconf import OmegaConf

    from parallel.engine import DistEnv

    from . import checkpoint_dir as checkpoint
    from .config import check_fp8, check_layout, compose, to_config
    from .data_setup import check_dataset

    from . import run

    env = DistEnv.from_environ()
    try:
        overrides, run_dir_arg, allow_change = split_run_dir(argv)
        composed = compose(overrides)
        if not composed.run.name:
            composed.run.name = run.default_name(overrides)
        cfg = to_config(composed)
        check_layout(cfg, env.world_size)
        check_fp8(cfg)
        check_dataset(cfg)
        checkpoint.precheck(cfg.checkpoint.resume, asdict(cfg.model))
        if cfg.checkpoint.init_from:
            from .checkpoint import init_source

            init_source(Path(cfg.checkpoint.init_from), cfg.model)
        resolved_yaml = OmegaConf.to_yaml(composed)
        run_dir = run.resolve_run_dir(run_dir_arg, cfg.run.name)
        changes = run.config_changes(run_dir, resolved_yaml, allow_change)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return _run(cfg, env, run_dir, resolved_yaml, changes)


def _run(cfg, env, run_dir: Path, resolved_yaml: str, changes: dict) -> int:
    from parallel.engine import resolve_device

    from .faults import EXIT_PREEMPTED
    from .trainer import Preempted, TrainError

    try:
        device = resolve_device(cfg.trainer.device)
    except UserError as exc:  # trainer.device=cuda on a machine without a visible GPU
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
    import torch.distributed as dist

    from parallel.engine import init_distributed

    from . import provenance, run
    from .data_setup import build_loaders, ensure_dataset, unigram_entropy
    from .trainer import Trainer

    init_distributed(device, startup_timeout_s=cfg.trainer.startup_timeout_s)
    try:
        holder = [str(run_dir.resolve())]
        dist.broadcast_object_list(holder, src=0)  # every rank writes under rank 0's directory (${now:…})
        run_dir = Path(holder[0])
        restart = len([r for r in run.starts(run_dir) if r.get("event") == "start"])
        if env.rank == 0 and restart == 0:
            provenance.write(run_dir, resolved_yaml, {"world_size": env.world_size})
        try:
            data_path = ensure_dataset(cfg, env.rank)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        trainer = Trainer(cfg, run_dir, env.world_size, env.rank)
        train_loader, val_factory = build_loaders(cfg, data_path, dp_rank=env.rank % trainer.dp, dp_size=trainer.dp)
        try:
            trainer.setup(train_loader, val_factory)  # resumes: a bad checkpoint is the user's input
            run.check_not_looping(run_dir, trainer.step)
        except UserError as exc:
            trainer.close()
            if env.rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        start = {"event": "start", "restart": restart, "time": time.time(), "step": trainer.step,
                 "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
                 "layout": {"world": env.world_size, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep},
                 "code": provenance.git_state(), "changed": changes}
        if env.rank == 0:
            run.append(run_dir, start)
        code = EXIT_TRAIN_ERROR  # until fit returns or says otherwise
        try:
            if trainer.step >= cfg.trainer.max_steps:
                if env.rank == 0:
                    print(f"run {cfg.run.name} is complete: step {trainer.step} of trainer.max_steps="
                          f"{cfg.trainer.max_steps} in {run_dir}; raise trainer.max_steps to continue it")
                code = 0
                return code
            summary = trainer.fit()
            code = 0
        except TrainError as exc:
            if env.rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            return code
        except Preempted as exc:
            if env.rank == 0:
                print(f"{exc}; exit {EXIT_PREEMPTED} (run the same command again: it resumes)", file=sys.stderr)
            code = EXIT_PREEMPTED
            return code
        finally:
            trainer.close()
            if env.rank == 0:
                run.append(run_dir, {"event": "end", "start": restart, "time": time.time(), "exit": code,
                                     "step": trainer.step})
        if env.rank == 0:
            _print_summary(summary, run_dir, unigram_entropy(data_path))
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _print_summary(summary: dict, run_dir: Path, entropy: float | None) -> None:
    from .report import render

    plots = render(run_dir)
    lines = ["", "== moeforge run summary =="]
    lines.append(f"final train loss   {summary.get('train_loss', float('nan')):.4f} nats/token")
    if "val_loss" in summary:
        lines.append(f"final val loss     {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.2f})")
    if entropy is not None:
        lines.append(f"unigram entropy    {entropy:.4f} nats/token (a model that ignores context)")
    tok_s = summary.get("tokens_per_s")
    lines.append(f"throughput         {tok_s:,.0f} tokens/s" if tok_s else "throughput         n/a")
    lines.append(f"elapsed            {summary.get('elapsed_s', 0):.1f} s, {summary.get('tokens_seen', 0):,} tokens")
    if summary.get("gc_collections"):
        lines.append(f"garbage collection {summary['gc_collections']} scheduled, {1e3 * summary['gc_s']:.1f} ms in all, "
                     f"{summary['gc_freed']:,} objects freed (trainer.gc_interval)")
    lines.append(f"run directory      {run_dir}")
    lines.append(f"metrics            {run_dir / 'metrics.jsonl'}")
    lines.append(f"plots              {', '.join(str(p) for p in plots) if plots else 'none'}")
    print("\n".join(lines))


if __name__ == "__main__":
    code = main()
    # Everything is closed and written by now (loaders joined, logger and wandb finished, process
    # group destroyed). Leave without interpreter teardown: a C++ thread of a library still
    # joinable during static destruction aborts the process (exit -6 after a successful run, seen
    # on CI), and the exit code is what launchers and schedulers act on.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
