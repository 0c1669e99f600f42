"""Native libraries of torch ops, compiled on first use with the machine's own g++.

One build function for every native library in the tree (parallel/kernels' shared-memory
collectives, workers/kernels' model kernels): `build(lib)` compiles a `NativeLib`'s sources
into one shared library keyed by a hash of the sources and headers, the compiler flags, the
torch and Python versions and the CPU's feature flags; caches it under the cache folder; and
`load(lib)` registers its ops once per process. Builds are serialised across processes with a
file lock (Ray starts several ranks at once) and published by an atomic rename, so a
half-written library is never loaded.

No ninja, no pybind11: g++ against torch's headers and libraries, one compile per core (side
by side; each compiles its share of the sources as one unit that #includes them, because
parsing torch's headers is most of a source's compile) and one link. The library links
torch's bundled OpenMP runtime, so `at::parallel_for` shares torch's thread pool.

Knobs (environment variables, read only here):
  FLOTILLA_KERNEL_CACHE       the cache folder (default ~/.cache/flotilla/kernels)
  FLOTILLA_KERNEL_TARGET      what to compile for: `native` (default, -march=native), any
                              -march value (`x86-64-v3`, `cooperlake`, ...: the paths of a lower
                              CPU, e.g. to test them), or `portable` (the compiler's default
                              target with -DFLOTILLA_PORTABLE: the scalar paths only, no x86
                              intrinsics)
  FLOTILLA_DISABLE_KERNELS=1  load nothing; callers take their torch paths
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
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNELS_DIR = Path(__file__).parent / "kernels"  # isa.h, dtypes.h: shared by every library

# -ffp-contract=off: no fused multiply-adds the source did not write, so the elementwise kernels
# round step by step like torch's eager code. -Wall: the sources build warning-free on every
# target (tests/parallel/test_kernel_targets.py compiles them for several).
_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-fPIC", "-std=c++17", "-Wall"]


class KernelBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class NativeLib:
    """One shared library: its .cpp files, the headers they include (for the cache key) and
    the folders on its include path."""

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...] = ()
    include_dirs: tuple[Path, ...] = ()


def target() -> str:
    return os.environ.get("FLOTILLA_KERNEL_TARGET") or "native"


def target_flags(name: str) -> list[str]:
    """The compiler flags that select what the code is built for (see the module doc)."""
    if name == "portable":
        return ["-DFLOTILLA_PORTABLE"]
    return [f"-march={name}"]


def cache_dir() -> Path:
    root = (
        os.environ.get("FLOTILLA_KERNEL_CACHE") or Path.home() / ".cache" / "flotilla" / "kernels"
    )
    return Path(root)


def compile_flags(lib: NativeLib, target_name: str) -> list[str]:
    """Everything but the optimisation level, inputs and output: also what the compile-matrix
    test uses, so it checks the flags the real build uses."""
    from torch.utils import cpp_extension

    abi = int(torch.compiled_with_cxx11_abi())
    flags = [*_FLAGS[1:], *target_flags(target_name), f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    flags += [f"-DTORCH_EXTENSION_NAME={lib.name}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    for inc in cpp_extension.include_paths():
        flags += ["-isystem", inc]
    flags += ["-isystem", sysconfig.get_paths()["include"]]
    flags += [f"-I{d}" for d in (*lib.include_dirs, KERNELS_DIR)]
    return flags


def _units(lib: NativeLib, work: Path) -> list[Path]:
    """The sources split into one compile unit per core (fewer when there are fewer sources).
    Each source's compile is mostly torch's headers (~8 s), its own code a few seconds, so
    a 2-core machine building 10 sources parses the headers twice instead of ten times. A
    unit of several sources is a file that #includes them (they build as one unit: file-local
    names stay distinct, tests/workers/test_kernel_targets.py compiles them all so); a unit of
    one is the source itself. Sources go largest first to the least loaded unit."""
    n = max(1, min(len(lib.sources), os.cpu_count() or 1))
    shares: list[list[Path]] = [[] for _ in range(n)]
    load = [0] * n
    for src in sorted(lib.sources, key=lambda f: f.stat().st_size, reverse=True):
        i = load.index(min(load))
        shares[i].append(src)
        load[i] += src.stat().st_size
    units = []
    for i, share in enumerate(shares):
        if len(share) == 1:
            units.append(share[0])
            continue
        unit = work / f"unit{i}.cpp"
        unit.write_text("".join(f'#include "{src.resolve()}"\n' for src in share))
        units.append(unit)
    return units


def _compile_commands(lib: NativeLib, units: list[Path], objs: list[Path]) -> list[list[str]]:
    """One g++ -c per unit: they run side by side."""
    base = [os.environ.get("CXX", "g++"), _FLAGS[0], "-c", *compile_flags(lib, target())]
    return [[*base, str(src), "-o", str(o)] for src, o in zip(units, objs, strict=True)]


def _link_command(lib: NativeLib, objs: list[Path], out: Path) -> list[str]:
    torch_lib = Path(torch.__file__).parent / "lib"
    cmd = [os.environ.get("CXX", "g++"), "-shared", "-fopenmp", *map(str, objs), "-o", str(out)]
    cmd += [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch"]
    return cmd


def _run_all(cmds: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run the commands, as many at once as this machine has cores."""
    from concurrent.futures import ThreadPoolExecutor

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    with ThreadPoolExecutor(max_workers=max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
        return list(pool.map(run, cmds))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, aarch64
                return line
    except OSError:
        pass
    return platform.processor()


def _key(lib: NativeLib) -> str:
    h = hashlib.sha256()
    headers = sorted({*lib.headers, *KERNELS_DIR.glob("*.h")})
    for f in [*lib.sources, *headers]:
        h.update(f.read_bytes())
    flags = [*_FLAGS, *target_flags(target())]
    for part in (" ".join(flags), torch.__version__, sys.version, _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build(lib: NativeLib) -> Path:
    """Compile `lib` (if not cached) and return its path. Raises KernelBuildError."""
    if platform.system() != "Linux":
        raise KernelBuildError(f"native kernels are built on Linux only, not {platform.system()}")
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{lib.name}_{_key(lib)}.so"
    if out.exists():
        return out
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if out.exists():  # another process built it while we waited
                return out
            with tempfile.TemporaryDirectory(dir=d) as work:
                units = _units(lib, Path(work))
                objs = [Path(work) / f"{i}_{src.stem}.o" for i, src in enumerate(units)]
                tmp = Path(work) / "lib.so"
                compiles = _compile_commands(lib, units, objs)
                log.info("building %s: %s", lib.name, " ".join(compiles[0]))
                try:
                    results = _run_all(compiles)
                    failed = [r for r in results if r.returncode != 0]
                    if not failed:
                        results.append(_run_all([_link_command(lib, objs, tmp)])[0])
                        failed = [r for r in results if r.returncode != 0]
                except (OSError, subprocess.TimeoutExpired) as e:
                    raise KernelBuildError(f"compiler failed to run: {e}") from e
                if failed:
                    r = failed[0]
                    raise KernelBuildError(f"g++ exited {r.returncode}:\n{r.stderr[-4000:]}")
                warnings = "".join(r.stderr for r in results).strip()
                if warnings:
                    log.warning("%s built with warnings:\n%s", lib.name, warnings[-4000:])
                os.replace(tmp, out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@functools.cache
def load(lib: NativeLib) -> bool:
    """Build and register `lib`'s ops once per process; False (with a warning) if this
    machine cannot build or load it, so callers fall back to their torch paths."""
    if os.environ.get("FLOTILLA_DISABLE_KERNELS") == "1":
        return False
    try:
        torch.ops.load_library(str(build(lib)))
    except (KernelBuildError, OSError, RuntimeError) as e:
        log.warning("native library %s unavailable, using the torch paths: %s", lib.name, e)
        return False
    return True
