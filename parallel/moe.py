"""Mixture-of-experts layers: top-k routing and expert compute, local or expert-parallel.

Two ways to split experts over the ranks of a stage:
- tensor parallel (ep == 1, tp > 1): every rank holds every expert, with its intermediate
  dimension split; the partial outputs are all-reduced (like a row-parallel layer).
- expert parallel (ep > 1): expert e lives on rank e // (E / ep), whole. The hidden states
  entering the layer are replicated on the stage's ranks, so each rank takes a contiguous slice
  of the tokens, routes it, and **dispatches** each (token, expert) pair to the owner of the
  expert with one all-to-all; owners run their experts and **combine** the results back with
  the reverse all-to-all; an all-gather of the slices restores the replicated hidden states.
  Attention stays tensor-parallel on the same ranks (TP inside attention, EP in the MoE).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.comm_timer import COMM
from parallel.layers import SINGLE, TPGroup, divide


@dataclass(frozen=True)
class EPGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None


EP_SINGLE = EPGroup()


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in float32, top-k, optional renormalisation (HF's order)."""
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedExperts(nn.Module):
    """This rank's experts as two stacked weights: w13 = [gate | up], w2 = down."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        tp: TPGroup = SINGLE,
        ep: EPGroup = EP_SINGLE,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.tp, self.ep = tp, ep
        self.num_local = divide(num_experts, ep.size, "experts (as ep)")
        self.first = ep.rank * self.num_local
        self.inter = intermediate if ep.size > 1 else divide(intermediate, tp.size, "moe intermediate size")
        self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * self.inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local, hidden, self.inter), requires_grad=False)
        self.w13.weight_loader = self._load_w13  # type: ignore[attr-defined]
        self.w2.weight_loader = self._load_w2  # type: ignore[attr-defined]

    def _local(self, expert: int) -> int | None:
        e = expert - self.first
        return e if 0 <= e < self.num_local else None

    def _tp_slice(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if self.ep.size > 1 or self.tp.size == 1:
            return t
        return t.narrow(dim, self.tp.rank * self.inter, self.inter)

    def _load_w13(self, param, loaded: torch.Tensor, shard_id) -> None:
        expert, part = shard_id  # part 0 = gate (w1), 1 = up (w3)
        e = self._local(expert)
        if e is not None:
            param.data[e].narrow(0, part * self.inter, self.inter).copy_(self._tp_slice(loaded, 0))

    def _load_w2(self, param, loaded: torch.Tensor, shard_id) -> None:
        e = self._local(shard_id[0])
        if e is not None:
            param.data[e].copy_(self._tp_slice(loaded, 1))

    def _compute(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x: [P, H] rows, each for local expert local_ids[p]; returns [P, H]."""
        out = torch.empty_like(x)
        order = torch.argsort(local_ids, stable=True)
        counts = torch.bincount(local_ids, minlength=self.num_local).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = order[start : start + n]
            start += n
            gate, up = F.linear(x[rows], self.w13[e]).chunk(2, dim=-1)
            out[rows] = F.linear(F.silu(gate) * up, self.w2[e])
        return out

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H] (replicated over the stage); weights/ids: [T, k]. Returns [T, H]."""
        if self.ep.size == 1:
            T, k = ids.shape
            y = self._compute(x.repeat_interleave(k, dim=0), ids.reshape(-1))
            y = (y.view(T, k, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
            return self.tp.all_reduce(y)
        return self._forward_ep(x, weights, ids)

    def _forward_ep(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        with COMM.time():
            # Counted as communication: the routing bookkeeping here is small next to the
            # all-to-alls; expert compute is subtracted below.
            y, compute_s = self._dispatch_compute_combine(x, weights, ids)
            if COMM.enabled:
                COMM.seconds -= compute_s
        return y

    def _dispatch_compute_combine(self, x, weights, ids):
        n, g = self.ep.size, self.ep.group
        T, k = ids.shape
        chunk = -(-T // n)
        lo, hi = min(T, self.ep.rank * chunk), min(T, (self.ep.rank + 1) * chunk)
        # Pairs (token, expert) of my slice, sorted by the rank that owns the expert.
        pair_ids = ids[lo:hi].reshape(-1)
        pair_tok = torch.arange(lo, hi, device=ids.device).repeat_interleave(k)
        dest = pair_ids // self.num_local
        order = torch.argsort(dest, stable=True)
        pair_ids, pair_tok = pair_ids[order], pair_tok[order]
        send_counts = torch.bincount(dest, minlength=n)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=g)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        # Dispatch: rows and their expert ids to the owners.
        rows = x[pair_tok]
        in_rows = x.new_empty(sum(recv), x.shape[1])
        dist.all_to_all_single(in_rows, rows, recv, send, group=g)
        in_ids = pair_ids.new_empty(sum(recv))
        dist.all_to_all_single(in_ids, pair_ids, recv, send, group=g)
        t_c = time.perf_counter()
        y = self._compute(in_rows, in_ids - self.first)
        compute_s = time.perf_counter() - t_c
        # Combine: results go back to where the pairs came from, in the order they were sent.
        back = x.new_empty(rows.shape)
        dist.all_to_all_single(back, y, send, recv, group=g)
        w = weights[lo:hi].reshape(-1)[order].to(back.dtype)
        part = x.new_zeros(chunk, x.shape[1])
        part.index_add_(0, pair_tok - lo, back * w[:, None])
        gathered = [torch.empty_like(part) for _ in range(n)]
        dist.all_gather(gathered, part, group=g)
        return torch.cat(gathered)[:T], compute_s
