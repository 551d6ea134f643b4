"""Asynchronous all-to-all exchanges for the expert dispatcher: start now, wait where the result
is first needed, in forward and in backward; optional FP8 rows; byte counts per link; and a
simulated slow inter-node link for tests and benchmarks.

An exchange is a `Transfer`: several tensors that share one row split (token rows, their expert
ids, their gate weights) moved with `all_to_all_single(async_op=True)`. Two autograd nodes
bracket it, after the pattern DeepEP exposes with `async_finish` / `previous_event` and
Megatron-Core's MoE all-to-all overlap uses:

    launch(transfer, rows, ids, w) → token     forward: start the exchange
    land(token, transfer) → rows', ids', w'     forward: wait for it
                                               backward of land: start the reverse exchange of
                                               the gradients; backward of launch: wait for it

Whatever runs between the two in forward (the shared experts, the other half's experts) runs
while the bytes move; in backward autograd runs the nodes recorded between them (higher
sequence numbers first) while the reverse exchange is in flight.

FP8 rows (DeepSeek-V3 §3.3, DeepEP's FP8 dispatch): the rows go as E4M3 bytes with one float32
scale per 1×128 tile (or per row), quantised once where the token lives; the receiver gets the
`Quantised` operand for its experts' first GEMM plus the dequantised values, which carry the
gradient (the backward exchange stays in the compute dtype: BF16 in DeepSeek's run).

The simulated link (`LinkModel`) is for tests and benchmarks only, and says so wherever it is
used: each transfer's inter-node bytes occupy this rank's link for bytes / bandwidth (+
latency), one transfer after another, and `finish` sleeps until the link would have delivered
them. Sleeping leaves the CPU to compute, so what overlaps the transfer hides its simulated
time exactly as a real network would; intra-node transfers go at memory speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class LinkModel:
    """A rank's inter-node link, simulated (tests and benchmarks only): full duplex, one transfer
    at a time, `gbps` GB/s plus `latency_s` per transfer."""

    def __init__(self, gbps: float, latency_s: float = 0.0):
        if gbps <= 0:
            raise ValueError(f"simulated link: {gbps} GB/s must be > 0")
        self.bytes_per_s, self.latency_s = gbps * 1e9, latency_s
        self.busy_until = 0.0
        self.seconds = 0.0  # simulated transfer time booked so far
        self.bytes = 0  # inter-node bytes booked so far
        self.slept = 0.0  # time spent waiting for the link (what the schedule did not hide)

    def book(self, nbytes: int) -> float:
        """Queue `nbytes` behind what is in flight; returns the time they are delivered."""
        if nbytes <= 0:
            return 0.0
        duration = self.latency_s + nbytes / self.bytes_per_s
        self.busy_until = max(time.perf_counter(), self.busy_until) + duration
        self.seconds += duration
        self.bytes += nbytes
        return self.busy_until

    def settle(self, deadline: float) -> None:
        left = deadline - time.perf_counter()
        if left > 0:
            time.sleep(left)
            self.slept += left


@dataclass
class Traffic:
    """Bytes this rank sent to other ranks, by link, since the last reset (forward exchanges)."""

    inter_rows: int = 0  # hidden-state rows over the inter-node link (dispatch + combine)
    intra_rows: int = 0  # rows to other ranks of this node
    inter_bytes: int = 0  # their payload bytes (FP8 rows: values + scales)
    intra_bytes: int = 0
    dispatch_bytes: int = 0  # payload bytes of the dispatch direction only (both links)
    combine_bytes: int = 0
    metadata_bytes: int = 0  # expert ids, gate weights and the split counts

    def reset(self) -> None:
        self.__init__()


class Peers:
    """Where the other ranks of the expert-parallel group are: ep rank r lives on node r // per_node."""

    def __init__(self, group, ep_size: int, ep_rank: int, per_node: int, link: LinkModel | None = None):
        self.group, self.size, self.rank, self.per_node = group, ep_size, ep_rank, per_node
        self.node, self.local = ep_rank // per_node, ep_rank % per_node
        self.n_nodes = ep_size // per_node
        self.link = link
        self.traffic: Traffic | None = None  # counted only when set (benchmarks, tests)

    def split_counts(self, send_counts: torch.Tensor) -> tuple[list[int], list[int]]:
        """Exchange per-rank row counts; the one device → host read of an exchange."""
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.group)
        send, got = torch.stack([send_counts, recv]).tolist()
        if self.traffic is not None:
            self.traffic.metadata_bytes += 8 * (self.size - 1)
        return send, got

    def remote_rows(self, splits: list[int]) -> tuple[int, int]:
        """(inter-node, intra-node) rows of `splits` that leave this rank."""
        inter = intra = 0
        for r, n in enumerate(splits):
            if r == self.rank:
                continue
            if r // self.per_node == self.node:
                intra += n
            else:
                inter += n
        return inter, intra


