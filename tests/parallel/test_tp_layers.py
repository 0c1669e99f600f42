"""Tensor-parallel layers on real gloo process groups (3 local processes on loopback) against
their dense equivalents: column / merged / QKV (KV heads replicated when tp > kv heads) / row
parallel linears, a vocab-parallel embedding and LM head whose vocabulary does not divide tp,
and the expert-parallel MoE all-to-all."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

TP = 3


def _run(rank: int, port: int, results) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    torch.manual_seed(0)  # every rank builds the same full weights
    from parallel.layers import (
        ColumnParallelLinear,
        ParallelLMHead,
        QKVParallelLinear,
        RowParallelLinear,
        TPGroup,
        VocabParallelEmbedding,
    )
    from parallel.moe import EPGroup, FusedExperts, route

    tp = TPGroup(rank, TP, dist.group.WORLD)
    x = torch.randn(5, 12)
    out = {}

    w, b = torch.randn(9, 12), torch.randn(9)
    col = ColumnParallelLinear(12, 9, True, tp)
    col.weight.weight_loader(col.weight, w)
    col.bias.weight_loader(col.bias, b)
    out["col"] = (tp.all_gather_last_dim(col(x)), x @ w.T + b)

    w2, b2 = torch.randn(4, 9), torch.randn(4)
    row = RowParallelLinear(9, 4, True, tp)
    row.weight.weight_loader(row.weight, w2)
    row.bias.weight_loader(row.bias, b2)
    h = x @ w.T + b
    out["row"] = (row(h.narrow(1, rank * 3, 3)), h @ w2.T + b2)

    # 3 heads of dim 2, 1 KV head -> every rank holds the one KV head (replicated).
    wq, wk, wv = torch.randn(6, 12), torch.randn(2, 12), torch.randn(2, 12)
    qkv = QKVParallelLinear(12, 2, 3, 1, False, tp)
    for sid, t in (("q", wq), ("k", wk), ("v", wv)):
        qkv.weight.weight_loader(qkv.weight, t, sid)
    q, k, v = qkv(x).split(qkv.sizes, dim=-1)
    out["q"] = (q, (x @ wq.T)[:, rank * 2 : rank * 2 + 2])
    out["k"] = (k, x @ wk.T)
    out["v"] = (v, x @ wv.T)

    emb_w = torch.randn(10, 12)  # vocab 10 over 3 ranks: shards of 4, 4, 2 (+2 pad rows)
    ids = torch.tensor([0, 3, 4, 7, 8, 9])
    emb = VocabParallelEmbedding(10, 12, tp)
    emb.weight.weight_loader(emb.weight, emb_w)
    out["embed"] = (emb(ids), emb_w[ids])
    head = ParallelLMHead(10, 12, tp)
    head.weight.weight_loader(head.weight, emb_w)
    out["lm_head"] = (head(x), x @ emb_w.T)

    # Expert parallel: 6 experts over 3 ranks, top-2, tokens dispatched with all-to-all.
    ep = EPGroup(rank, TP, dist.group.WORLD)
    w13, w2e = torch.randn(6, 2 * 8, 12) * 0.3, torch.randn(6, 12, 8) * 0.3
    experts = FusedExperts(6, 12, 8, ep=ep)
    for e in range(6):
        experts.w13.weight_loader(experts.w13, w13[e, :8], (e, 0))
        experts.w13.weight_loader(experts.w13, w13[e, 8:], (e, 1))
        experts.w2.weight_loader(experts.w2, w2e[e], (e, None))
    xs = torch.randn(7, 12)
    weights, sel = route(torch.randn(7, 6), 2, renormalize=True)
    ref = torch.zeros(7, 12)
    for t in range(7):
        for j in range(2):
            e = int(sel[t, j])
            g, u = (xs[t] @ w13[e].T).chunk(2)
            ref[t] += weights[t, j] * (torch.nn.functional.silu(g) * u) @ w2e[e].T
    out["moe_ep"] = (experts(xs, weights, sel), ref)

    results[rank] = {k: (a.detach(), b.detach()) for k, (a, b) in out.items()}
    dist.destroy_process_group()


def test_tp_layers_match_dense(spawn_ranks):
    for rank, out in enumerate(spawn_ranks(_run, TP, timeout_s=120)):
        for name, (got, want) in out.items():
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{name} rank {rank}")
