#!/usr/bin/env bash
# Launch `python -m train` on this node with torchrun's c10d rendezvous; run it on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#   CLUSTER_ENV=launch/env/h800.sh launch/torchrun.sh [--dry-run] model=671b parallel.pp=16 …
#
# Everything after the options is passed to the trainer as Hydra overrides.
#   --dry-run      print the environment and the exact command, start nothing
# Environment (defaults from SLURM when it is there, else one node):
#   NNODES         nodes in the job                   (SLURM_NNODES, else 1)
#   NODE_RANK      this node, 0 … NNODES-1            (SLURM_NODEID, else 0)
#   GPUS_PER_NODE  workers on this node               (SLURM_GPUS_ON_NODE, else nvidia-smi's count, else 1)
#   MASTER_ADDR    rendezvous host (node 0)           (127.0.0.1)
#   MASTER_PORT    rendezvous port                    (29500)
#   RDZV_ID        rendezvous id, the same on all nodes (SLURM_JOB_ID, else "moeforge")
#   MAX_RESTARTS   torchrun restarts of all workers after a failure; each resumes (resume=auto) (0)
#   CLUSTER_ENV    a launch/env/*.sh file to source (NCCL, allocator)
#   PYTHON         interpreter                        (python)
# Before any worker starts, `python -m train.plan --check` tests the layout against
# NNODES × GPUS_PER_NODE and names the values that do not divide (exit 2).
# Exit code: torchrun's; 75 when a worker was preempted and saved (requeue: it resumes), 4 when
# workers lost contact with another node (train/launch.py).
# SIGUSR1 to this script is forwarded to the workers (SLURM's --signal); SIGTERM to torchrun.
# Workers die with the torchrun agent: a SIGKILLed agent leaves no orphan workers behind
# (torchrun puts them in sessions of their own; train/launch.py has the kernel kill them).
set -euo pipefail

die() { echo "error: launch/torchrun.sh: $*" >&2; exit 2; }
is_count() { [[ $1 =~ ^[0-9]+$ ]] && (( 10#$1 >= $2 )); }

dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z ${GPUS_PER_NODE:-} ]]; then
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1; then GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU' || true)
  fi
fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-moeforge}}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}

is_count "$NNODES" 1 || die "NNODES=$NNODES: must be a whole number >= 1"
is_count "$GPUS_PER_NODE" 1 || die "GPUS_PER_NODE=$GPUS_PER_NODE: must be a whole number >= 1"
if ! is_count "$NODE_RANK" 0 || (( NODE_RANK >= NNODES )); then
  die "NODE_RANK=$NODE_RANK: must be in 0..$((NNODES - 1)) (NNODES=$NNODES)"
fi
if ! is_count "$MASTER_PORT" 1 || (( MASTER_PORT > 65535 )); then die "MASTER_PORT=$MASTER_PORT: not a TCP port"; fi
is_count "$MAX_RESTARTS" 0 || die "MAX_RESTARTS=$MAX_RESTARTS: must be a whole number >= 0"

env_names=()
if [[ -n ${CLUSTER_ENV:-} ]]; then
  [[ -f $CLUSTER_ENV ]] || die "CLUSTER_ENV=$CLUSTER_ENV: no such file (launch/env/h800.sh, launch/env/h100.sh)"
  # shellcheck source=/dev/null
  source "$CLUSTER_ENV"
  mapfile -t env_names < <(sed -n 's/^export \([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' "$CLUSTER_ENV")
fi
if [[ -n ${MOEFORGE_DIST_TIMEOUT_S:-} ]]; then
  is_count "$MOEFORGE_DIST_TIMEOUT_S" 1 || die "MOEFORGE_DIST_TIMEOUT_S=$MOEFORGE_DIST_TIMEOUT_S: must be whole seconds >= 1"
  export MOEFORGE_DIST_TIMEOUT_S
  [[ " ${env_names[*]} " == *" MOEFORGE_DIST_TIMEOUT_S "* ]] || env_names+=(MOEFORGE_DIST_TIMEOUT_S)
fi

cd "$root"
# The layout against the world size, before any worker (or rendezvous) exists.
layout=$("$PYTHON" -m train.plan --check "nodes=$NNODES" "gpus_per_node=$GPUS_PER_NODE" "$@") || exit $?

cmd=("$PYTHON" -m torch.distributed.run
  "--nnodes=$NNODES" "--nproc-per-node=$GPUS_PER_NODE" "--node-rank=$NODE_RANK"
  --rdzv-backend=c10d "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT" "--rdzv-id=$RDZV_ID"
  "--max-restarts=$MAX_RESTARTS"
  -m train.launch "$@")

if (( dry_run )); then
  echo "# node $NODE_RANK of $NNODES, $GPUS_PER_NODE processes per node, $((NNODES * GPUS_PER_NODE)) in all;" \
       "rendezvous c10d $MASTER_ADDR:$MASTER_PORT id $RDZV_ID"
  echo "# layout $layout"
  echo "cd $(printf '%q' "$root")"
  for name in "${env_names[@]}"; do
    echo "export $name=$(printf '%q' "${!name}")"
  done
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi

echo "launch: node $NODE_RANK of $NNODES, $GPUS_PER_NODE workers, rendezvous $MASTER_ADDR:$MASTER_PORT ($layout)" >&2
MOEFORGE_EXIT_DIR=$(mktemp -d)
export MOEFORGE_EXIT_DIR
trap 'rm -rf "$MOEFORGE_EXIT_DIR"' EXIT

# torchrun's agent would die of a SIGUSR1 that reaches it (srun and scancel may signal every
# process of a step), so it starts with USR1 ignored; the workers install the trainer's handler.
(trap '' USR1; exec "${cmd[@]}") &
agent=$!
# SLURM's --signal=B:USR1 reaches the batch script and srun forwards it here: it goes on to
# the workers (the agent's children), which save a checkpoint and exit 75.
trap 'pkill -USR1 -P "$agent" || true' USR1
trap 'kill -TERM "$agent" 2>/dev/null || true' TERM INT
while kill -0 "$agent" 2>/dev/null; do
  wait "$agent" || true  # returns early when a trapped signal arrives
done
rc=0
wait "$agent" || rc=$?
if grep -qx 4 "$MOEFORGE_EXIT_DIR"/* 2>/dev/null; then
  echo "launch: node $NODE_RANK: workers lost contact with another node (exit 4); restart the job to resume" >&2
  rc=4
fi
if grep -qx 75 "$MOEFORGE_EXIT_DIR"/* 2>/dev/null; then
  echo "launch: node $NODE_RANK: preempted; a checkpoint was saved (exit 75: requeue, resume=auto continues)" >&2
  rc=75
fi
exit "$rc"
