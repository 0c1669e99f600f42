"""`flotilla deploy / status / delete` and `flotilla build` + Ray's own `serve deploy` on a real
three-node Ray cluster (head + two workers with custom resources, all on loopback, token auth),
shared by every test here and stopped even when one fails. The tests run in order: each one
leaves the cluster as the next one expects it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from ray_nodes import LoopbackCluster, free_port

from deploy import preflight, serve_config
from deploy.config import FlotillaConfig

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP = "flotilla"
ECHO = {"name": "echo", "route_prefix": "/echo", "import_path": "serve_echo:app"}


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster(
        [(2, {}), (1, {"node_b": 1}), (1, {"node_c": 1})],
        pythonpath=[ROOT, Path(__file__).parent],  # deploy.app and serve_echo for the cluster
    )
    try:
        c.start()
        c.wait_nodes()
        yield c
    finally:
        assert c.stop() == [], "processes of the test cluster survived"


@pytest.fixture(scope="module")
def rest(cluster):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(
        cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"}
    )


@pytest.fixture(scope="module")
def configs(tmp_path_factory, tiny_model_dir):
    """Config files: `one` (1 group, 1 router), `routers2` (2 routers), `groups2` (2 groups,
    2 routers) and `too_big`; plus the ports and the model name."""
    http, grpc = free_port(), free_port()
    base = {
        "engine": {
            "model": {"model": tiny_model_dir("llama"), "dtype": "float32", "num_threads": 1},
            "cache": {"block_size": 8, "num_blocks": 256},
        },
        "serve": {
            "http_port": http,
            "grpc_port": grpc,
            "proxy_location": "HeadOnly",  # the nodes share 127.0.0.1: one proxy per port
            "group_num_cpus": 0.5,
            "health_check_period_s": 2.0,
            "group_graceful_shutdown_s": 1.0,
        },
    }
    variants = {
        "one": {},
        "routers2": {"serve": {"ingress_replicas": 2}},
        "groups2": {"groups": 2, "serve": {"ingress_replicas": 2}},
        "too_big": {"groups": 8, "serve": {"group_num_cpus": 1.0}},
    }
    d = tmp_path_factory.mktemp("deploy_cli")
    files = {}
    for name, extra in variants.items():
        data = json.loads(json.dumps(base))
        for k, v in extra.items():
            data[k] = data[k] | v if isinstance(v, dict) else v
        files[name] = d / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(data))
    model = FlotillaConfig.model_validate(base).model_name
    return files, http, model


def flotilla(cluster, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    # cluster.env: RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN, as a user of a token
    # cluster sets them (Ray sends a token to an explicit address only in token mode).
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def on_cluster(cluster) -> list[str]:
    return ["--address", cluster.address]


def apps(rest) -> dict:
    return rest.get_serve_details().get("applications") or {}


def replica_ids(rest, app: str = APP) -> dict[str, set[str]]:
    deps = apps(rest)[app]["deployments"]
    return {name: {r["replica_id"] for r in d["replicas"]} for name, d in deps.items()}


def complete(http: int, model: str) -> str:
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 8}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{http}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["choices"][0]["text"]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def test_dry_run_and_preflight_deploy_nothing(cluster, rest, configs):
    files, _, _ = configs
    r = flotilla(cluster, "deploy", str(files["one"]), *on_cluster(cluster), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "pool colocated (deployment groups): 1 group(s), 0.5 CPU each" in r.stdout
    assert "CPUs reserved: 0.6 of the cluster's 4" in r.stdout
    assert "import_path: deploy.app:declarative_app" in r.stdout
    assert "dry run: nothing deployed" in r.stdout

    r = flotilla(cluster, "deploy", str(files["too_big"]), *on_cluster(cluster))
    assert r.returncode == 2
    assert "the config reserves 8.1 CPUs" in r.stderr and "the Ray cluster has 4" in r.stderr
    assert APP not in apps(rest)


def test_deploy_keeps_other_apps_and_serves(cluster, rest, configs):
    files, http, model = configs
    # Someone else's app, started with the same (cluster-wide, fixed once) proxy options.
    options = serve_config.build(preflight.load(str(files["one"])))
    rest.deploy_applications(options | {"applications": [ECHO]})
    r = flotilla(cluster, "deploy", str(files["one"]), *on_cluster(cluster), "--timeout", "240")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    print(out)
    assert "warning" not in out
    assert "keeping the other application(s) on the cluster as they are: echo" in out
    assert "deployment groups: 1/1 replicas running [HEALTHY]" in out
    assert re.search(r"group group-\w+ \(colocated\): healthy", out)
    assert f"'{APP}' is RUNNING" in out
    assert complete(http, model)
    assert apps(rest)["echo"]["status"] == "RUNNING"


def test_status(cluster, configs):
    r = flotilla(cluster, "status", *on_cluster(cluster))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"application {APP}: RUNNING (declarative)" in out
    assert "application echo: RUNNING" in out
    assert "deployment router: 1/1 replicas running [HEALTHY]" in out
    assert re.search(r"group group-\w+ \(colocated\): healthy, 0 running, 0 waiting, KV 0%", out)
    assert out.count(": alive, CPU") == 3
    assert "node_b 1" in out and "node_c 1" in out and "(head)" in out


def test_reapply_restarts_nothing(cluster, rest, configs):
    files, _, _ = configs
    before = replica_ids(rest), replica_ids(rest, "echo")
    r = flotilla(cluster, "deploy", str(files["one"]), *on_cluster(cluster))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (replica_ids(rest), replica_ids(rest, "echo")) == before


def test_router_count_changes_in_place(cluster, rest, configs):
    files, http, model = configs
    before = replica_ids(rest)
    r = flotilla(cluster, "deploy", str(files["routers2"]), *on_cluster(cluster))
    assert r.returncode == 0, r.stdout + r.stderr
    after = replica_ids(rest)
    assert len(after["router"]) == 2 and before["router"] < after["router"]
    assert after["groups"] == before["groups"]
    assert complete(http, model)


def test_more_groups_apply_in_place(cluster, rest, configs):
    # A pool is one deployment whose replicas are its groups; the count is a `deployments:`
    # override, so more groups add replicas and nothing running is replaced.
    files, http, model = configs
    before = replica_ids(rest)
    r = flotilla(cluster, "deploy", str(files["groups2"]), *on_cluster(cluster), "--timeout", "240")
    assert r.returncode == 0, r.stdout + r.stderr
    after = replica_ids(rest)
    assert set(after) == {"router", "registry", "groups"}
    assert before["groups"] < after["groups"] and len(after["groups"]) == 2
    assert after["router"] == before["router"] and after["registry"] == before["registry"]
    assert complete(http, model)


def test_delete_only_ours(cluster, rest, configs):
    r = flotilla(cluster, "delete", *on_cluster(cluster), "--app", APP)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"application '{APP}' deleted" in r.stdout
    assert APP not in apps(rest)
    assert get(f"http://127.0.0.1:{configs[1]}/echo") == "echo"
    r = flotilla(cluster, "status", *on_cluster(cluster))
    assert out_has_nodes(r.stdout, 3)


def out_has_nodes(out: str, n: int) -> bool:
    return out.count(": alive, CPU") == n


def test_built_file_deploys_with_rays_serve_cli(cluster, rest, configs, tmp_path):
    files, http, model = configs
    serve_yaml = tmp_path / "serve.yaml"
    r = flotilla(cluster, "build", str(files["one"]), "-o", str(serve_yaml))
    assert r.returncode == 0, r.stderr
    serve_bin = Path(sys.executable).parent / "serve"
    r = subprocess.run(
        [str(serve_bin), "deploy", str(serve_yaml), "-a", cluster.dashboard_url],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 240
    while apps(rest).get(APP, {}).get("status") != "RUNNING":
        assert time.monotonic() < deadline, apps(rest).get(APP)
        time.sleep(1)
    assert complete(http, model)
    assert "echo" not in apps(rest)  # serve deploy replaces the whole set: why deploy merges
