"""Groups across nodes, on a real three-node Ray cluster on loopback (head + node_b + node_c,
token auth), deployed with `flotilla deploy`: a TP=2 group whose ranks are on two different
nodes (placement strict_spread) all-reduces over gloo -- never shared memory, although on one
machine it would physically work: the choice is by Ray node id -- and gives the same greedy
tokens as the offline single-process engine; its group actor, pinned by a custom resource,
runs on the node that has it; each rank sizes its threads from its own node; a config asking
for a resource no node has is refused before anything is deployed. Then a redeploy as prefill
and decode pools pinned to two different nodes: each group runs where its pool says, and a
prompt handed off between them (its KV crossing nodes) still gives the offline tokens.

Not covered here: separate machines, NCCL across nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from ray_nodes import LoopbackCluster, free_port

from deploy.config import FlotillaConfig
from router.proto import flotilla_pb2 as pb
from router.proto import flotilla_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP = "flotilla"
PROMPTS = [[100 + (7 * i + j) % 900 for j in range(n)] for i, n in enumerate((5, 37, 20))]

# Ran in a driver of the test cluster: the router's view of the groups, and which node has
# which custom resource.
PROBE = """
import json, ray
ray.init(address="{address}", logging_level="ERROR")
from deploy.remote import group_stats
nodes = {{k: n["NodeID"] for n in ray.nodes() if n["Alive"] for k in n["Resources"]
          if k.startswith("node_")}}
print(json.dumps({{"groups": group_stats("{app}", timeout_s=30), "nodes": nodes}}))
"""


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster(
        [(1, {}), (1, {"node_b": 1}), (1, {"node_c": 1})],
        pythonpath=[ROOT, Path(__file__).parent],
    )
    try:
        c.start()
        c.wait_nodes()
        yield c
    finally:
        assert c.stop() == [], "processes of the test cluster survived"


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir) -> tuple[Path, FlotillaConfig]:
    data = {
        "engine": {
            # 4 heads, 2 KV heads: tp=2 splits both. num_threads unset: ranks size their own.
            "model": {"model": tiny_model_dir("qwen3"), "dtype": "float32"},
            "cache": {"block_size": 8, "num_blocks": 128},
            "parallel": {"tp": 2, "placement": "strict_spread", "cpus_per_rank": 0.5},
        },
        "serve": {
            "http_port": free_port(),
            "grpc_port": free_port(),
            "proxy_location": "HeadOnly",  # the nodes share 127.0.0.1: one proxy per port
            "group_num_cpus": 0.25,
            "group_resources": {"node_c": 0.1},
            "health_check_period_s": 2.0,
            "group_graceful_shutdown_s": 1.0,
        },
    }
    path = tmp_path_factory.mktemp("multinode") / "tp2.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, FlotillaConfig.model_validate(data)


def flotilla(cluster, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args, "--address", cluster.address],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def probe(cluster) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(address=cluster.address, app=APP)],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deployed(cluster, config):
    path, _ = config
    r = flotilla(cluster, "deploy", str(path), "--timeout", "240", timeout_s=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return probe(cluster)


def test_unknown_resource_is_refused_before_deploying(cluster, config, tmp_path):
    path, _ = config
    data = yaml.safe_load(path.read_text())
    data["serve"]["group_resources"] = {"node_x": 0.1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    r = flotilla(cluster, "deploy", str(bad), timeout_s=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "serve.group_resources: the Ray cluster has no custom resource 'node_x'" in r.stderr
    assert "(it has: node_b, node_c;" in r.stderr
    r = flotilla(cluster, "deploy", str(path), "--dry-run", timeout_s=120)
    assert r.returncode == 0, r.stderr
    assert "2 ranks x 0.5 CPU (strict_spread), on nodes with 0.1 node_c" in r.stdout


def test_tp2_group_spans_two_nodes_over_gloo(deployed):
    (group,) = deployed["groups"]
    assert group["healthy"], group
    assert len(group["rank_nodes"]) == 2 and len(set(group["rank_nodes"])) == 2, group
    assert group["all_reduce"] == "gloo"
    # Each rank alone on its node, with the group's whole share (1 group): its node's cores.
    assert group["rank_threads"] == [len(os.sched_getaffinity(0))] * 2


def test_pinned_group_runs_on_the_node_with_the_resource(deployed):
    (group,) = deployed["groups"]
    assert group["node_id"] == deployed["nodes"]["node_c"]


@pytest.fixture(scope="module")
def offline(config) -> list[list[int]]:
    """Greedy tokens of the offline engine: one process, one rank, no Ray."""
    from cluster.engine import LLMEngine
    from parallel.config import ParallelConfig
    from workers.sampling_params import SamplingParams

    _, cfg = config
    engine = LLMEngine(cfg.engine.model_copy(update={"parallel": ParallelConfig()}))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


def served_tokens(cfg: FlotillaConfig) -> list[list[int]]:
    params = pb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    out = []
    with grpc.insecure_channel(f"127.0.0.1:{cfg.serve.grpc_port}") as channel:
        stub = pb_grpc.FlotillaStub(channel)
        for prompt in PROMPTS:
            req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt), params=params)
            got = []
            for msg in stub.GenerateStream(req, metadata=(("application", APP),), timeout=120):
                got += msg.token_ids
            out.append(got)
    return out


def test_tokens_equal_the_offline_engine(deployed, config, offline):
    assert served_tokens(config[1]) == offline


def test_pools_pinned_to_their_nodes(cluster, config, offline, tmp_path):
    path, _ = config
    data = yaml.safe_load(path.read_text())
    data["engine"].pop("parallel")  # one rank per group: the pools are what moves here
    data["pools"] = {
        "prefill": {"resources": {"node_b": 0.1}},
        "decode": {},  # serve.group_resources: node_c
    }
    data["router"] = {"pd_min_prompt_tokens": 16}  # the two longer prompts are handed off
    pd = tmp_path / "pd.yaml"
    pd.write_text(yaml.safe_dump(data))
    r = flotilla(cluster, "deploy", str(pd), "--timeout", "240", timeout_s=300)
    assert r.returncode == 0, r.stdout + r.stderr
    before = probe(cluster)
    by_role = {g["role"]: g for g in before["groups"]}
    assert set(by_role) == {"prefill", "decode"}
    assert by_role["prefill"]["node_id"] == before["nodes"]["node_b"]
    assert by_role["decode"]["node_id"] == before["nodes"]["node_c"]
    assert by_role["decode"]["all_reduce"] == "none"

    assert served_tokens(FlotillaConfig.model_validate(data)) == offline
    after = {g["role"]: g for g in probe(cluster)["groups"]}
    assert after["decode"]["kv_imports"] - by_role["decode"]["kv_imports"] == 2
