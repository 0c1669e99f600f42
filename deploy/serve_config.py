"""FlotillaConfig -> a plain Ray Serve config (what `serve deploy` and a KubeRay RayService's
`serveConfigV2` take), and back. Pure: no cluster, no Ray import.

    build(cfg) -> dict                 the whole Serve config, one application
    application(cfg) -> dict           that application's entry (`flotilla serve` applies it too)
    deployment_overrides(cfg)          the `deployments:` entries (counts, user_config)
    app_args(cfg) / config_of(app)     the app's `args`, and the FlotillaConfig an entry runs

Counts live in `deployments:`, not in `args`: Serve hashes `import_path`, `runtime_env` and
`args` into the app's code version, and a new code version restarts every replica, while a
changed `num_replicas`, `autoscaling_config` (its policy's kwargs aside) or `user_config` is
applied in place. So the router count, each pool's `groups` or `autoscaling`, and the pools'
`autoscaling_ratio` (an app-level `autoscaling_policy`) are left out of `args` and put back
by `config_of`.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from deploy import proxy_bind
from deploy.autoscaling import (
    DEFAULT_TARGET,
    AutoscalingSpec,
    app_autoscaling_policy,
    serve_autoscaling_config,
)
from deploy.config import FlotillaConfig, PoolSpec

# Counts come from the overrides (deploy.app.declarative_app leaves them unset in code).
IMPORT_PATH = "deploy.app:declarative_app"
# Our registration wraps the stock one; see router/grpc_server.py for why.
GRPC_SERVICER = "router.grpc_server.add_servicer"
PROXY_SETUP_HOOK = "deploy.proxy_bind.install"
ROUTER_DEPLOYMENT = "router"
_COUNTS = ("groups", "autoscaling")


def pool_options(cfg: FlotillaConfig, spec: PoolSpec) -> dict[str, Any]:
    """A pool deployment's options that may change while it runs: its group count (fixed, or
    an autoscaling config) and `user_config` (with threads unset, each group takes this share
    of its node's cores: cluster.served_group)."""
    out: dict[str, Any] = (
        {"num_replicas": spec.groups}
        if spec.autoscaling is None
        else {"autoscaling_config": serve_autoscaling_config(spec.autoscaling)}
    )
    out["user_config"] = {"cpu_share": round(1.0 / cfg.max_groups(), 6)}
    return out


def deployment_overrides(cfg: FlotillaConfig) -> list[dict[str, Any]]:
    """The `deployments:` entries: the router count, then each pool's options."""
    out = [{"name": ROUTER_DEPLOYMENT, "num_replicas": cfg.serve.ingress_replicas}]
    out += [{"name": p.deployment, **pool_options(cfg, p)} for p in cfg.pool_specs()]
    return out


def app_args(cfg: FlotillaConfig) -> dict[str, Any]:
    """The config as plain data: only the fields the user set (so `groups` and `pools` never
    both appear, and a new default in a later Flotilla reaches a redeploy), JSON types only,
    minus the counts that `deployments:` carries."""
    data = cfg.model_dump(mode="json", exclude_unset=True)
    data.get("serve", {}).pop("ingress_replicas", None)
    for key in _COUNTS:
        data.pop(key, None)
    pools = data.get("pools")
    if pools:
        pools.pop("autoscaling_ratio", None)
        for role in ("prefill", "decode"):
            for key in _COUNTS:
                pools.get(role, {}).pop(key, None)
    return data


def _autoscaling_of(ac: dict[str, Any]) -> dict[str, Any]:
    """serve_autoscaling_config's inverse."""
    kw = ac["policy"]["policy_kwargs"]
    spec = {
        "min_groups": ac["min_replicas"],
        "max_groups": ac["max_replicas"],
        "initial_groups": ac.get("initial_replicas"),
        "policy": kw["policy"],
        "hysteresis": kw["hysteresis"],
        "upscale_delay_s": ac["upscale_delay_s"],
        "downscale_delay_s": ac["downscale_delay_s"],
        "cooldown_s": kw["cooldown_s"],
        "metrics_interval_s": ac["metrics_interval_s"],
        "look_back_period_s": ac["look_back_period_s"],
    }
    if kw["target"] != DEFAULT_TARGET[kw["policy"]]:
        spec["target"] = kw["target"]
    return AutoscalingSpec.model_validate(spec).model_dump(mode="json", exclude_defaults=True)


def config_of(app: dict[str, Any]) -> FlotillaConfig:
    """The FlotillaConfig a Serve application entry runs: its `args` with the counts from its
    `deployments:` put back (raises pydantic's ValidationError on bad args)."""
    data = copy.deepcopy(app.get("args") or {})
    deps = {d["name"]: d for d in app.get("deployments") or []}
    router = deps.get(ROUTER_DEPLOYMENT, {}).get("num_replicas")
    if router is not None:
        data.setdefault("serve", {})["ingress_replicas"] = router
    pools = data.get("pools")
    for name, node in (("groups", data),) if pools is None else (
        ("prefill", pools.setdefault("prefill", {})),
        ("decode", pools.setdefault("decode", {})),
    ):  # fmt: skip
        dep = deps.get(name, {})
        if dep.get("autoscaling_config"):
            node["autoscaling"] = _autoscaling_of(dep["autoscaling_config"])
        elif dep.get("num_replicas") is not None:
            node["groups"] = dep["num_replicas"]
    policy = app.get("autoscaling_policy")
    if pools is not None and policy:
        ratio = policy["policy_kwargs"]["prefill_per_decode"]
        pools["autoscaling_ratio"] = {"prefill_per_decode": ratio}
    return FlotillaConfig.model_validate(data)


def application(cfg: FlotillaConfig) -> dict[str, Any]:
    """The app's entry in a Serve config (`applications:`)."""
    app: dict[str, Any] = {
        "name": cfg.serve.app_name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": app_args(cfg),
        "runtime_env": runtime_env(cfg),
        "deployments": deployment_overrides(cfg),
    }
    policy = app_autoscaling_policy(cfg)
    if policy is not None:
        app["autoscaling_policy"] = policy
    return app


def runtime_env(cfg: FlotillaConfig) -> dict[str, Any]:
    """The job's (`flotilla serve`) or the app's (`flotilla deploy`) runtime_env. As a job's,
    every process Serve starts inherits it, the proxies included; as an app's, only the build
    task and the replicas do: the proxies and the controller of an existing cluster take their
    environment from `ray start` (see deploy/examples/cluster.yaml)."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        proxy_bind.HOST_ENV: cfg.serve.host,  # the gRPC proxy listens there too
        # Fewer wake-ups of Serve's own loops: each one preempts an engine thread mid-step.
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": str(cfg.serve.control_loop_interval_s),
        "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": str(cfg.serve.metrics_export_interval_ms),
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
            "enable_reflection": True,
        },
        "applications": [application(cfg)],
    }


def to_yaml(serve_config: dict[str, Any]) -> str:
    return yaml.safe_dump(serve_config, sort_keys=False, default_flow_style=False)
