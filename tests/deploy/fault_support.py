"""What the real-Serve fault tests share (test_faults.py, test_faults_ranks_routers.py): group
stats through the router, the live replica actors, a bounded wait, a load of greedy gRPC
streams that counts outcomes exactly, and the block audit once every group is idle."""

from __future__ import annotations

import threading
import time

from app_fixtures import META

from router.proto import flotilla_pb2 as pb


def group_stats(router) -> list[dict]:
    return router.group_stats.remote().result(timeout_s=30)


def replicas(kind: str = "#groups#") -> dict[str, str]:
    """Live replica actors of one deployment (by a part of their name): name -> namespace."""
    import ray

    return {
        a["name"]: a["namespace"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if kind in a["name"]
    }


def replica_ids(kind: str = "#groups#") -> set[str]:
    return set(replicas(kind))


def wait(cond, what: str, timeout_s: float = 90):
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def two_healthy(router) -> list[dict] | None:
    gs = group_stats(router)
    ok = len(gs) == 2 and all(g["healthy"] and not g["draining"] for g in gs)
    return gs if ok else None


class Load:
    """One greedy stream per prompt, each in its own thread; `started` once all have a token.
    `gap` per stream: the longest wait between two messages (a failover shows up there)."""

    def __init__(self, stub, prompts: list[list[int]], max_tokens: int):
        self.results: dict[int, object] = {}
        self.gaps: dict[int, float] = {}
        self.prompts = prompts
        self.started = threading.Barrier(len(prompts) + 1, timeout=120)
        params = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.threads = [
            threading.Thread(target=self._one, args=(stub, i, params)) for i in range(len(prompts))
        ]
        for t in self.threads:
            t.start()

    def _one(self, stub, i: int, params) -> None:
        req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=self.prompts[i]), params=params)
        ids, finish, last, gap = [], "", None, 0.0
        try:
            for msg in stub.GenerateStream(req, metadata=META, timeout=240):
                now = time.monotonic()
                if last is None:
                    self.started.wait()
                else:
                    gap = max(gap, now - last)
                last = time.monotonic()
                ids += msg.token_ids
                finish = msg.finish_reason or finish
            self.results[i] = (ids, finish)
        except Exception as e:  # counted as failed below
            self.results[i] = e
        self.gaps[i] = gap

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=240)
        assert not any(t.is_alive() for t in self.threads), "a stream never ended"

    def outcome(self, reference: list[list[int]]) -> dict[str, int]:
        """Once every stream ended: how many completed with the reference's tokens, failed,
        or completed with other tokens."""
        self.join()
        out = {"completed": 0, "failed": 0, "mismatched": 0}
        for i, r in self.results.items():
            key = (
                "failed"
                if isinstance(r, Exception)
                else "completed"
                if r == (reference[i], "length")
                else "mismatched"
            )
            out[key] += 1
        return out

    def errors(self) -> list[Exception]:
        return [r for r in self.results.values() if isinstance(r, Exception)]


def audit_when_idle(router) -> list[dict]:
    """Every group's block audit, once all are idle (twice in a row: the engine audits on
    its own thread as it goes idle, a moment after its last request finished)."""
    idle_polls = 0

    def idle() -> list[dict] | None:
        nonlocal idle_polls
        gs = group_stats(router)
        quiet = all(g["num_running"] == 0 and g["num_waiting"] == 0 for g in gs)
        idle_polls = idle_polls + 1 if quiet else 0
        return gs if idle_polls >= 3 else None

    gs = wait(idle, "idle groups", 60)
    for g in gs:
        b = g["blocks"]
        assert b["free"] + b["cached"] + b["in_use"] == b["total"], (g["name"], b)
    return gs
