"""`torchrun … -m train.launch [overrides]`: `python -m train`, leaving its exit code for the launcher.

torchrun's agent exits 1 whatever code its workers ended with, so the trainer's documented
"preempted, saved, please requeue" code (75) would never reach SLURM. launch/torchrun.sh
starts the workers through this module: each writes its exit code to $MOEFORGE_EXIT_DIR/<rank>
before leaving, and the script exits 75 when a worker did (launch/slurm.sbatch requeues).

A worker that loses contact with another rank (a node died, the network failed, a
collective timed out after MOEFORGE_DIST_TIMEOUT_S) ends with one line naming the failure
and exit code 4 instead of a traceback per rank.

A worker ends with its torchrun agent. torchrun starts each worker in a session of its own, so
when the agent is killed outright (SIGKILL, the OOM killer) nothing stops its workers: they
would train on to the end, holding the GPUs and writing checkpoints while the job is restarted
elsewhere. So each worker, first thing, asks Linux to SIGKILL it when its parent, the agent,
dies (prctl PR_SET_PDEATHSIG; `die_with_agent`). SIGKILL rather than SIGTERM: SIGTERM is the
trainer's preemption signal and would start a checkpoint save racing the restarted job, and
a worker stuck in a collective would not act on it; the newest complete checkpoint stays valid
(saves are atomic). An agent that ends normally has ended its workers first.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

EXIT_PEER_LOST = 4  # a collective failed: another rank or node is gone

# What gloo and NCCL say when the other end of a collective is gone or silent.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "Timed out",
             "timed out", "Broken pipe", "NCCL communicator was aborted", "remote process exited",
             "ProcessGroupNCCL", "Socket Timeout")


def peer_lost(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in PEER_LOST)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_agent() -> bool:
    """Under torchrun on Linux: be SIGKILLed by the kernel when the parent (the agent) dies; True if set.

    The parent is read before the prctl and checked after it: an agent that died in between
    signals nobody, so the worker ends itself then."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes

    agent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if agent == 1 or os.getppid() != agent:  # already orphaned: no death signal will come
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def main() -> int:
    die_with_agent()  # before the imports: the agent may die while they run
    from train.__main__ import main as train_main

    code = 1
    try:
        code = train_main()
    except Exception as exc:  # noqa: BLE001 — only a lost peer is turned into a line; the rest re-raises
        if not peer_lost(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: rank {os.environ.get('RANK', '?')} lost contact with another rank ({first}); "
              "a node or process died or the network failed — restart the job: checkpoint.resume=auto "
              "continues from the newest complete checkpoint", file=sys.stderr)
        code = EXIT_PEER_LOST
    finally:
        exit_dir = os.environ.get("MOEFORGE_EXIT_DIR")
        if exit_dir and Path(exit_dir).is_dir():
            Path(exit_dir, os.environ.get("RANK", "0")).write_text(f"{code}\n")
    return code


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # as train/__main__.py: no interpreter teardown once everything is closed
