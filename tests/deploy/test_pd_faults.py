"""Faults of the prefill -> decode hand-off, served for real (Ray Serve, gRPC) on the tiny
seeded Llama: one prefill group and two decode groups, a 1 s KV lease, and the KV over
torch.distributed pair groups (`pools.kv_transport: dist`, gloo here; pd.yaml's default, the
same-node arena, is test_pd_serve.py's). Every answer equals the colocated engine's, and the
counters say exactly what happened:

* each decode group joins a pair group with the prefill group as it learns of it, and the
  hand-offs travel over them;

* both decode groups stall (SIGSTOP) past the lease: the decode group fetches late, finds the
  lease expired and recomputes the prompt (seeded sampling continues as if nothing happened);
* the client cancels right after the first token, while the decode group takes the KV: the
  lease is taken or expires, every block on both sides ends free or cached, nothing hangs;
* the decode group dies mid-stream: the router resumes the request on the other one;
* the prefill group dies while its pair groups are open: nothing hangs, requests complete,
  the decode groups drop its links (tests/cluster/test_kv_pipeline.py: and open new ones).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from app_fixtures import GRPC_PORT, HTTP_PORT, META, grpc_stub, running_app

from deploy import preflight
from router.proto import flotilla_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 1.0
PROMPT = [100 + (7 * i) % 500 for i in range(40)]  # 5 full blocks: always handed off


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return preflight.load(
        str(ROOT / "deploy" / "examples" / "pd.yaml"),
        {
            "engine.model.model": tiny_model_dir("llama"),
            "engine.model.dtype": "float32",
            "engine.cache": {"block_size": 8, "num_blocks": 512},
            "pools.decode.groups": 2,
            "pools.prefill.group_num_cpus": 0.5,
            "pools.decode.group_num_cpus": 0.5,
            "pools.kv_lease_s": LEASE_S,
            "pools.kv_transport": "dist",
            "pools.kv_transfer_timeout_s": 20,
            "router.pd_min_prompt_tokens": 12,
            # A stalled group is marked unhealthy after max(2 s, 10 polls) unanswered: 5 s.
            "router.stats_interval_s": 0.5,
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


def _stats(app, refresh: bool = True) -> list[dict]:
    return app.group_stats.remote(refresh).result(timeout_s=30)


def _sums(app) -> dict[str, dict[str, float]]:
    """Per pool, the counters summed over its groups."""
    keys = ("num_requests", "num_aborted", "kv_imports", "kv_recomputes",
            "kv_transfers_cancelled", "kv_leases_taken", "kv_lease_expiries")  # fmt: skip
    out = {"prefill": dict.fromkeys(keys, 0), "decode": dict.fromkeys(keys, 0)}
    for s in _stats(app):
        for k in keys:
            out[s["role"]][k] += s[k]
    return out


def _delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    return {r: {k: after[r][k] - before[r][k] for k in before[r]} for r in before}


def _wait_for_decode_groups(app, n: int = 2, timeout_s: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        decode = [s for s in _stats(app) if s["role"] == "decode" and s["healthy"]]
        if len(decode) == n:
            return decode
        assert time.monotonic() < deadline, f"{len(decode)} healthy decode groups, want {n}"
        time.sleep(0.2)


def _wait_idle(app, timeout_s: float = 20.0) -> list[dict]:
    """Bounded: nothing runs, every KV block is free or cached, no lease is held."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _stats(app)
        idle = all(s["num_running"] == 0 and s["num_waiting"] == 0 for s in stats)
        if idle and all(s["kv_usage"] == 0.0 and s["kv_leases"] == 0 for s in stats):
            return stats
        assert time.monotonic() < deadline, f"not idle after {timeout_s}s: {stats}"
        time.sleep(0.1)


