"""Native CPU kernels, compiled on first use with the machine's own g++ and loaded as torch ops.

`load_cpu_kernels()` builds the `.cpp` files here into one shared library keyed by a hash of
the source, the compiler flags, the torch version and the CPU's feature flags (the code is built
with -march=native), caches it under ``$FLOTILLA_KERNEL_CACHE`` (default
``~/.cache/flotilla/kernels``) and registers the ops (``torch.ops.flotilla.*``: paged decode
and prefill attention, the KV-cache write, norms, rotary, SiLU-and-mul, the AMX linear, bf16
GEMV, a dense model's decoder layers in one call, row argmax, shared-memory collectives).
Builds are serialised across processes with a file lock (Ray starts several ranks at once) and
published by an atomic rename, so a half-written library is never loaded.

No ninja, no pybind11: one g++ call against torch's headers and libraries. The same library
links torch's bundled OpenMP runtime, so `at::parallel_for` shares torch's thread pool.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = [
    _DIR / n
    for n in (
        "cpu_ops.cpp",
        "dense_layers.cpp",
        "gemm_amx.cpp",
        "paged_attention.cpp",
        "prefill_attention.cpp",
        "shm_comm.cpp",
    )
]
_HEADERS = [_DIR / "common.h"]
_FLAGS = [
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fopenmp",
    "-fPIC",
    "-shared",
    "-std=c++17",
    "-w",
]


class KernelBuildError(RuntimeError):
    pass


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def cpu_has_amx() -> bool:
    """The CPU has AMX-BF16 tiles (oneDNN's bf16 GEMMs and our prefill attention use them)."""
    return " amx_bf16" in _cpu_flags()


def cache_dir() -> Path:
    root = (
        os.environ.get("FLOTILLA_KERNEL_CACHE") or Path.home() / ".cache" / "flotilla" / "kernels"
    )
    return Path(root)


def _command(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch.compiled_with_cxx11_abi())
    cmd = [os.environ.get("CXX", "g++"), *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += ["-DTORCH_EXTENSION_NAME=flotilla_cpu", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    for inc in cpp_extension.include_paths():
        cmd += ["-isystem", inc]
    cmd += ["-isystem", _python_include()]
    cmd += [f"-I{_DIR}", *map(str, _SOURCES), "-o", str(out)]
    cmd += [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]
    cmd += ["-lc10", "-ltorch_cpu", "-ltorch"]
    return cmd


def _python_include() -> str:
    import sysconfig

    return sysconfig.get_paths()["include"]


def _key() -> str:
    h = hashlib.sha256()
    parts = [f.read_bytes() for f in _SOURCES + _HEADERS]
    parts += [" ".join(_FLAGS).encode(), torch.__version__.encode(), sys.version.encode()]
    for part in [*parts, _cpu_flags().encode()]:
        h.update(part)
    return h.hexdigest()[:16]


def build() -> Path:
    """Compile (if not cached) and return the library path. Raises KernelBuildError."""
    if platform.system() != "Linux":
        raise KernelBuildError(f"CPU kernels are built on Linux only, not {platform.system()}")
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    lib = d / f"flotilla_cpu_{_key()}.so"
    if lib.exists():
        return lib
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if lib.exists():  # another process built it while we waited
                return lib
            fd, tmp = tempfile.mkstemp(dir=d, suffix=".so.tmp")
            os.close(fd)
            cmd = _command(Path(tmp))
            log.info("building CPU kernels: %s", " ".join(cmd))
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                os.unlink(tmp)
                raise KernelBuildError(f"compiler failed to run: {e}") from e
            if res.returncode != 0:
                os.unlink(tmp)
                raise KernelBuildError(f"g++ exited {res.returncode}:\n{res.stderr[-4000:]}")
            os.replace(tmp, lib)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return lib


@functools.cache
def load_cpu_kernels() -> bool:
    """Build and register the CPU kernels once per process; False (with a warning) if this
    machine cannot build them, so callers fall back to the pure-torch path."""
    if os.environ.get("FLOTILLA_DISABLE_KERNELS") == "1":
        return False
    try:
        torch.ops.load_library(str(build()))
    except (KernelBuildError, OSError, RuntimeError) as e:
        log.warning("CPU paged-attention kernel unavailable, using SDPA gather path: %s", e)
        return False
    return True
