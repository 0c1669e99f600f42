"""The KV block manager's own cost: building one for N blocks, a churn of requests (prefix
lookups, allocation, hashing, frees, LRU eviction once the cache is full) and one block audit.

    .venv/bin/python benchmarks/block_manager.py [--blocks 4096,175000] [--requests 20000]

175,000 is what the default cache size gives the tests' tiny seeded models on a 24 GiB host;
a few thousand is what SmolLM2 gets. Pure Python, one core; prints one line per size.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.block_manager import BlockManager  # noqa: E402

BLOCK_SIZE, DECODE, RUNNING = 16, 16, 32


def churn(bm: BlockManager, requests: int, seed: int = 0) -> list[str]:
    """Requests of 64-512 random tokens, every second one behind a shared 128-token prefix;
    at most RUNNING held at once, all freed when the cache is full. Returns those held."""
    rng = random.Random(seed)
    live: list[str] = []
    for i in range(requests):
        toks = ([7] * 128 if i % 2 else []) + [
            rng.randrange(1000) for _ in range(rng.randrange(64, 512))
        ]
        rid = str(i)
        if not bm.allocate(rid, len(toks) + DECODE, bm.find_cached_prefix(toks)):
            for r in live:
                bm.free(r)
            live = []
            assert bm.allocate(rid, len(toks) + DECODE, bm.find_cached_prefix(toks))
        bm.cache_blocks(rid, toks, len(toks))
        live.append(rid)
        if len(live) > RUNNING:
            bm.free(live.pop(0))
    return live


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="4096,175000")
    ap.add_argument("--requests", type=int, default=20000)
    args = ap.parse_args(argv)
    for n in map(int, args.blocks.split(",")):
        gc.collect()
        t0 = time.perf_counter()
        bm = BlockManager(n, BLOCK_SIZE)
        t1 = time.perf_counter()
        live = churn(bm, args.requests)
        t2 = time.perf_counter()
        audit = bm.audit(set(live))
        t3 = time.perf_counter()
        gc.collect()
        t4 = time.perf_counter()
        gc.collect()  # a full collection with the manager alive
        t5 = time.perf_counter()
        print(
            f"blocks {n}: build {1e3 * (t1 - t0):.1f} ms, {args.requests} requests "
            f"{t2 - t1:.2f} s, audit {1e3 * (t3 - t2):.1f} ms, full gc {1e3 * (t5 - t4):.1f} ms; "
            f"{audit}"
        )
        assert audit["leaked"] == 0


if __name__ == "__main__":
    main()
