"""A harness for tests that run torch.distributed ranks as local processes on loopback."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from parallel.groups import free_port


def _spawn(target, world: int, timeout_s: float = 180.0) -> list:
    """Run `target(rank, port, results)` in `world` spawned processes (they rendezvous on a free
    loopback port); every one must exit 0 within the timeout. Returns results[0..world-1]."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port("127.0.0.1")
        procs = [ctx.Process(target=target, args=(r, port, results)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout_s)
            if p.is_alive():
                p.kill()
                p.join(5)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        return [results[r] for r in range(world)]


@pytest.fixture
def spawn_ranks():
    return _spawn
