"""Megatron-style tensor-parallel layers that take their process group explicitly.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's
slice out of the full checkpoint tensor, so sharded loading stays next to the layer that knows
the layout. With `tp.size == 1` every layer is a plain dense layer and no collective runs.

- ColumnParallelLinear: output features split; output stays sharded (no communication).
- MergedColumnParallelLinear: several column-parallel outputs fused in one matmul (gate|up).
- QKVParallelLinear: q|k|v fused; KV heads split across ranks, replicated when tp > kv heads.
- RowParallelLinear: input features split; the all-reduce is inside; bias added once, after it.
- VocabParallelEmbedding / ParallelLMHead: vocabulary split; embedding all-reduced, logits gathered.

The linears compute through a `LinearMethod` object (torch's linear unless one is attached at
load), so CPU kernels plug in without parallel/ knowing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.comm_timer import COMM
from parallel.shm_comm import ShmAllReduce


@dataclass(frozen=True)
class TPGroup:
    """This rank's place on the tensor-parallel axis."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    shm: ShmAllReduce | None = None  # parallel.shm_comm: CPU ranks of one node

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            with COMM.time():
                if self.shm is not None and x.device.type == "cpu":
                    self.shm(x)
                else:
                    dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        with COMM.time():
            if self.shm is not None and x.device.type == "cpu":
                parts = list(self.shm.all_gather(x).unbind(0))
            else:
                parts = [torch.empty_like(x) for _ in range(self.size)]
                dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TPGroup()


def divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what}={a} is not divisible by tp={b}")
    return a // b


class LinearMethod:
    """How a linear layer computes y = x W^T (+ bias): vLLM's seam. parallel/ keeps the sharding
    and the collectives; the method is chosen at load (workers/linear_methods.py attaches CPU
    kernels -- AMX tiles, a bf16 GEMV, oneDNN-prepacked weights -- where the kernel plan says
    they apply). This default is torch's linear, on any device."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def argmax(self, layer: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor | None:
        """argmax over the first n columns of apply(layer, x, None), per row, without writing
        the outputs out; None where this method cannot (the caller computes them)."""
        return None


TORCH_LINEAR = LinearMethod()


class LinearLayer:
    """A layer whose matmul goes through its `linear_method` (set at load; torch's by default)."""

    linear_method: LinearMethod = TORCH_LINEAR

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.linear_method.apply(self, x, bias)  # type: ignore[arg-type]

    def out_vector_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Load a per-output-channel vector (e.g. int8 weight scales) sharded as this layer's
        output channels are."""
        raise NotImplementedError


def _param(*shape: int, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


class ColumnParallelLinear(LinearLayer, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.out_local = divide(out_features, tp.size, "output features")
        self.weight = _param(self.out_local, in_features, loader=self.weight_loader)
        self.bias = _param(self.out_local, loader=self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * n, n))

    def out_vector_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        self.weight_loader(param, loaded, shard_id)  # the rows' slice (as the bias's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel outputs [a | b | ...] in one matmul; shard_id indexes the part."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool, tp: TPGroup = SINGLE):
        self.local_sizes = [divide(s, tp.size, "output features") for s in sizes]
        super().__init__(in_features, sum(sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        offset = sum(self.local_sizes[:shard_id])
        n = self.local_sizes[shard_id]
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, self.tp.rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TPGroup = SINGLE,
    ):
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size, "attention heads")
        if tp.size >= num_kv_heads:
            # Each rank holds one KV head, shared by tp / kv ranks.
            divide(tp.size, num_kv_heads, "tp (as a multiple of kv heads)")
            self.num_kv_heads = 1
            self.kv_replicas = tp.size // num_kv_heads
        else:
            self.num_kv_heads = divide(num_kv_heads, tp.size, "key/value heads")
            self.kv_replicas = 1
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden, out, bias, tp)

    @property
    def sizes(self) -> tuple[int, int, int]:
        kv = self.num_kv_heads * self.head_dim
        return self.num_heads * self.head_dim, kv, kv

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        q, kv, _ = self.sizes
        if shard_id == "q":
            offset, n, rank = 0, q, self.tp.rank
        else:
            offset = q if shard_id == "k" else q + kv
            n, rank = kv, self.tp.rank // self.kv_replicas
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, rank * n, n))


class RowParallelLinear(LinearLayer, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.in_local = divide(in_features, tp.size, "input features")
        self.weight = _param(out_features, self.in_local, loader=self.weight_loader)
        self.bias = _param(out_features, loader=self._full_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        n = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp.rank * n, n))

    @staticmethod
    def _full_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded)

    def out_vector_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        self._full_loader(param, loaded)  # output channels are whole on every rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self._linear(x, None))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_local = -(-vocab_size // tp.size)  # padded shard; the pad rows stay zero
        self.start = tp.rank * self.vocab_local
        self.weight = _param(self.vocab_local, hidden, loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        n = max(0, min(self.vocab_local, self.vocab_size - self.start))
        param.data.zero_()
        param.data[:n].copy_(loaded.narrow(0, self.start, n))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.vocab_local)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(y)


class ParallelLMHead(LinearLayer, VocabParallelEmbedding):
    """Vocab-parallel output projection; every rank ends with the full logits row."""

    def out_vector_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        self.weight_loader(param, loaded, shard_id)  # this rank's vocab rows, padded

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Each row's argmax token (int64 [rows]) without writing the logits out -- what
        argmax_rows picks from forward(hidden) -- or None where only forward can (tensor
        parallelism, or a linear method without a fused argmax)."""
        if self.tp.size > 1:
            return None
        return self.linear_method.argmax(self, hidden, self.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = self._linear(hidden, None)
        if self.tp.size > 1:
            logits = self.tp.all_gather_last_dim(logits)[..., : self.vocab_size]
        return logits
