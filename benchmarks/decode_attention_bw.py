"""Decode attention against the memory it streams: the paged decode kernel next to a plain read
of the same bytes in the same order.

Command (from the repo root):
    .venv/bin/python benchmarks/decode_attention_bw.py

Shape: the offline benchmark's decode batch at its average context -- 64 sequences of 32..512
prompt tokens + 64 generated (seeded), SmolLM2-135M's attention (9 query heads, 3 KV heads,
head dim 64, bf16 or --dtype float32), blocks of 16 tokens, 30 layers' caches (each call reads
a different layer's, as a decode step does: the caches do not fit in cache). --placement sets where a
sequence's blocks lie: "contiguous" (in order, back to back), "decode-scattered" (the last 4
blocks -- the 64 generated tokens' -- at random places, as a fresh engine allocates them:
prompts get runs of consecutive blocks, decode steps one block at a time), "scattered" (every
block at a random place, as after the cache has cycled).
Prints microseconds per layer and GB/s of K/V read for:
  - kernel: torch.ops.flotilla.paged_decode_attention (workers/kernels/paged_attention.cpp);
  - read: a C++ loop (built here with $CXX or g++) that only loads the same K and V rows
    block by block, one load per 64-byte line, on the same 2 threads;
  - one-layer: the kernel on one layer's cache, called repeatedly (partly cache-resident).
The gap between kernel and read is the time the kernel spends beyond what its bytes need
(benchmarks/history/sessions-1-10.md, sessions 8 and 9, for what did and did not narrow it).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.kernels import load_cpu_kernels  # noqa: E402

READER = r"""
#include <cstdint>
// Loads len[i] rows of row_bytes from the K and V blocks of every sequence i, block by block
// (K block, then V block), one 8-byte load per 64-byte line, sequences round-robin over the
// OpenMP threads. Returns a checksum (so that the loads stay).
extern "C" uint64_t read_kv(const char* k, const char* v, const int32_t* tables,
                            const int32_t* lens, int n, int max_blocks, int bs, int row_bytes) {
  uint64_t sink = 0;
#pragma omp parallel for schedule(static, 1) reduction(^ : sink)
  for (int i = 0; i < n; ++i) {
    uint64_t acc = 0;
    for (int b = 0; b * bs < lens[i]; ++b) {
      const int64_t off = (int64_t)tables[i * max_blocks + b] * bs * row_bytes;
      const int rows = lens[i] - b * bs < bs ? lens[i] - b * bs : bs;
      for (int64_t o = 0; o < (int64_t)rows * row_bytes; o += 64)
        acc ^= *(const uint64_t*)(k + off + o);
      for (int64_t o = 0; o < (int64_t)rows * row_bytes; o += 64)
        acc ^= *(const uint64_t*)(v + off + o);
    }
    sink ^= acc;
  }
  return sink;
}
"""


def build_reader() -> ctypes.CDLL:
    d = Path(tempfile.mkdtemp(prefix="flotilla-bw-"))
    (d / "read.cpp").write_text(READER)
    cxx = os.environ.get("CXX", "g++")
    cmd = [
        cxx,
        "-O2",
        "-fopenmp",
        "-fPIC",
        "-shared",
        str(d / "read.cpp"),
        "-o",
        str(d / "read.so"),
    ]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(d / "read.so"))
    shutil.rmtree(d)  # loaded: the files can go
    lib.read_kv.restype = ctypes.c_uint64
    return lib


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--placement", default="contiguous", choices=["contiguous", "decode-scattered", "scattered"]
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # the reader's OpenMP loop shares torch's libgomp
    if not load_cpu_kernels():
        sys.exit("the native kernels did not build")
    rng = random.Random(0)
    dtype = getattr(torch, args.dtype)
    n, H, KVH, D, bs, L = args.seqs, 9, 3, 64, 16, args.layers
    lens = [rng.randint(32, 512) + 64 for _ in range(n)]
    nblk = [-(-x // bs) for x in lens]
    per_layer = sum(nblk)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(per_layer * L, bs, KVH, D, generator=g).to(dtype)
    v = torch.randn(per_layer * L, bs, KVH, D, generator=g).to(dtype)
    tables = []
    for layer in range(L):
        t = torch.zeros(n, max(nblk), dtype=torch.int32)
        c = layer * per_layer
        for i in range(n):
            t[i, : nblk[i]] = torch.arange(c, c + nblk[i], dtype=torch.int32)
            c += nblk[i]
        tables.append(t)
    if args.placement != "contiguous":  # the chosen blocks trade places among themselves
        tail = 4 if args.placement == "decode-scattered" else 0  # 0: every block
        picked = torch.cat([t[i, : nblk[i]][-tail:] for t in tables for i in range(n)])
        place = dict(
            zip(
                picked.tolist(),
                picked[torch.randperm(len(picked), generator=g)].tolist(),
                strict=True,
            )
        )
        for t in tables:
            t.apply_(lambda b: place.get(b, b))
    cl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(n, H, D, generator=g).to(dtype)
    out = torch.empty_like(q)
    op = torch.ops.flotilla.paged_decode_attention
    reader = build_reader()
    esize = torch.empty(0, dtype=dtype).element_size()
    kv_bytes = sum(lens) * KVH * D * 2 * esize  # K and V

    def kernel(layers):
        for t in layers:
            op(out, q, k, v, t, cl, D**-0.5, 0)

    def read(layers):
        for t in layers:
            reader.read_kv(
                ctypes.c_void_p(k.data_ptr()),
                ctypes.c_void_p(v.data_ptr()),
                ctypes.c_void_p(t.data_ptr()),
                ctypes.c_void_p(cl.data_ptr()),
                n,
                t.shape[1],
                bs,
                KVH * D * esize,
            )

    cases = {
        "kernel": (kernel, tables),
        "read": (read, tables),
        "one-layer": (kernel, tables[:1] * L),
    }
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(args.rounds):  # interleaved, so that the VM's bandwidth drift hits all alike
        for name, (fn, layers) in cases.items():
            t0 = time.perf_counter()
            fn(layers)
            times[name].append((time.perf_counter() - t0) / len(layers))
    print(
        f"{n} sequences, average context {sum(lens) / n:.0f}, {kv_bytes / 1e6:.1f} MB of K/V per layer, "
        f"blocks {args.placement}, {args.threads} threads, median of {args.rounds} rounds"
    )
    print("| case | us per layer | GB/s |\n|---|---:|---:|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t * 1e6:.0f} | {kv_bytes / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