class Transfer:
    """One all-to-all of tensors sharing row splits; forward now or later, its reverse in backward.

    `kind` is "dispatch" or "combine" (byte accounting). With `qx` the first tensor travels as
    that Quantised operand (E4M3 bytes and float32 scales) and arrives dequantised, with the
    received operand in `self.qx`."""

    def __init__(self, peers: Peers, send: list[int], recv: list[int], kind: str):
        self.peers, self.send, self.recv, self.kind = peers, send, recv, kind
        self.qx = None
        self._quant = None
        self._works, self._outs, self._deadline = [], [], 0.0

    # ---------------------------------------------------------------- the exchange itself
    def _start(self, tensors: list[torch.Tensor], send: list[int], recv: list[int], *, forward: bool) -> None:
        outs, works = [], []
        for t in tensors:
            t = t.contiguous()
            out = t.new_empty((sum(recv), *t.shape[1:]))
            works.append(dist.all_to_all_single(out, t, recv, send, group=self.peers.group, async_op=True))
            outs.append(out)
        self._outs, self._works = outs, works
        peers = self.peers
        inter_sent, intra_sent = peers.remote_rows(send)
        if peers.link is not None:
            row_bytes = sum(t[:1].numel() * t.element_size() for t in tensors)
            inter_recv, _ = peers.remote_rows(recv)
            self._deadline = peers.link.book(max(inter_sent, inter_recv) * row_bytes)
        if forward and peers.traffic is not None:
            tr = peers.traffic
            payload = sum(t[:1].numel() * t.element_size() for t in tensors[:self._payload_tensors])
            meta = sum(t[:1].numel() * t.element_size() for t in tensors[self._payload_tensors:])
            tr.inter_rows += inter_sent
            tr.intra_rows += intra_sent
            tr.inter_bytes += inter_sent * payload
            tr.intra_bytes += intra_sent * payload
            if self.kind == "dispatch":
                tr.dispatch_bytes += (inter_sent + intra_sent) * payload
            else:
                tr.combine_bytes += (inter_sent + intra_sent) * payload
            tr.metadata_bytes += (inter_sent + intra_sent) * meta

    def _finish(self) -> list[torch.Tensor]:
        for w in self._works:
            w.wait()
        if self._deadline:
            self.peers.link.settle(self._deadline)
        outs, self._outs, self._works, self._deadline = self._outs, [], [], 0.0
        return outs

    # ---------------------------------------------------------------- forward
    def start_forward(self, tensors: tuple[torch.Tensor, ...], qx=None) -> None:
        self._dtypes = [t.dtype for t in tensors]
        self._grad_mask = [t.is_floating_point() for t in tensors]
        wire = list(tensors)
        self._payload_tensors = 1
        if qx is not None:  # E4M3 bytes (the emulated backend's float32 grid values are exact in E4M3)
            self._quant = (qx.granularity, qx.block, qx.q.dtype, qx.scale.shape[1:])
            q8 = qx.q if qx.q.dtype == torch.float8_e4m3fn else qx.q.to(torch.float8_e4m3fn)
            wire = [q8.view(torch.uint8), qx.scale.reshape(qx.scale.size(0), -1), *tensors[1:]]
            self._payload_tensors = 2
        self._start(wire, self.send, self.recv, forward=True)

    def finish_forward(self) -> list[torch.Tensor]:
        outs = self._finish()
        if self._quant is None:
            return outs
        from model.fp8.gemm import Quantised

        granularity, block, q_dtype, scale_shape = self._quant
        q = outs[0].view(torch.float8_e4m3fn)
        q = q if q_dtype == torch.float8_e4m3fn else q.to(q_dtype)
        self.qx = Quantised(q, outs[1].view(-1, *scale_shape), granularity, block)
        return [self.qx.dequant(self._dtypes[0]), *outs[2:]]

    # ---------------------------------------------------------------- backward: the reverse exchange
    def start_backward(self, grads: tuple) -> None:
        self._grad_slots = [i for i, (g, m) in enumerate(zip(grads, self._grad_mask)) if m and g is not None]
        self._start([grads[i] for i in self._grad_slots], self.recv, self.send, forward=False)

    def finish_backward(self) -> list:
        outs = self._finish()
        grads: list = [None] * len(self._grad_mask)
        for i, g in zip(self._grad_slots, outs):
            grads[i] = g
        return grads


class _Launch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, transfer: Transfer, qx, *tensors):
        ctx.transfer = transfer
        transfer.start_forward(tensors, qx)
        return tensors[0].new_empty(0)

    @staticmethod
    def backward(ctx, _token_grad):
        return None, None, *ctx.transfer.finish_backward()


class _Land(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, transfer: Transfer):
        ctx.transfer, ctx.token_dtype = transfer, token.dtype
        outs = transfer.finish_forward()
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.transfer.start_backward(grads)
        return grads[0].new_empty(0, dtype=ctx.token_dtype), None


def launch(transfer: Transfer, tensors: tuple[torch.Tensor, ...], qx=None) -> torch.Tensor:
    """Start the exchange; returns the token `land` takes."""
    return _Launch.apply(transfer, qx, *tensors)


def land(token: torch.Tensor, transfer: Transfer) -> tuple[torch.Tensor, ...]:
    """Wait for the exchange started by `launch`; the received tensors."""
    return _Land.apply(token, transfer)
