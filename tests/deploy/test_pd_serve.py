"""deploy/examples/pd.yaml served for real (Ray Serve, gRPC and the official openai client), on
the tiny seeded Llama: one prefill and one decode group. Outputs equal the colocated engine's
for prompts that go through the hand-off and for short ones that prefill on the decode group;
the decode group imported the prompts' KV; nothing is left held afterwards. Then the prefill
group dies: requests still complete, prefilled on the decode group."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
from app_fixtures import GRPC_PORT, HTTP_PORT, META, grpc_stub, running_app

from deploy import preflight
from router.proto import flotilla_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]

ROOT = Path(__file__).resolve().parents[2]
MIN_PD = 12  # prompts of at least this many tokens go through the prefill group


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return preflight.load(
        str(ROOT / "deploy" / "examples" / "pd.yaml"),
        {
            "engine.model.model": tiny_model_dir("llama"),
            "engine.model.dtype": "float32",
            "engine.cache": {"block_size": 8, "num_blocks": 512},
            "router.pd_min_prompt_tokens": MIN_PD,
            "router.stats_interval_s": 0.1,
            "serve.http_port": HTTP_PORT,
            "serve.grpc_port": GRPC_PORT,
            "serve.metrics_export_port": None,
            "serve.health_check_period_s": 1.0,
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
def offline(config):
    from cluster.engine import LLMEngine

    return LLMEngine(config.engine)


def _stats(app) -> dict[str, dict]:
    """By role: this app has one group in each pool."""
    return {s["role"]: s for s in app.group_stats.remote().result(timeout_s=30)}


PROMPTS = [
    [100 + (7 * i) % 500 for i in range(40)],  # hand-off, 5 full blocks imported
    [200 + (11 * i) % 500 for i in range(13)],  # hand-off, 1 block + a recomputed tail
    [300 + i for i in range(5)],  # short: prefilled on the decode group
]


def _grpc_ids(stub, ids, params) -> tuple[list[int], str, str]:
    got, text, finish = [], [], ""
    req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), params=params)
    for msg in stub.GenerateStream(req, metadata=META, timeout=120):
        got += msg.token_ids
        text.append(msg.text)
        finish = msg.finish_reason or finish
    return got, "".join(text), finish


def _transfers(config, via: str) -> tuple[float, float]:
    """(count, sum of bytes) of the router's KV transfer histogram for `via`, from the
    Prometheus text on the HTTP port (every router replica's is the same here: one)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{config.serve.http_port}/metrics", timeout=30).text
    count = total = 0.0
    for fam in text_string_to_metric_families(text):
        if not fam.name.endswith("flotilla_kv_transfer_size_bytes"):  # (ray_ prefix)
            continue
        for s in fam.samples:
            if s.labels.get("via") == via and s.name.endswith("_count"):
                count += s.value
            elif s.labels.get("via") == via and s.name.endswith("_sum"):
                total += s.value
    return count, total


def test_outputs_equal_the_colocated_engine(app, stub, offline, config):
    from workers.sampling_params import SamplingParams

    before = _stats(app)
    shm_before = _transfers(config, "shm")
    for seeded in (False, True):
        kw = {"temperature": 0.8, "seed": 11, "top_k": 40} if seeded else {"temperature": 0.0}
        params = pb.SamplingParams(max_tokens=12, ignore_eos=True, **kw)
        want = offline.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True, **kw))
        for prompt, ref in zip(PROMPTS, want, strict=True):
            got = _grpc_ids(stub, prompt, params)
            assert got == (ref.token_ids, ref.text, "length"), (seeded, len(prompt))
    after = _stats(app)
    handed_off = 2 * 2  # the two long prompts, greedy and seeded
    assert after["prefill"]["num_requests"] - before["prefill"]["num_requests"] == handed_off
    assert after["decode"]["kv_imports"] - before["decode"]["kv_imports"] == handed_off
    assert after["decode"]["kv_recomputes"] == before["decode"]["kv_recomputes"]
    assert after["decode"]["num_requests"] - before["decode"]["num_requests"] == 2 * 3
    # Both groups are on this node: the KV came through the prefill group's arena.
    assert after["decode"]["kv_shm_imports"] - before["decode"]["kv_shm_imports"] == handed_off
    # ... and each hand-off is one observation of the router's transfer histograms, with the
    # bytes the decode group counted.
    count, size = _transfers(config, "shm")
    assert count - shm_before[0] == handed_off
    got = after["decode"]["kv_transfer_bytes"] - before["decode"]["kv_transfer_bytes"]
    assert got > 0 and size - shm_before[1] == got


def test_openai_http_through_the_pools(app, config, offline):
    from workers.sampling_params import SamplingParams

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{config.serve.http_port}/v1", api_key="-", max_retries=0
    )
    want = offline.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    out = client.completions.create(
        model=config.model_name,
        prompt=PROMPTS[0],
        max_tokens=10,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].text == want[0].text
    assert out.usage.completion_tokens == 10 and out.usage.prompt_tokens == len(PROMPTS[0])


def test_nothing_is_held_afterwards(app):
    deadline = time.monotonic() + 30
    while True:
        stats = _stats(app)
        idle = all(s["num_running"] == 0 and s["kv_usage"] == 0.0 for s in stats.values())
        if idle and stats["prefill"]["kv_leases"] == 0 and stats["prefill"]["kv_arena_lent"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    assert stats["prefill"]["kv_lease_blocks"] == 0


def test_a_dead_prefill_group_falls_back_to_decode(app, stub, offline):
    import ray
    from ray import serve

    from workers.sampling_params import SamplingParams

    status = serve.status().applications["flotilla"].deployments["prefill"]
    assert status.status == "HEALTHY"
    replica = next(
        a for a in ray.util.list_named_actors(all_namespaces=True) if "#prefill#" in a["name"]
    )
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=False)
    want = offline.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    params = pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for _ in range(3):  # whether or not the router noticed yet, each request completes
        assert _grpc_ids(stub, PROMPTS[0], params) == (want[0].token_ids, want[0].text, "length")
