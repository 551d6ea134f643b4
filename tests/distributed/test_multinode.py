"""A real two-node launch on one machine (issue 8): two launch/torchrun.sh "nodes" on loopback.

Two torchrun agents with --nnodes 2, node ranks 0 and 1 and one c10d rendezvous endpoint on
127.0.0.1, two workers each, train the smoke model at pp=2 × dp=2 with ep=2. Once both
nodes have trained a few steps, node 1 dies (SIGKILL of its launch script, torchrun agent and
workers: a machine losing power), and node 0 must end on its own, quickly, with a clear line
rather than hang in a collective. The process-group timeout (MOEFORGE_DIST_TIMEOUT_S) bounds
the wait where no connection reset arrives.

Measured on the 2-core CPU box: ~15 s to the first steps when DeepSpeed's ops are cached
(imports of four processes), node 0 ends ~10 s after the kill (gloo sees the reset at once).

Still to come with the checkpoint issue: restarting both nodes must resume from the last
checkpoint (checkpoint.interval > 0, resume=auto). That leg needs saving, which this tree
does not have yet, so it is not here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STARTUP_S = 400  # imports and DeepSpeed's op load on a loaded 2-core box; normally ~15 s
END_S = 90  # node 0 must be gone this long after node 1 died (timeout 20 s + teardown)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    """`pid` and every descendant (by /proc parent links): one node's launch script, agent, workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_tree(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def train_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind":"train"' in line.replace(" ", ""))


def test_two_nodes_train_and_a_dead_node_ends_the_other(tmp_path, dataset):
    run_dir = tmp_path / "run"
    env = {**os.environ, "NNODES": "2", "GPUS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RDZV_ID": f"test{os.getpid()}", "PYTHON": sys.executable,
           "MOEFORGE_DIST_TIMEOUT_S": "20", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "WANDB_SILENT": "true", "MOEFORGE_CACHE": str(tmp_path / "cache")}
    for key in ("CLUSTER_ENV", "NODE_RANK", "MAX_RESTARTS"):
        env.pop(key, None)
    args = ["+experiment=smoke", f"data.path={dataset}", "data.num_workers=0", "trainer.seq_len=64",
            "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.max_steps=1000",
            "trainer.log_interval=1", "trainer.eval_interval=0", "trainer.threads=1", "logging.wandb.mode=disabled",
            "logging.progress_bar=false", "parallel.pp=2", "parallel.ep=2", f"hydra.run.dir={run_dir}"]
    nodes, logs = [], []
    try:
        for rank in (0, 1):
            log = open(tmp_path / f"node{rank}.log", "w")
            logs.append(log)
            nodes.append(subprocess.Popen(["launch/torchrun.sh", *args], cwd=ROOT, env={**env, "NODE_RANK": str(rank)},
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            time.sleep(0.5)  # node 0's agent hosts the rendezvous store
        deadline = time.monotonic() + STARTUP_S
        while train_steps(run_dir) < 3:
            assert all(n.poll() is None for n in nodes), (tmp_path / "node0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training steps: " + (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(0.5)
        prov = json.loads((run_dir / "provenance.json").read_text())
        assert '"world_size": 4' in json.dumps(prov)  # one process group over both nodes
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if '"kind":"train"' in line.replace(" ", "")]
        assert all(0 < x < 10 for x in losses)

        kill_tree(tree(nodes[1].pid))  # node 1 is gone: script, torchrun agent, both workers
        killed = time.monotonic()
        try:
            rc = nodes[0].wait(timeout=END_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 0 still running {END_S} s after node 1 died: "
                        + (tmp_path / "node0.log").read_text()[-3000:])
        ended = time.monotonic() - killed
        out = (tmp_path / "node0.log").read_text()
        assert rc == 4, (rc, out[-3000:])
        assert "lost contact with another rank" in out and "checkpoint.resume=auto" in out
        assert "launch: node 0: workers lost contact with another node (exit 4)" in out
        assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out  # one line per worker instead
        print(f"node 0 ended {ended:.1f} s after node 1 was killed, after {train_steps(run_dir)} steps")
    finally:
        for n in nodes:
            kill_tree(tree(n.pid))
        for log in logs:
            log.close()
