"""A pool's groups come and go while it serves (real Ray Serve, the tiny seeded Llama): a new
group is discovered and used; a group removed while streams run on it drains -- its streams
finish there, or move to another group and resume after the tokens already sent -- and not
one request fails; every token equals the colocated engine's greedy output."""

from __future__ import annotations

import threading
import time

import pytest
from app_fixtures import META, grpc_stub, running_app, tiny_app_config

from deploy.config import FlotillaConfig
from router.proto import flotilla_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]

MAX_TOKENS = 600


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> FlotillaConfig:
    # group_graceful_shutdown_s 1 (the default here): short, so that some streams outlive it
    # and must move on.
    return tiny_app_config(
        tiny_model_dir("llama"),
        {"router": {"policy": "round_robin"}, "serve": {"health_check_period_s": 1.0}},
    )


def _with_groups(config: FlotillaConfig, n: int) -> FlotillaConfig:
    return config.model_copy(update={"groups": n})


@pytest.fixture(scope="module")
def cluster(config):
    with running_app(config) as router:
        yield router


@pytest.fixture(scope="module")
def stub(cluster, config):
    with grpc_stub(config) as stub:
        yield stub


def _groups(router) -> list[dict]:
    return router.group_stats.remote().result(timeout_s=30)


def _wait_groups(router, n: int, timeout_s: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        ready = [g for g in _groups(router) if g["healthy"] and not g["draining"]]
        if len(ready) == n and len(_groups(router)) == n:
            return ready
        assert time.monotonic() < deadline, _groups(router)
        time.sleep(0.2)


def _scale(config: FlotillaConfig, n: int) -> None:
    """Re-apply the app with n groups, as `flotilla deploy` / `serve deploy` would."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from deploy.app import apply

    apply(_get_global_client(), ServeDeploySchema, _with_groups(config, n))


def _replica_ids(deployment: str) -> set[str]:
    """Live replica actors of `deployment` (Serve names them SERVE_REPLICA::app#dep#id)."""
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f"#{deployment}#" in a["name"]
    }


PROMPTS = [[100 + (13 * i + 7 * j) % 500 for i in range(6 + j)] for j in range(6)]


def test_a_new_group_joins_and_serves(cluster, stub, config):
    router_before = _replica_ids("router")
    groups_before = _replica_ids("groups")
    _scale(config, 2)
    groups = _wait_groups(cluster, 2)
    assert groups_before < _replica_ids("groups")  # the first group kept running
    assert _replica_ids("router") == router_before  # the router was updated in place
    before = {g["name"]: g["num_requests"] for g in groups}
    params = pb.SamplingParams(max_tokens=4, temperature=0.0)
    for p in PROMPTS[:4]:
        req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=p), params=params)
        stub.Generate(req, metadata=META, timeout=60)
    after = {g["name"]: g["num_requests"] for g in _groups(cluster)}
    assert all(after[n] > before[n] for n in before)  # round robin reached the new group


def test_scale_down_under_load_loses_no_request(cluster, stub, config):
    from cluster.engine import LLMEngine
    from workers.sampling_params import SamplingParams

    ref = LLMEngine(config.engine).generate(
        PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    )
    _wait_groups(cluster, 2)
    params = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    results: dict[int, object] = {}
    started = threading.Barrier(len(PROMPTS) + 1, timeout=120)

    def one(i: int) -> None:
        req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=PROMPTS[i]), params=params)
        ids, finish, first = [], "", True
        try:
            for msg in stub.GenerateStream(req, metadata=META, timeout=300):
                ids += msg.token_ids
                finish = msg.finish_reason or finish
                if first:
                    first = False
                    started.wait()
            results[i] = (ids, finish)
        except Exception as e:  # recorded: the assertion below names it
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first token: both groups are busy
    busy = {g["name"]: g["num_running"] for g in _groups(cluster)}
    assert len(busy) == 2 and all(busy.values()), busy
    _scale(config, 1)
    for t in threads:
        t.join(timeout=300)
    for i, r in sorted(results.items()):
        assert not isinstance(r, Exception), f"stream {i} failed: {r!r}"
        assert r == (ref[i].token_ids, "length"), f"stream {i} differs"
    assert len(results) == len(PROMPTS)
    (left,) = _wait_groups(cluster, 1)
    assert left["kv_usage"] == 0.0 or left["num_running"] == 0
