"""The model's native CPU kernels, compiled on first use and loaded as torch ops.

`load_cpu_kernels()` builds the `.cpp` files here into one shared library with the tree's one
builder (parallel/native_build.py: cache, lock, target knob) and registers the ops
(``torch.ops.flotilla.*``: paged decode and prefill attention, the KV-cache write, decode
attention over and writes into the int8 KV cache, norms, rotary, SiLU-and-mul, the AMX
linear, bf16 GEMV, the weight-only int8 linear, a dense model's decoder layers in one call, row argmax, and `build_info`, which says what the library was
compiled for). Which of them a model uses is decided in one place, workers/kernels/dispatch.py;
README.md here has the op x ISA table.
"""

from __future__ import annotations

from pathlib import Path

from parallel import native_build
from parallel.native_build import KernelBuildError

__all__ = ["CPU_KERNELS", "KernelBuildError", "build", "load_cpu_kernels"]

_DIR = Path(__file__).parent

CPU_KERNELS = native_build.NativeLib(
    "flotilla_cpu",
    sources=tuple(
        _DIR / n
        for n in (
            "build_info.cpp",
            "cpu_ops.cpp",
            "dense_layers.cpp",
            "gemm_amx.cpp",
            "gemm_f32.cpp",
            "gemm_w8.cpp",
            "paged_attention.cpp",
            "paged_attention_int8.cpp",
            "prefill_attention.cpp",
            "prefill_attention_f32.cpp",
        )
    ),
    headers=tuple(
        _DIR / n
        for n in (
            "common.h",
            "attend_avx2.h",
            "attend_avx512.h",
            "cache_rows.h",
            "decode_attention.h",
            "gemm_f32_tile.h",
            "row_cursor.h",
        )
    ),
    include_dirs=(_DIR,),
)


def build() -> Path:
    """Compile (if not cached) and return the library path. Raises KernelBuildError."""
    return native_build.build(CPU_KERNELS)


def load_cpu_kernels() -> bool:
    """Build and register the CPU kernels once per process; False (with a warning) if this
    machine cannot build them, so callers fall back to the pure-torch path."""
    return native_build.load(CPU_KERNELS)
