"""Which kernel path each op takes on this rank: decided once, here, from the library's own
report (torch.ops.flotilla.build_info: the ISA paths compiled in, the CPU's features at run
time, Linux's AMX permission) and `model.kernels`.

The model runner builds one `KernelPlan` at start-up and everything else reads it: the model's
modules (norms, rotary, SiLU, attention), the linear methods attached at load
(workers/linear_methods.py: AMX, GEMV, oneDNN-prepacked, torch), the one-call dense forward and
the fused greedy head. A path is taken only where the library has it compiled *and* the CPU
has the instructions; a library compiled for instructions the CPU lacks is not used at all
(any of its loops may have been vectorised with them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildInfo:
    """What torch.ops.flotilla.build_info() reports (see workers/kernels/build_info.cpp)."""

    compiled: frozenset[str]  # the target's ISA features (compiler macros), e.g. "avx512bf16"
    paths: frozenset[str]  # kernel paths compiled in: "x86", "avx2", "avx512", ...
    cpu: frozenset[str]  # the CPU's features at run time
    amx_permitted: bool  # Linux granted the AMX tile data to this process

    @classmethod
    def parse(cls, text: str) -> BuildInfo:
        d = json.loads(text)
        return cls(
            frozenset(d["compiled"]), frozenset(d["paths"]), frozenset(d["cpu"]), d["amx_permitted"]
        )

    @classmethod
    def query(cls) -> BuildInfo:
        """The loaded library's report (load_cpu_kernels() first)."""
        return cls.parse(torch.ops.flotilla.build_info())

    @property
    def runs_here(self) -> bool:
        """Every instruction set the library was compiled for is on this CPU."""
        return self.compiled <= self.cpu


def cpu_has_fast_bf16() -> bool:
    """torch's oneDNN has bf16 GEMMs here (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


W8_MAX_ROWS = 32
"""Up to this many rows an int8-weight linear runs on linear_w8; past it the float GEMM on the
weight dequantized once per call wins (AVX2 EPYC, float32, [M, 576] x [1536, 576] and
[M, 1536] x [576, 1536], one thread: 0.89 vs 0.94 ms at 32 rows, 1.8 vs 1.6 ms at 64; measured
against torch's GEMM, before linear_w8_gemm took those rows: the crossover may now be lower)."""


F32_MAX_ROWS = 16
"""Up to this many rows an unpacked float32 linear (model.prepack off) runs on linear_f32;
past it torch's GEMM catches up (AVX2 EPYC, SmolLM2-135M's linears and LM head, 2 threads: 22
vs 38 ms at 1 row, 32 vs 67 at 8, 72 vs 91 at 16, 136 vs 122 at 32; benchmarks/RESULTS.md)."""


F32_DOT_ROWS = 0
"""With float32 weights packed at load (model.prepack): up to this many rows linear_f32 on the
plain weight still beats linear_f32_packed (0: never, and the plain weight is dropped)."""


@dataclass(frozen=True)
class KernelPlan:
    """Each op's path on this rank. All False: the plain torch code everywhere."""

    native: bool = False  # norms, rotary, SiLU-and-mul, KV write, decode attention, row argmax
    prefill_attention: bool = False  # paged_prefill_attention takes bf16 (AVX512-BF16, AMX)
    prefill_attention_f32: bool = False  # ... and float32, over float32 / int8 caches (AVX2+FMA)
    amx: bool = False  # AMX tiles: packed linears, fused SwiGLU, greedy head
    gemv_bf16: bool = False  # small-batch bf16 linears by gemv_bf16 (AVX512-BF16)
    gemv_max_rows: int = 0  # ... up to this many rows (oneDNN wins past it)
    onednn_bf16: bool = False  # torch's oneDNN bf16 GEMM: prepacked weights pay off
    w8: bool = False  # int8-weight linears by linear_w8 (AVX2+FMA or AVX-512 path)
    w8_max_rows: int = 0  # ... up to this many rows (torch on the dequantized weight past it)
    f32: bool = False  # float32 linears by linear_f32 (the same loop with float32 weights)
    f32_max_rows: int = 0  # ... up to this many rows (torch's GEMM past it)
    f32_packed: bool = False  # float32 weights packed at load for linear_f32_packed (any rows)
    f32_dot_rows: int = 0  # ... but linear_f32 up to this many rows

    @property
    def dense_layers(self) -> bool:
        """The one-call forward (its linears: the AMX kernel's, the packed float32 GEMM's or
        the int8 kernels'; a model whose linears are none of these keeps the modules)."""
        return self.amx or self.f32_packed or self.w8

    @property
    def greedy_head(self) -> bool:
        """The LM head's fused linear + argmax (amx_argmax)."""
        return self.amx

    @classmethod
    def from_info(cls, info: BuildInfo, onednn_bf16: bool) -> KernelPlan:
        if not info.runs_here:
            log.warning(
                "native kernels built for %s, but this CPU lacks %s: using the torch paths",
                sorted(info.compiled),
                sorted(info.compiled - info.cpu),
            )
            return cls(onednn_bf16=onednn_bf16)
        bf16 = "avx512_bf16" in info.paths and "avx512bf16" in info.cpu
        amx = bf16 and "amx" in info.paths and "amx-bf16" in info.cpu and info.amx_permitted
        # Up to this many rows the native GEMV beats oneDNN (benchmarks/RESULTS.md): on an
        # AVX512-BF16 CPU without AMX, 8.8 vs 13.1 ms for SmolLM2's layers at 1 row and 11.5
        # vs 13.5 at 4 (oneDNN wins from ~6); with AMX (oneDNN uses it whatever our build),
        # oneDNN's tile GEMM wins from 2 rows (13.3 vs 16.4 ms at 1 row, 16.1 vs 20.0 at 4).
        rows = 1 if "amx-bf16" in info.cpu else 4
        w8 = bool({"avx2", "avx512"} & info.paths)
        return cls(
            native=True,
            prefill_attention=bf16,
            prefill_attention_f32=w8,
            amx=amx,
            gemv_bf16=bf16,
            gemv_max_rows=rows if bf16 else 0,
            onednn_bf16=onednn_bf16,
            w8=w8,
            w8_max_rows=W8_MAX_ROWS if w8 else 0,
            f32=w8,
            f32_max_rows=F32_MAX_ROWS if w8 else 0,
            f32_packed=w8,
            f32_dot_rows=F32_DOT_ROWS if w8 else 0,
        )


def decide(choice: str, device: torch.device) -> KernelPlan:
    """The plan for `model.kernels` = choice (torch | native | auto) on `device`. Raises
    ValueError where `native` cannot be honoured."""
    from workers.kernels import load_cpu_kernels

    cpu = device.type == "cpu"
    onednn = cpu and cpu_has_fast_bf16()
    if choice == "torch":
        return KernelPlan(onednn_bf16=onednn)
    if not cpu:
        if choice == "native":
            raise ValueError(f"kernels='native' needs device 'cpu', not {device}")
        return KernelPlan()
    if not load_cpu_kernels():
        if choice == "native":
            raise ValueError("kernels='native': the CPU kernels did not build (see the log)")
        return KernelPlan(onednn_bf16=onednn)
    plan = KernelPlan.from_info(BuildInfo.query(), onednn)
    if choice == "native" and not plan.native:
        raise ValueError("kernels='native': the CPU kernels were built for another CPU")
    return plan
