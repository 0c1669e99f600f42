"""Constants and helpers shared by the Serve-app test modules (their fixtures: conftest.py)."""

from __future__ import annotations

import time

from app_fixtures import GRPC_PORT as GRPC_PORT  # the shared cluster's ports, re-exported
from app_fixtures import HTTP_PORT as HTTP_PORT
from app_fixtures import METRICS_PORT as METRICS_PORT

from router.proto import flotilla_pb2 as pb

BASE = f"http://127.0.0.1:{HTTP_PORT}"
MAX_MODEL_LEN = 1024  # the tiny model's own limit: room for long cancellable requests
BLOCK = 8


def group_stats(app) -> list[dict]:
    return app.group_stats.remote().result(timeout_s=30)


def wait_idle(app, timeout_s: float = 30.0) -> list[dict]:
    """Bounded wait until no group runs anything and every KV block is free."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = group_stats(app)
        idle = all(s["num_running"] == 0 and s["num_waiting"] == 0 for s in stats)
        if idle and all(s["kv_usage"] == 0.0 for s in stats):
            return stats
        assert time.monotonic() < deadline, f"groups not idle after {timeout_s}s: {stats}"
        time.sleep(0.1)


def greedy(max_tokens: int, **kw) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


PROMPTS = ["Hello there, how are", "The capital of France is", "def fibonacci(n):"]


def counts(app) -> tuple[int, int]:
    """(requests aborted, requests run) over all groups."""
    stats = group_stats(app)
    return sum(s["num_aborted"] for s in stats), sum(s["num_requests"] for s in stats)


def wait_aborted(app, before: tuple[int, int], what: str) -> None:
    """Bounded wait until the group aborted the request, or it provably never ran there (its
    submit was cancelled in flight): no new request started and the groups stay idle. A request
    that ran to its end instead fails the test."""
    deadline = time.monotonic() + 30
    quiet_since = None
    while True:
        (aborted, started), stats = counts(app), group_stats(app)
        if aborted > before[0]:
            break
        idle = all(s["num_running"] == 0 and s["num_waiting"] == 0 for s in stats)
        if started == before[1] and idle:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 1.0:
                break
        else:
            quiet_since = None
        assert time.monotonic() < deadline, f"the group never saw the {what}"
        time.sleep(0.1)
    wait_idle(app)
