"""The receiving end of a gloo pair group, run in a spawned process by test_kv_pipeline.py:
kept apart so that the child imports torch and the transport only, not an engine."""

from __future__ import annotations

import asyncio

import torch

from cluster import kv_transfer, kv_transports
from parallel.pair import PairGroup


def receive(port: int, msg: dict, want: torch.Tensor, q) -> None:
    """Rank 1 of a gloo pair on loopback: receive the hand-off `msg` announces; report (its
    tokens, layout, whether it arrived as inline bytes, whether they equal `want`)."""
    try:
        pair = PairGroup(PairGroup.dial("127.0.0.1", port, 30), 1, "gloo", "127.0.0.1", 30)
        got = asyncio.run(kv_transports.arrive(msg, pair))
        tokens, data, layout = kv_transfer.unpack(got)
        q.put((tokens, layout, "data" in got, torch.equal(data, want)))
    except BaseException as e:  # reported to the test, never a hang
        q.put(repr(e))
