"""The prefill:decode ratio policy for real: disaggregated pools, each autoscaled, coordinated by
`pools.autoscaling_ratio` (a Serve application-level policy, applied the way `serve deploy`
does). Load on the decode pool grows it to 2 groups; the prefill pool follows to keep
prefill >= ceil(1.0 x decode) although its own queue never asks for it."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from app_fixtures import META, running_app, tiny_app_config

from deploy.config import FlotillaConfig
from router.proto import flotilla_pb2 as pb
from router.proto import flotilla_pb2_grpc as pb_grpc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.serve_cluster,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _scaled(**kw) -> dict:
    return {
        "min_groups": 1,
        "max_groups": 2,
        "policy": "queue",
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 600,
        "cooldown_s": 1,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
        **kw,
    }


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> FlotillaConfig:
    return tiny_app_config(
        tiny_model_dir("llama"),
        {
            "engine": {"cache": {"num_blocks": 512}, "scheduler": {"max_waiting": 16}},
            "groups": None,
            "pools": {
                "prefill": {"autoscaling": _scaled(target=100), "group_num_cpus": 0.3},
                "decode": {"autoscaling": _scaled(target=2), "group_num_cpus": 0.3},
                "autoscaling_ratio": {"prefill_per_decode": 1.0},
            },
            "router": {"policy": "round_robin"},
            "serve": {
                "group_num_cpus": None,
                "health_check_period_s": 1.0,
                "group_graceful_shutdown_s": 2.0,
            },
        },
    )


@pytest.fixture(scope="module")
def app(config):
    with running_app(config) as router:
        yield router


def _pools(app) -> dict[str, int]:
    out = {"prefill": 0, "decode": 0}
    for g in app.group_stats.remote().result(timeout_s=30):
        if g["healthy"] and not g["draining"]:
            out[g["role"]] += 1
    return out


def test_prefill_follows_decode_by_the_ratio(app, config):
    from ray import serve

    details = serve.status().applications["flotilla"]
    assert details.status == "RUNNING"
    assert _pools(app) == {"prefill": 1, "decode": 1}
    channel = grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}")
    stub = pb_grpc.FlotillaStub(channel)
    stop = threading.Event()
    errors: list[Exception] = []

    def client(i: int) -> None:
        # Short prompts (below pd_min_prompt_tokens): they queue on the decode pool only.
        params = pb.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        while not stop.is_set():
            req = pb.GenerateRequest(
                prompt_token_ids=pb.TokenIds(ids=[100 + i, 7, 9]), params=params
            )
            try:
                for _ in stub.GenerateStream(req, metadata=META, timeout=120):
                    pass
            except Exception as e:
                errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 150
        while _pools(app) != {"prefill": 2, "decode": 2}:
            assert time.monotonic() < deadline, _pools(app)
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
        channel.close()
    assert not errors, errors[:3]
