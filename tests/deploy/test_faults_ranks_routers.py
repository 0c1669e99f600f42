"""More faults under load, for real (Ray Serve, two groups of the tiny seeded Llama with tp=2
each, two router replicas, gRPC greedy streams), with exact outcome counts:

* one tensor-parallel rank's process SIGKILLed mid-stream: every stream completes with the
  tokens of an uninterrupted greedy run (the dead rank's group fails its step with
  EngineDead, the router resumes its streams on the other group), the group is replaced;
* the router replica that holds streams killed: exactly its streams fail, with UNAVAILABLE
  and Serve's "The actor ... is unavailable" (nothing can resume a stream whose router died:
  the tokens relayed so far lived there; the code says a retry may succeed), exactly those
  are aborted by the groups, every other stream completes with the right tokens, new
  requests succeed through the surviving replica, Serve starts a new one;
* the Serve controller killed (and restarted by Ray): streams in flight and new requests go on,
  no replica is replaced, the app is RUNNING afterwards.

After each: no KV block leaked or left in use on any group.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from app_fixtures import META, grpc_stub, running_app, tiny_app_config
from fault_support import (
    Load,
    audit_when_idle,
    group_stats,
    replica_ids,
    two_healthy,
    wait,
)

from deploy.config import FlotillaConfig
from router.proto import flotilla_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]

MAX_TOKENS = 200
# The router-kill test's streams: each must still run when the groups are asked who holds
# what, and a stream that got its first token a second or two before the last one did (its
# client waits at the barrier meanwhile) would be over already at 200.
LONG_TOKENS = 600
PROMPTS = [[100 + (13 * i + 7 * j) % 700 for i in range(5 + 2 * j)] for j in range(6)]
ROUTERS = "#router#"


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> FlotillaConfig:
    return tiny_app_config(
        tiny_model_dir("llama"),
        {
            "engine": {"cache": {"num_blocks": 512}, "parallel": {"tp": 2, "cpus_per_rank": 0.25}},
            "groups": 2,
            "router": {"policy": "round_robin", "group_timeout_s": 5},
            "serve": {
                "ingress_replicas": 2,
                "health_check_period_s": 1.0,
                "health_check_timeout_s": 5.0,
            },
        },
    )


@pytest.fixture(scope="module")
def app(config):
    with running_app(config) as router:
        yield router


@pytest.fixture(scope="module")
def stub(app, config):
    with grpc_stub(config) as stub:
        yield stub


@pytest.fixture(scope="module")
def reference(config) -> list[list[int]]:
    """An uninterrupted greedy run of LONG_TOKENS, one rank (the tp=2 groups give the same
    tokens)."""
    from cluster.engine import LLMEngine
    from parallel.config import ParallelConfig
    from workers.sampling_params import SamplingParams

    engine = config.engine.model_copy(update={"parallel": ParallelConfig()})
    params = SamplingParams(max_tokens=LONG_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in LLMEngine(engine).generate(PROMPTS, params)]


def _first(reference: list[list[int]], n: int = MAX_TOKENS) -> list[list[int]]:
    """Greedy: the first n tokens of the LONG_TOKENS run are the n-token run's."""
    return [r[:n] for r in reference]


def _rank_pids() -> list[int]:
    """The processes of every live rank actor (Ray's actor table, by class)."""
    import ray._private.state

    actors = ray._private.state.actors().values()
    return sorted(
        a["Pid"] for a in actors if a["ActorClassName"] == "RankActor" and a["State"] == "ALIVE"
    )


def _generate(stub, i: int) -> list[int]:
    params = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=PROMPTS[i]), params=params)
    return list(stub.Generate(req, metadata=META, timeout=120).token_ids)


def _no_block_leaked(app) -> None:
    for g in audit_when_idle(app):
        assert g["blocks"]["leaked"] == 0 and g["blocks"]["in_use"] == 0, g


def test_a_killed_tp_rank_s_streams_complete_elsewhere_with_the_same_tokens(app, stub, reference):
    before = {g["name"] for g in wait(lambda: two_healthy(app), "two groups", 180)}
    ids = replica_ids()
    pids = _rank_pids()
    assert len(pids) == 4, pids  # two groups x tp=2
    load = Load(stub, PROMPTS, MAX_TOKENS)
    load.started.wait()  # every stream has a token: both groups are mid-stream
    os.kill(pids[-1], signal.SIGKILL)
    assert load.outcome(_first(reference)) == {
        "completed": len(PROMPTS),
        "failed": 0,
        "mismatched": 0,
    }
    after = wait(lambda: two_healthy(app), "the group's replacement", 180)
    assert len({g["name"] for g in after} - before) == 1
    assert len(replica_ids() - ids) == 1 and len(ids - replica_ids()) == 1
    assert pids[-1] not in _rank_pids() and len(_rank_pids()) == 4
    _no_block_leaked(app)


