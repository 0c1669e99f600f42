"""Float32 decode linears: torch's GEMM (MKL) vs torch.ops.flotilla.linear_f32 at 1-128 rows,
over SmolLM2-135M's shapes (30 layers of qkv, o, gate|up, down, and the 49,152-row LM head;
random weights, 2 threads), the time to stream every weight once per row count: what a
float32 decode step's linears cost (dispatch.F32_MAX_ROWS is where the kernel stops paying).

    .venv/bin/python benchmarks/linear_f32.py [--rows 1,2,4,8,16,32,64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,24,32,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from workers.kernels import load_cpu_kernels

    assert load_cpu_kernels(), "the native kernels did not build"
    torch.set_num_threads(args.threads)
    shapes = [(HIDDEN, HIDDEN + 2 * KV), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)]
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=g) for _ in range(LAYERS) for i, o in shapes]
    weights.append(torch.randn(VOCAB, HIDDEN, generator=g))
    mb = sum(w.numel() for w in weights) * 4 / 1e6
    print(f"{len(weights)} weights, {mb:.0f} MB float32, {args.threads} threads")
    print("| rows | torch F.linear ms | GB/s | linear_f32 ms | GB/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for m in map(int, args.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g) for k in (HIDDEN, INTER)}
        outs = {id(w): torch.empty(m, w.shape[0]) for w in weights}
        best = {}
        for name in ("torch", "f32"):
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for w in weights:
                    x = xs[w.shape[1]]
                    if name == "torch":
                        torch.nn.functional.linear(x, w)
                    else:
                        assert torch.ops.flotilla.linear_f32(outs[id(w)], x, w, None)
                dt = time.perf_counter() - t0
                best[name] = min(best.get(name, dt), dt)
        t, f = best["torch"], best["f32"]
        print(
            f"| {m} | {t * 1e3:.1f} | {mb / t / 1e3:.1f} | {f * 1e3:.1f} | {mb / f / 1e3:.1f} | "
            f"{t / f:.2f}x |"
        )


if __name__ == "__main__":
    main()
