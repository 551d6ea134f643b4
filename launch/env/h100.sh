# shellcheck shell=bash
# Environment for NVIDIA H100 SXM nodes on InfiniBand (conf/cluster/h100.yaml).
# Sourced by launch/torchrun.sh when CLUSTER_ENV=launch/env/h100.sh (launch/slurm.sbatch sets it
# from CLUSTER=h100). Every value is a default: a site's own setting in the environment wins.

# One hardware work queue per device: kernels start in issue order, so the all-to-all and
# pipeline p2p kernels queued before a GEMM are not starved of SMs behind it (Megatron-LM sets it too).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# MoE token counts change every step: growable segments instead of fixed blocks stop the
# caching allocator from fragmenting into out-of-memory errors with memory still free.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# Use the ConnectX HCAs of the compute fabric (prefix match), not a storage or management NIC.
export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"
# NCCL's bootstrap and socket fallback: any interface but loopback and container bridges.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
# IB verbs timeout 4.096 µs × 2^22 ≈ 17 s (default 2^20 ≈ 4 s): rides out congestion on a
# large fabric without declaring a link dead; the process-group timeout still bounds hangs.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# Retransmissions before an IB error (NCCL's default and the verbs maximum): transient loss is retried.
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
# Warnings and errors only: one line per problem in each node's log, not per-connection chatter.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# A failed or timed-out collective tears the process down (PyTorch ≥ 2.2 name), so torchrun
# and SLURM see a failure instead of a rank hanging in NCCL forever.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Collective timeout of init_distributed (parallel/engine.py): 10 min covers a large first
# checkpoint load; a dead peer is detected after this long at most.
export MOEFORGE_DIST_TIMEOUT_S="${MOEFORGE_DIST_TIMEOUT_S:-600}"