def _routers(app) -> dict[str, str]:
    """router id -> actor name of every router replica, asked through the handle until both
    answered (bounded)."""
    seen: dict[str, str] = {}
    for _ in range(200):
        who = app.identity.remote().result(timeout_s=30)
        seen[who["router_id"]] = who["actor"]
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only these router replicas answered: {seen}")


def _held_per_router(app, timeout_s: float = 15.0) -> dict[str, int]:
    """Running streams per router replica, as the groups count them, once they account for
    every stream (each has a token). Asked again until then, bounded: in full CI runs the first
    answer has come up short (4 of 6 streams, 3 times in ~14 runs, never under diagnostics),
    cause not found yet; a timeout shows what the groups said and how old each answer was."""
    deadline = time.monotonic() + timeout_s
    while True:
        gs = group_stats(app)
        held: dict[str, int] = {}
        for g in gs:
            for rid, n in g["router_requests"].items():
                held[rid] = held.get(rid, 0) + n
        if sum(held.values()) == len(PROMPTS):
            return held
        assert time.monotonic() < deadline, [
            {k: g.get(k) for k in ("name", "healthy", "num_running", "router_requests")}
            | {"age_s": round(time.time() - g.get("time", 0), 2)}
            for g in gs
        ]
        time.sleep(0.2)


def test_a_killed_router_replica_fails_exactly_its_streams_and_nothing_else(app, stub, reference):
    import ray

    wait(lambda: two_healthy(app), "two groups", 180)
    routers = _routers(app)
    aborted = sum(g["num_aborted"] for g in group_stats(app))
    load = Load(stub, PROMPTS, LONG_TOKENS)
    load.started.wait()
    held = _held_per_router(app)
    victim = max(held, key=held.get)  # the router replica holding the most streams
    lost = held[victim]
    ray.kill(ray.get_actor(routers[victim], namespace="serve"), no_restart=True)
    assert load.outcome(reference) == {
        "completed": len(PROMPTS) - lost,
        "failed": lost,
        "mismatched": 0,
    }
    # What the client sees: Serve's answer for a replica that died under the call ("The actor
    # ... is unavailable"), with the retryable code (router/grpc_server.py; Serve says INTERNAL).
    errors = load.errors()
    assert len(errors) == lost and all(isinstance(e, grpc.RpcError) for e in errors), errors
    assert {e.code() for e in errors} == {grpc.StatusCode.UNAVAILABLE}, errors
    assert all("unavailable" in (e.details() or "").lower() for e in errors), errors
    # The groups aborted exactly the dead router's streams (its links closed): no KV held.
    assert sum(g["num_aborted"] for g in group_stats(app)) - aborted == lost
    for i in range(3):  # new requests go to the surviving replica (or the new one)
        assert _generate(stub, i) == _first(reference)[i]
    wait(
        lambda: len(replica_ids(ROUTERS)) == 2 and routers[victim] not in replica_ids(ROUTERS),
        "a new router replica",
        120,
    )
    _no_block_leaked(app)


def test_a_restarted_serve_controller_interrupts_nothing(app, stub, reference):
    import ray
    from ray import serve

    wait(lambda: two_healthy(app), "two groups", 180)
    ids = replica_ids() | replica_ids(ROUTERS)
    load = Load(stub, PROMPTS, MAX_TOKENS)
    load.started.wait()
    ray.kill(ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve"), no_restart=False)
    for i in range(3):  # while the controller restarts
        assert _generate(stub, i) == _first(reference)[i]
    assert load.outcome(_first(reference)) == {
        "completed": len(PROMPTS),
        "failed": 0,
        "mismatched": 0,
    }
    wait(
        lambda: serve.status().applications["flotilla"].status == "RUNNING",
        "the app RUNNING under the restarted controller",
        120,
    )
    assert replica_ids() | replica_ids(ROUTERS) == ids  # nothing was replaced
    assert _generate(stub, 3) == _first(reference)[3]
    _no_block_leaked(app)
