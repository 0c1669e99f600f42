"""FlotillaConfig -> a plain Ray Serve config (what `serve deploy` and a KubeRay RayService's
`serveConfigV2` take), and back. Pure: no cluster, no Ray import.

    build(cfg) -> dict                 the whole Serve config, one application
    deployment_overrides(cfg)          the `deployments:` entries (replica counts)
    app_args(cfg) / config_of(app)     the app's `args`, and the FlotillaConfig an entry runs

Replica counts live in `deployments:`, not in `args`: Serve hashes `import_path`, `runtime_env`
and `args` into the app's code version, and a new code version restarts every replica, while a
changed `num_replicas` is applied in place. So a count that Serve can take from an override is
left out of `args` (MOVED_TO_OVERRIDES) and put back by `config_of`.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from deploy import proxy_bind
from deploy.config import FlotillaConfig

IMPORT_PATH = "deploy.app:build_app"
# Our registration wraps the stock one; see router/grpc_server.py for why.
GRPC_SERVICER = "router.grpc_server.add_servicer"
PROXY_SETUP_HOOK = "deploy.proxy_bind.install"
ROUTER_DEPLOYMENT = "router"

# Config field (dotted) -> the deployment whose num_replicas carries it.
MOVED_TO_OVERRIDES = {"serve.ingress_replicas": ROUTER_DEPLOYMENT}


def deployment_overrides(cfg: FlotillaConfig) -> list[dict[str, Any]]:
    """The `deployments:` entries. The ONE place that names the group deployments: today each
    group is its own one-replica deployment group-i (or prefill-i / decode-i), fixed by the
    app's shape, so adding a group changes `args` (a rebuild that restarts every replica)."""
    out = [{"name": ROUTER_DEPLOYMENT, "num_replicas": cfg.serve.ingress_replicas}]
    out += [{"name": spec.name, "num_replicas": 1} for spec in cfg.group_specs()]
    return out


def app_args(cfg: FlotillaConfig) -> dict[str, Any]:
    """The config as plain data: only the fields the user set (so `groups` and `pools` never
    both appear, and a new default in a later Flotilla reaches a redeploy), JSON types only,
    minus the counts that `deployments:` carries."""
    data = cfg.model_dump(mode="json", exclude_unset=True)
    for dotted in MOVED_TO_OVERRIDES:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return data


def config_of(app: dict[str, Any]) -> FlotillaConfig:
    """The FlotillaConfig a Serve application entry runs: its `args` with the counts from its
    `deployments:` put back (raises pydantic's ValidationError on bad args)."""
    data = copy.deepcopy(app.get("args") or {})
    replicas = {d["name"]: d.get("num_replicas") for d in app.get("deployments") or []}
    for dotted, deployment in MOVED_TO_OVERRIDES.items():
        if replicas.get(deployment) is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = replicas[deployment]
    return FlotillaConfig.model_validate(data)


def runtime_env(cfg: FlotillaConfig) -> dict[str, Any]:
    """The job's (`flotilla serve`) or the app's (`flotilla deploy`) runtime_env. As a job's,
    every process Serve starts inherits it, the proxies included; as an app's, only the build
    task and the replicas do: the proxies and the controller of an existing cluster take their
    environment from `ray start` (see deploy/examples/cluster.yaml)."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        proxy_bind.HOST_ENV: cfg.serve.host,  # the gRPC proxy listens there too
    }
    if cfg.serve.throughput_optimized:
        env |= {
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
            "RAY_SERVE_PROXY_USE_GRPC": "1",
        }
    return {"env_vars": env, "worker_process_setup_hook": PROXY_SETUP_HOOK}


def build(cfg: FlotillaConfig) -> dict[str, Any]:
    """The Serve config (ray.serve.schema.ServeDeploySchema as plain data)."""
    s = cfg.serve
    return {
        "proxy_location": s.proxy_location,
        "http_options": {
            "host": s.host,
            "port": s.http_port,
            "request_timeout_s": s.request_timeout_s,
        },
        "grpc_options": {
            "port": s.grpc_port,
            "grpc_servicer_functions": [GRPC_SERVICER],
            "request_timeout_s": s.request_timeout_s,
        },
        "applications": [
            {
                "name": s.app_name,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": app_args(cfg),
                "runtime_env": runtime_env(cfg),
                "deployments": deployment_overrides(cfg),
            }
        ],
    }


def to_yaml(serve_config: dict[str, Any]) -> str:
    return yaml.safe_dump(serve_config, sort_keys=False, default_flow_style=False)
