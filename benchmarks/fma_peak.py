"""This CPU's float32 FMA peak, and what it allows W1 (issue 24).

    .venv/bin/python benchmarks/fma_peak.py [--threads 2] [--vllm-tok-s 79.9]

Measures the peak with a loop of independent FMAs on registers (12 accumulators, no memory
operands, inline assembly so the compiler cannot fold the chains): AVX2 ymm, or zmm where the
CPU has AVX-512F (that variant was only compiled on the AVX2 machines it was written on). Then counts W1's float32 work exactly (benchmarks/offline_throughput.py's
prompts, seed 0, through SmolLM2-135M's shapes: every linear, the LM head on each sampled
token, attention's QK and PV) and prints the output tokens/s W1 could reach if every FLOP ran at
the peak -- a ceiling no engine reaches, since the GEMM alone runs below it -- and, with
--vllm-tok-s, the fraction of the peak W1 would have to sustain to be 1.25x that figure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HIDDEN, INTER, HEADS_DIM, KV, LAYERS, VOCAB = 576, 1536, 576, 192, 30, 49152

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec + t.tv_nsec * 1e-9; }
#define R(i) "vfmadd231ps %%" REG "14, %%" REG "15, %%" REG #i "\n"
int main(int argc, char** argv) {
  long iters = atol(argv[1]);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    double t0 = now();
#pragma omp parallel
    {
      long n = iters;
      __asm__ volatile(
          "vxorps %%" REG "14, %%" REG "14, %%" REG "14\n"
          "vxorps %%" REG "15, %%" REG "15, %%" REG "15\n"
          "1:\n" R(0) R(1) R(2) R(3) R(4) R(5) R(6) R(7) R(8) R(9) R(10) R(11)
          "dec %0\n jnz 1b\n"
          : "+r"(n) :: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
            "xmm9", "xmm10", "xmm11", "xmm14", "xmm15", "cc");
    }
    double gf = omp_get_max_threads() * (double)iters * 12 * LANES * 2 / (now() - t0) / 1e9;
    if (gf > best) best = gf;
  }
  printf("%.2f\n", best);
  return 0;
}
"""


def has_avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def peak_gflops(threads: list[int]) -> tuple[list[float], str]:
    """The peak on each of `threads` thread counts, and the ISA it was measured with."""
    wide = has_avx512()
    reg, lanes, isa = ("zmm", 16, "AVX-512F") if wide else ("ymm", 8, "AVX2")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        cc = os.environ.get("CC", "gcc")
        flags = ["-O2", "-fopenmp", f'-DREG="{reg}"', f"-DLANES={lanes}"]
        subprocess.run([cc, *flags, str(src), "-o", str(exe)], check=True)
        peaks = []
        for n in threads:
            env = dict(os.environ, OMP_NUM_THREADS=str(n))
            out = subprocess.run([str(exe), "50000000"], env=env, check=True, capture_output=True)
            peaks.append(float(out.stdout))
    return peaks, f"{isa} FMA, {lanes} float32 lanes"


def w1_flops() -> tuple[float, int]:
    """W1's float32 FLOPs through SmolLM2-135M, and its output tokens."""
    sys.path.insert(0, str(Path(__file__).parent))
    from offline_throughput import make_workload, parser

    args = parser().parse_args(["--dtype", "float32"])  # W1 as offline_throughput.py runs it
    wl = make_workload(args)
    linear = (
        2
        * LAYERS
        * (HIDDEN * (HIDDEN + 2 * KV) + HIDDEN * HIDDEN + HIDDEN * 2 * INTER + INTER * HIDDEN)
    )
    head = 2 * HIDDEN * VOCAB
    out_len = wl["output_len"]
    flops = 0.0
    for p in wl["prompts"]:
        fed = len(p) + out_len - 1  # every prompt token, then each output token but the last
        flops += fed * linear + out_len * head
        flops += LAYERS * 4 * HEADS_DIM * fed * (fed + 1) / 2  # QK and PV over each prefix
    return flops, len(wl["prompts"]) * out_len


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--vllm-tok-s", type=float, help="vLLM-CPU's W1 output tok/s to compare")
    args = ap.parse_args()
    (one, peak), isa = peak_gflops([1, args.threads])
    print(f"FMA peak ({isa}): {one:.1f} GFLOP/s on 1 thread, {peak:.1f} on {args.threads}")
    flops, tokens = w1_flops()
    floor_s = flops / (peak * 1e9)
    print(
        f"W1: {flops / 1e12:.2f} TFLOP for {tokens} output tokens; at the peak "
        f"{floor_s:.1f} s, {tokens / floor_s:.1f} output tok/s (the ceiling)"
    )
    if args.vllm_tok_s:
        need = 1.25 * args.vllm_tok_s
        print(
            f"1.25x {args.vllm_tok_s} tok/s = {need:.1f} tok/s needs "
            f"{100 * need / (tokens / floor_s):.0f}% of the FMA peak sustained over all of W1"
        )


if __name__ == "__main__":
    main()
