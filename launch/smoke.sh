#!/usr/bin/env bash
# The smoke run on one GPU (bf16) or, without one, on the CPU (fp32): the smoke model on the
# Python standard library's source, 200 steps, ≤ 5 minutes on a 2-core CPU (`make smoke` runs
# the same command). Overrides pass through:
#
#   launch/smoke.sh                                  # one GPU if visible, else the CPU
#   launch/smoke.sh trainer.max_steps=50 fp8=emulated
#   CUDA_VISIBLE_DEVICES=3 launch/smoke.sh           # pick the GPU
#   launch/smoke.sh --dry-run                        # print the command, run nothing
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python}
# MoE token counts change every step: growable segments keep the caching allocator from fragmenting.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
cmd=("$PYTHON" -m train +experiment=smoke "$@")
if (( dry_run )); then
  echo "cd $(printf '%q' "$root")"
  echo "export PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
cd "$root"
exec "${cmd[@]}"
