"""Faults under load, for real (Ray Serve, two colocated groups of the tiny seeded Llama,
gRPC streams): a group whose engine hangs mid-stream, and a group killed mid-stream. Either
way every stream completes with the offline engine's greedy tokens (the failed group's streams
resume on the other one), not one request fails, Serve replaces the group (a new replica), and
afterwards every group's KV blocks add up with none leaked.

The hang is real: FLOTILLA_FAULT (cluster/faults.py, test-only) makes a step never return in
whichever group steps first once the test deletes the claim file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from app_fixtures import grpc_stub, stop_local_cluster, tiny_app_config
from fault_support import (
    Load,
    audit_when_idle,
    group_stats,
    replica_ids,
    replicas,
    two_healthy,
    wait,
)

from deploy.config import FlotillaConfig

pytestmark = pytest.mark.slow

MAX_TOKENS = 300
HANG_TIMEOUT_S = 3.0
PROMPTS = [[100 + (17 * i + 5 * j) % 700 for i in range(5 + 2 * j)] for j in range(6)]


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> FlotillaConfig:
    return tiny_app_config(
        tiny_model_dir("llama"),
        {
            "engine": {"scheduler": {"hang_timeout_s": 3.0}},
            "groups": 2,
            "router": {"policy": "round_robin", "group_timeout_s": 5},
            "serve": {"health_check_period_s": 1.0, "health_check_timeout_s": 5.0},
        },
    )


@pytest.fixture(scope="module")
def claim(tmp_path_factory) -> Path:
    """Exists: no group hangs. Deleted: the next group to step claims it and hangs."""
    path = tmp_path_factory.mktemp("fault") / "hang-claim"
    path.touch()
    return path


@pytest.fixture(scope="module")
def cluster(config, claim):
    import ray

    from cluster import faults
    from deploy.app import runtime_env, start

    fault = {faults.ENV: "hang_step_after:0", faults.ONCE_ENV: str(claim)}
    env = runtime_env(config)
    env["env_vars"] = env["env_vars"] | fault
    # Workers inherit the raylet's environment, which ray.init takes from ours: set it only
    # for that call, so that no engine of this test process ever sees the fault.
    saved = {k: os.environ.get(k) for k in fault}
    os.environ.update(fault)
    try:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield start(config)
    finally:
        stop_local_cluster()


@pytest.fixture(scope="module")
def stub(cluster, config):
    with grpc_stub(config) as stub:
        yield stub


@pytest.fixture(scope="module")
def reference(config) -> list[list[int]]:
    from cluster.engine import LLMEngine
    from workers.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in LLMEngine(config.engine).generate(PROMPTS, params)]


def test_a_hung_group_is_detected_its_streams_move_and_it_is_replaced(
    cluster, stub, reference, claim
):
    before = {g["name"] for g in wait(lambda: two_healthy(cluster), "two groups")}
    ids = replica_ids()
    load = Load(stub, PROMPTS, MAX_TOKENS)
    load.started.wait()  # every stream has a token: both groups are mid-stream
    claim.unlink()  # arm: the next step of either group never returns
    hung = wait(
        lambda: [g["name"] for g in group_stats(cluster) if g.get("hung")],
        "a group to report hung",
        HANG_TIMEOUT_S + 30,
    )
    assert len(hung) == 1 and hung[0] in before
    assert load.outcome(reference) == {"completed": len(PROMPTS), "failed": 0, "mismatched": 0}
    # The hung group's streams waited about hang_timeout_s (+ the watchdog's period), then
    # resumed on the other group.
    assert HANG_TIMEOUT_S < max(load.gaps.values()) < HANG_TIMEOUT_S + 15, load.gaps
    after = wait(lambda: two_healthy(cluster), "the hung group's replacement", 120)
    names = {g["name"] for g in after}
    assert hung[0] not in names and len(names - before) == 1
    assert len(replica_ids() - ids) == 1 and len(ids - replica_ids()) == 1
    for g in audit_when_idle(cluster):
        assert g["blocks"]["leaked"] == 0 and g["blocks"]["in_use"] == 0, g
        assert not g["hung"]


def test_a_killed_group_s_streams_move_and_it_is_replaced(cluster, stub, reference):
    import ray

    before = {g["name"] for g in wait(lambda: two_healthy(cluster), "two groups")}
    ids = replica_ids()
    load = Load(stub, PROMPTS, MAX_TOKENS)
    load.started.wait()  # every stream has a token: both groups are mid-stream
    victim, namespace = sorted(replicas().items())[0]
    ray.kill(ray.get_actor(victim, namespace=namespace), no_restart=True)
    assert load.outcome(reference) == {"completed": len(PROMPTS), "failed": 0, "mismatched": 0}
    after = wait(lambda: two_healthy(cluster), "the killed group's replacement", 120)
    assert len({g["name"] for g in after} - before) == 1
    assert victim not in replica_ids() and len(replica_ids() - ids) == 1
    for g in audit_when_idle(cluster):
        assert g["blocks"]["leaked"] == 0 and g["blocks"]["in_use"] == 0, g
