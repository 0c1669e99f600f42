"""Prefill attention over the int8 KV cache: the native kernel (paged_prefill_attention reading
the int8 rows in place, prefill_attention_f32.cpp) against the path it replaces (SDPA on the
blocks gathered and dequantized by workers/kv_int8.gather), and the float32 cache's kernel.

Command (from the repo root):
    .venv/bin/python benchmarks/prefill_attention_int8.py [--threads 1] [--repeats 20]

Shape: one prefill chunk of --tokens (512) after --context (0) cached tokens, SmolLM2-135M's
attention (9 query heads, 3 KV heads, head dim 64), float32 queries, blocks of 16 tokens on
shuffled block ids. Each path is the whole `paged_attention` call for the step with the chunk's
K/V already in the cache (k = v = None), so the native side includes its q copy and output
allocation, the fallback its gathers, dequantization and output copy. Prints the best of
--repeats in ms per call (one layer).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers import kv_int8  # noqa: E402
from workers.attention import build_metadata, paged_attention  # noqa: E402
from workers.kernels import load_cpu_kernels  # noqa: E402

H, KVH, D, BS = 9, 3, 64, 16


def best_ms(fn, repeats: int) -> float:
    fn()  # warm up (page faults, first-call set-up)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--context", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    assert load_cpu_kernels(), "the native kernels did not build"
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, sp = args.tokens, args.context
    nblocks = -(-(sp + n) // BS)
    table = torch.randperm(nblocks + 4, generator=g)[:nblocks].tolist()
    positions = list(range(sp, sp + n))
    slots = [table[p // BS] * BS + p % BS for p in positions]
    x = torch.randn(2, nblocks + 4, BS, KVH, D, generator=g)
    caches = {"int8": kv_int8.quantize(x), "float32": x}
    q = torch.randn(n, H, D, generator=g)
    metas = {
        native: build_metadata(positions, slots, [], [], [(0, n, sp, table)], BS, q.device, native)
        for native in (True, False)
    }

    def run(cache, native):
        return lambda: paged_attention(q, None, None, cache, metas[native], D**-0.5, None)

    print(f"{n}-token chunk after {sp} cached, {H}/{KVH} heads x {D}, {args.threads} thread(s)")
    rows = [
        ("int8 cache, native kernel", caches["int8"], True),
        ("int8 cache, SDPA over dequantized gathers", caches["int8"], False),
        ("float32 cache, native kernel", caches["float32"], True),
        ("float32 cache, SDPA", caches["float32"], False),
    ]
    outs = {}
    for name, cache, native in rows:
        ms = best_ms(run(cache, native), args.repeats)
        outs[name] = run(cache, native)()
        print(f"  {name:45s} {ms:8.3f} ms")
    a, b = (outs[r[0]] for r in rows[:2])
    print(f"  (int8 native vs SDPA: max |diff| {(a - b).abs().max().item():.2e})")


if __name__ == "__main__":
    main()