def _wait_links(app, timeout_s: float = 60.0) -> str:
    """Bounded: the healthy groups (one prefill, two decode) are linked pairwise, and only so;
    the prefill group's name."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [s for s in _stats(app) if s["healthy"]]
        prefill = [s for s in stats if s["role"] == "prefill"]
        decode = sorted(s["name"] for s in stats if s["role"] == "decode")
        links = {s["name"]: s["kv_links"] for s in stats}
        if len(prefill) == 1 and len(decode) == 2:
            name = prefill[0]["name"]
            if links[name] == decode and all(links[d] == [name] for d in decode):
                return name
        assert time.monotonic() < deadline, f"pair groups not as wanted after {timeout_s}s: {links}"
        time.sleep(0.2)


def _dist_imports(app) -> int:
    return sum(s["kv_dist_imports"] for s in _stats(app) if s["role"] == "decode")


def _request(ids: list[int], params: pb.SamplingParams) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), params=params)


def _want(offline, max_tokens: int, **kw) -> tuple[list[int], str]:
    from workers.sampling_params import SamplingParams

    ref = offline.generate([PROMPT], SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw))
    return ref[0].token_ids, ref[0].text


def _collect(stream) -> tuple[list[int], str, str]:
    ids, text, finish = [], [], ""
    for msg in stream:
        ids += msg.token_ids
        text.append(msg.text)
        finish = msg.finish_reason or finish
    return ids, "".join(text), finish


def test_hand_offs_travel_over_the_pair_groups(app, stub, offline):
    _wait_links(app)
    before, dist0 = _sums(app), _dist_imports(app)
    greedy = pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        got = _collect(stub.GenerateStream(_request(PROMPT, greedy), metadata=META, timeout=60))
        assert got == (*_want(offline, 8, temperature=0.0), "length")
    d = _delta(before, _sums(app))["decode"]
    assert (d["kv_imports"], d["kv_recomputes"], _dist_imports(app) - dist0) == (2, 0, 2)


def test_a_late_decode_group_recomputes_after_the_lease_expired(app, stub, offline):
    decode = _wait_for_decode_groups(app)
    _wait_idle(app)
    before = _sums(app)
    kw = {"temperature": 0.8, "seed": 5, "top_k": 40}
    pids = [s["pid"] for s in decode]
    for pid in pids:  # a stall (GC, an overloaded node): the decode groups fetch late
        os.kill(pid, signal.SIGSTOP)
    try:
        stream = stub.GenerateStream(
            _request(PROMPT, pb.SamplingParams(max_tokens=16, ignore_eos=True, **kw)),
            metadata=META,
            timeout=60,
        )
        first = next(stream)  # the prefill group's token; its lease starts now
        time.sleep(2 * LEASE_S)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    ids, text, finish = _collect(stream)
    got = (list(first.token_ids) + ids, first.text + text, finish)
    assert got == (*_want(offline, 16, **kw), "length")
    d = _delta(before, _sums(app))
    assert d["prefill"] == {
        "num_requests": 1, "num_aborted": 0, "kv_imports": 0, "kv_recomputes": 0,
        "kv_transfers_cancelled": 0, "kv_leases_taken": 0, "kv_lease_expiries": 1,
    }  # fmt: skip
    assert d["decode"] == {
        "num_requests": 1, "num_aborted": 0, "kv_imports": 0, "kv_recomputes": 1,
        "kv_transfers_cancelled": 0, "kv_leases_taken": 0, "kv_lease_expiries": 0,
    }  # fmt: skip
    _wait_idle(app)


def test_a_cancel_during_the_transfer_leaves_nothing_held(app, stub, offline):
    _wait_for_decode_groups(app)
    before = _sums(app)
    # Long enough that no decode leg ends before the cancel reaches it.
    params = pb.SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)
    n = 3
    for _ in range(n):
        stream = stub.GenerateStream(_request(PROMPT, params), metadata=META, timeout=60)
        assert len(next(stream).token_ids) == 1  # the prefill group's token ...
        stream.cancel()  # ... and the client is gone while the decode group takes the KV
        with pytest.raises(grpc.RpcError) as err:
            next(stream)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    time.sleep(LEASE_S)  # a lease nobody took runs out
    _wait_idle(app)
    d = _delta(before, _sums(app))
    assert d["prefill"]["num_requests"] == n
    assert d["prefill"]["kv_leases_taken"] + d["prefill"]["kv_lease_expiries"] == n
    # Each decode leg that started (the cancel may also reach the router before it submits)
    # imported the KV, found its lease gone or was cancelled while taking it -- and was
    # aborted, not run to its end. A lease taken but not imported went to a cancelled fetch.
    dd = d["decode"]
    started = dd["num_requests"]
    assert started <= n and dd["num_aborted"] == started
    assert dd["kv_imports"] + dd["kv_recomputes"] + dd["kv_transfers_cancelled"] == started
    taken_unused = d["prefill"]["kv_leases_taken"] - dd["kv_imports"]
    assert 0 <= taken_unused <= dd["kv_transfers_cancelled"]
    # Nothing hangs: the next request runs through the hand-off as usual.
    short = pb.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    got = _collect(stub.GenerateStream(_request(PROMPT, short), metadata=META, timeout=60))
    assert got == (*_want(offline, 16, temperature=0.0), "length")


def test_a_dead_decode_group_hands_the_stream_to_the_other(app, stub, offline):
    import ray

    _wait_for_decode_groups(app)
    _wait_idle(app)
    before = {s["name"]: s for s in _stats(app)}
    migrations = app.router_counters.remote().result(timeout_s=30)["migrations"]
    params = pb.SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    stream = stub.GenerateStream(_request(PROMPT, params), metadata=META, timeout=120)
    ids, text = [], []
    for msg in stream:
        ids += msg.token_ids
        text.append(msg.text)
        if len(ids) >= 20:
            break
    running = [s for s in _stats(app) if s["role"] == "decode" and s["num_running"]]
    assert len(running) == 1, running
    victim = running[0]["name"]
    actor = next(
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].endswith("#decode#" + victim.removeprefix("decode-"))
    )
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    rest = _collect(stream)
    got = (ids + rest[0], "".join(text) + rest[1], rest[2])
    assert got == (*_want(offline, 500, temperature=0.0), "length")
    assert app.router_counters.remote().result(timeout_s=30)["migrations"] - migrations == 1
    after = {s["name"]: s for s in _stats(app)}
    (survivor,) = (n for n, s in before.items() if s["role"] == "decode" and n != victim)
    (prefill,) = (n for n, s in before.items() if s["role"] == "prefill")

    def d(name: str, key: str) -> int:
        return after[name][key] - before[name][key]

    # The victim took the prompt's KV; the survivor resumed after the relayed tokens,
    # recomputing the prompt and those tokens (no lease to fetch): one leg, run to its end.
    assert (d(prefill, "num_requests"), d(prefill, "kv_leases_taken")) == (1, 1)
    assert [d(survivor, k) for k in ("num_requests", "num_aborted", "kv_imports",
                                     "kv_recomputes")] == [1, 0, 0, 0]  # fmt: skip
    assert victim not in after or not after[victim]["healthy"]


def test_a_dead_prefill_group_leaves_no_link_behind(app, stub, offline):
    import ray

    stats = [s for s in _stats(app) if s["healthy"]]
    (dead,) = (s["name"] for s in stats if s["role"] == "prefill")
    linked = [s["name"] for s in stats if s["role"] == "decode" and s["kv_links"] == [dead]]
    assert linked, stats  # (the surviving decode group's, at least)
    actor = next(
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].endswith("#prefill#" + dead.removeprefix("prefill-"))
    )
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    greedy = pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = (*_want(offline, 8, temperature=0.0), "length")
    for _ in range(2):  # noticed by the router or not, each completes (prefilled on decode)
        got = _collect(stub.GenerateStream(_request(PROMPT, greedy), metadata=META, timeout=60))
        assert got == want
    # Once the dead group is gone from the registry (its TTL), its links are dropped.
    deadline = time.monotonic() + 30
    while any(dead in s["kv_links"] for s in _stats(app) if s["name"] in linked and s["healthy"]):
        assert time.monotonic() < deadline, _stats(app)
        time.sleep(0.2)
