"""Float32 linears: torch's GEMM (MKL) vs torch.ops.flotilla.linear_f32 (dot products on the
plain weight) vs linear_f32_packed (outer products on the weight packed at load), by row count,
over SmolLM2-135M's shapes (30 layers of qkv, o, gate|up, down, and the 49,152-row LM head;
random weights, 2 threads), the time to stream every weight once per row count: what a
float32 step's linears cost. The stack (538 MB) is far larger than the caches, so every call
reads its weight from memory, as in the model. Prints the median of --repeats passes, in
total and (--per-shape) per shape; dispatch.F32_MAX_ROWS / F32Linear's rule come from this.

    .venv/bin/python benchmarks/linear_f32.py [--rows 1,2,4,8,16,32,64] [--repeats 5] [--per-shape]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = {  # name: (K, N)
    "qkv": (HIDDEN, HIDDEN + 2 * KV),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (HIDDEN, 2 * INTER),
    "down": (INTER, HIDDEN),
}
METHODS = ("torch", "f32", "packed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32,48,64,96,128,256,512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--per-shape", action="store_true")
    args = ap.parse_args()
    methods = args.methods.split(",")

    from workers.kernels import load_cpu_kernels

    assert load_cpu_kernels(), "the native kernels did not build"
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    layers = [
        (name, torch.randn(n, k, generator=g))
        for _ in range(LAYERS)
        for name, (k, n) in SHAPES.items()
    ]
    layers.append(("lm_head", torch.randn(VOCAB, HIDDEN, generator=g)))
    packed = (
        {id(w): torch.ops.flotilla.pack_f32(w) for _, w in layers} if "packed" in methods else {}
    )
    assert all(p.numel() for p in packed.values()), "this build has no packed kernel"
    names = [*SHAPES, "lm_head"]
    mb = sum(w.numel() for _, w in layers) * 4 / 1e6
    gflop_per_row = sum(2 * w.numel() for _, w in layers) / 1e9
    print(
        f"{len(layers)} weights, {mb:.0f} MB float32, {args.threads} threads, "
        f"median of {args.repeats}"
    )
    head = " | ".join(f"{m} ms | GF/s" for m in methods)
    print(f"| rows | {head} | best vs torch |")
    print("|---:|" + "---:|---:|" * len(methods) + "---:|")
    shape_rows = []
    for m in map(int, args.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g) for k in (HIDDEN, INTER)}
        outs = {id(w): torch.empty(m, w.shape[0]) for _, w in layers}
        med, shape_med = {}, {}
        for meth in methods:
            totals, per = [], {n: [] for n in names}
            for _ in range(args.repeats):
                t = dict.fromkeys(names, 0.0)
                for name, w in layers:
                    x, out = xs[w.shape[1]], outs[id(w)]
                    t0 = time.perf_counter()
                    if meth == "torch":
                        torch.nn.functional.linear(x, w)
                    elif meth == "f32":
                        assert torch.ops.flotilla.linear_f32(out, x, w, None)
                    else:
                        assert torch.ops.flotilla.linear_f32_packed(out, x, packed[id(w)], None)
                    t[name] += time.perf_counter() - t0
                totals.append(sum(t.values()))
                for n in names:
                    per[n].append(t[n])
            med[meth] = statistics.median(totals)
            shape_med[meth] = {n: statistics.median(v) for n, v in per.items()}
        cells = " | ".join(
            f"{med[k] * 1e3:.1f} | {gflop_per_row * m / med[k]:.0f}" for k in methods
        )
        best = min(methods, key=med.get)
        ratio = f"{best} {med['torch'] / med[best]:.2f}x" if "torch" in med else best
        print(f"| {m} | {cells} | {ratio} |", flush=True)
        shape_rows.append((m, shape_med))
    if args.per_shape:
        print("\nper shape, ms (median): " + " / ".join(methods))
        print("| rows | " + " | ".join(names) + " |")
        print("|---:|" + "---|" * len(names))
        for m, sm in shape_rows:
            cells = " | ".join(" / ".join(f"{sm[k][n] * 1e3:.1f}" for k in methods) for n in names)
            print(f"| {m} | {cells} |")


if __name__ == "__main__":
    main()
