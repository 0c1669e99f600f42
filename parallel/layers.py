"""Megatron-style tensor-parallel layers that take their process group explicitly.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's
slice out of the full checkpoint tensor, so sharded loading stays next to the layer that knows
the layout. With `tp.size == 1` every layer is a plain dense layer and no collective runs.

- ColumnParallelLinear: output features split; output stays sharded (no communication).
- MergedColumnParallelLinear: several column-parallel outputs fused in one matmul (gate|up).
- QKVParallelLinear: q|k|v fused; KV heads split across ranks, replicated when tp > kv heads.
- RowParallelLinear: input features split; the all-reduce is inside; bias added once, after it.
- VocabParallelEmbedding / ParallelLMHead: vocabulary split; embedding all-reduced, logits gathered.
"""

from __future__ import annotations

import functools
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


def _cpu_bf16_packable(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@functools.cache
def gemv_max_rows() -> int:
    """Up to this many rows the native GEMV beats oneDNN (benchmarks/RESULTS.md): on an
    AVX512-BF16 CPU without AMX, 8.8 vs 13.1 ms for SmolLM2's layers at 1 row and 11.5 vs 13.5
    at 4 (oneDNN wins from ~6); with AMX, oneDNN's tile GEMM wins from 2 rows (13.3 vs 16.4 ms
    at 1 row, 16.1 vs 20.0 at 4)."""
    from workers.kernels import cpu_has_amx

    return 1 if cpu_has_amx() else 4


def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x @ w.T for a few bf16 rows on the CPU, streaming w at memory bandwidth; None when the
    native op does not apply (dtype, device, no AVX512-BF16)."""
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.device.type != "cpu":
        return None
    out = x.new_empty(x.shape[0], w.shape[0])
    return out if torch.ops.flotilla.gemv_bf16(out, x.contiguous(), w) else None


AMX_MAX_ROWS = 256
"""Up to this many rows a linear runs on our AMX kernel (torch.ops.flotilla.amx_linear); past
it torch's linear (oneDNN's AMX GEMM) is as fast or faster (benchmarks/RESULTS.md)."""


def amx_pack(w: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 -> the AMX B-tile panels amx_linear reads: [N/32, K/32, 2, 16, 32], element
    (p, kb, t, r, 2c + l) = w[32p + 16t + c, 32kb + 2r + l], zero-padded to multiples of 32."""
    n, k = w.shape
    np_, kp = -(-n // 32) * 32, -(-k // 32) * 32
    w = F.pad(w, (0, kp - k, 0, np_ - n))
    w = w.view(np_ // 32, 2, 16, kp // 32, 16, 2).permute(0, 3, 1, 4, 2, 5)
    return w.contiguous().view(np_ // 32, kp // 32, 2, 16, 32)


def amx_pack_swiglu(w: torch.Tensor) -> torch.Tensor:
    """gate|up [2I, K] -> panels whose first tile holds 16 gate columns and second tile the same
    16 up columns, for amx_swiglu (I a multiple of 16)."""
    n2, k = w.shape
    i = n2 // 2
    pairs = torch.stack((w[:i].view(i // 16, 16, k), w[i:].view(i // 16, 16, k)), dim=1)
    return amx_pack(pairs.reshape(n2, k))


class _Packable:
    """Linear layers on a bf16-capable CPU keep a second, packed copy of their weight after
    loading. With AMX (and the native kernels) it is the tile layout of our AMX kernel, used up
    to AMX_MAX_ROWS rows; otherwise a oneDNN-prepacked copy, which skips oneDNN's per-call
    reorder (~1.3-1.8x faster per matmul there). Same code path on CUDA: nothing is packed."""

    _packed: torch.Tensor | None = None
    _amx: torch.Tensor | None = None
    _amx_bias: torch.Tensor | None = None
    # gate|up of a SwiGLU MLP (set by the MLP): packed for amx_swiglu instead, which the MLP
    # calls itself; this layer's own calls then take torch's linear
    swiglu = False
    _amx_swiglu: torch.Tensor | None = None
    native = False  # small batches through torch.ops.flotilla.gemv_bf16 (workers/kernels)

    def pack_for_cpu(self, amx: bool = False, batch_hint: int = 64) -> bool:
        w = self.weight  # type: ignore[attr-defined]
        if not _cpu_bf16_packable(w):
            return False
        if amx and self.swiglu:
            self._amx_swiglu = amx_pack_swiglu(w.detach())
            return True
        if amx:
            self._amx = amx_pack(w.detach())
            bias = getattr(self, "bias", None)
            self._amx_bias = None if bias is None else bias.detach().float()
            return True
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_hint)
        return True

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._amx is not None and x.dim() == 2 and x.shape[0] <= AMX_MAX_ROWS:
            if x.dtype == torch.bfloat16 and x.device.type == "cpu":
                out = x.new_empty(x.shape[0], self.weight.shape[0])  # type: ignore[attr-defined]
                b = None if bias is None else self._amx_bias
                if torch.ops.flotilla.amx_linear(out, x.contiguous(), self._amx, b):
                    return out
        elif self.native and x.dim() == 2 and x.shape[0] <= gemv_max_rows():
            y = _gemv(x, self.weight)  # type: ignore[attr-defined]
            if y is not None:
                return y if bias is None else y + bias
        if self._packed is not None and x.dtype == torch.bfloat16 and x.dim() == 2:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")
        return F.linear(x, self.weight, bias)  # type: ignore[attr-defined]


def pack_linears(model: nn.Module, amx: bool = False) -> int:
    """Pack every packable linear of `model` (for our AMX kernel if `amx`, else for oneDNN);
    returns how many were packed."""
    return sum(1 for m in model.modules() if isinstance(m, _Packable) and m.pack_for_cpu(amx))


def _param(*shape: int, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


class ColumnParallelLinear(_Packable, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.out_local = divide(out_features, tp.size, "output features")
        self.weight = _param(self.out_local, in_features, loader=self.weight_loader)
        self.bias = _param(self.out_local, loader=self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * n, n))

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


class RowParallelLinear(_Packable, nn.Module):
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


class ParallelLMHead(_Packable, VocabParallelEmbedding):
    """Vocab-parallel output projection; every rank ends with the full logits row."""

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Each row's argmax token (int64 [rows]) without writing the logits out -- what
        argmax_rows picks from forward(hidden) -- or None where only forward can (no AMX
        packing, tensor parallelism, past AMX_MAX_ROWS rows)."""
        if (
            self._amx is None
            or self.tp.size > 1
            or hidden.dim() != 2
            or hidden.shape[0] > AMX_MAX_ROWS
            or hidden.dtype != torch.bfloat16
            or hidden.device.type != "cpu"
        ):
            return None
        out = torch.empty(hidden.shape[0], dtype=torch.long)
        ok = torch.ops.flotilla.amx_argmax(out, hidden.contiguous(), self._amx, self.vocab_size)
        return out if ok else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = self._linear(hidden, None)
        if self.tp.size > 1:
            logits = self.tp.all_gather_last_dim(logits)[..., : self.vocab_size]
        return logits
