"""Config -> Ray Serve application: one deployment per pool, a group registry, and the
router ingress bound to both.

    build_app(FlotillaConfig) -> Application    (also usable as a Serve YAML `import_path`:
                                                  deploy.app:build_app with the config as args)

Deployments: `router` (the ingress), `registry` (cluster.registry: which groups exist and
where their data planes listen) and one per pool -- `groups` (colocated), or `prefill` and
`decode` -- whose replicas are the replica groups (cluster.served_group). A pool scales by its
replica count; the router finds its groups through the registry, so its policy -- not Serve's
load balancing -- decides which group serves a request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve.config import gRPCOptions

from cluster.registry import GroupRegistry
from cluster.served_group import REGISTRY, ServedGroup
from deploy import proxy_bind
from deploy.autoscaling import app_autoscaling_policy, serve_autoscaling_config
from deploy.config import FlotillaConfig, PoolSpec
from router.ingress import Ingress

# Our registration wraps the stock one; see router/grpc_server.py for why.
GRPC_SERVICER = "router.grpc_server.add_servicer"

# Serve calls for info besides the requests themselves (which travel on the data plane).
_GROUP_CONTROL_HEADROOM = 64
# Serve kills a replica this long after its drain (ServedGroup.__del__) ran out of time.
_SHUTDOWN_MARGIN_S = 5.0


def pool_options(config: FlotillaConfig, spec: PoolSpec) -> dict[str, Any]:
    """A pool deployment's options that may change while it runs -- its group count (fixed, or
    an autoscaling config) and `user_config` -- which Serve applies in place. The Serve YAML
    carries them as `deployments:` overrides (pool_overrides), never in the app's args: Serve
    restarts every replica when the args change."""
    out: dict[str, Any] = (
        {"num_replicas": spec.groups}
        if spec.autoscaling is None
        else {"autoscaling_config": serve_autoscaling_config(spec.autoscaling)}
    )
    # With threads unset, each group takes this share of its node's cores (ServedGroup).
    out["user_config"] = {"cpu_share": round(1.0 / config.max_groups(), 6)}
    return out


def pool_deployment(config: FlotillaConfig, spec: PoolSpec, counts: bool) -> serve.Deployment:
    s = config.serve
    sched, engine = spec.engine.scheduler, spec.engine
    # A one-rank group runs the model inside the Serve replica: on CUDA it needs its GPU there
    # (Ray hides every GPU from an actor that asked for none). Multi-rank groups place their
    # rank actors, one GPU each, themselves (cluster.ray_executor).
    group_gpus = 1 if engine.model.device == "cuda" and engine.parallel.is_single else 0
    options = pool_options(config, spec)
    if not counts:  # the Serve YAML's overrides set them
        options = {"user_config": options["user_config"]}
    return serve.deployment(ServedGroup).options(
        name=spec.deployment,
        max_ongoing_requests=sched.max_num_seqs + sched.max_waiting + _GROUP_CONTROL_HEADROOM,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": group_gpus},
        health_check_period_s=s.health_check_period_s,
        graceful_shutdown_timeout_s=s.group_graceful_shutdown_s + _SHUTDOWN_MARGIN_S,
        graceful_shutdown_wait_loop_s=0.5,
        logging_config={"enable_access_log": False},
        **options,
    )


def build_app(config: FlotillaConfig | dict[str, Any], counts: bool = True) -> serve.Application:
    """The application. `counts=False` leaves the pools' group counts to the Serve config's
    deployment overrides (declarative_app)."""
    if not isinstance(config, FlotillaConfig):
        config = FlotillaConfig.model_validate(config)
    s, pools = config.serve, config.pools
    registry = (
        serve.deployment(GroupRegistry)
        .options(
            name=REGISTRY,
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            health_check_period_s=s.health_check_period_s,
            logging_config={"enable_access_log": False},
        )
        .bind()
    )
    bound = {
        spec.role: pool_deployment(config, spec, counts).bind(
            spec.engine,
            spec.role,
            pools.kv_lease_s if pools else 30.0,
            pools.kv_transfer_timeout_s if pools else 30.0,
            s.group_graceful_shutdown_s,
        )
        for spec in config.pool_specs()
    }
    ingress = serve.deployment(Ingress).options(
        name="router",
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=s.ingress_max_ongoing_requests,
        max_queued_requests=s.ingress_max_queued_requests,
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
        health_check_period_s=s.health_check_period_s,
    )
    return ingress.bind(config.router, config.model_name, registry, bound)


def declarative_app(config: dict[str, Any]) -> serve.Application:
    """The Serve YAML's import path: counts come from the `deployments:` overrides."""
    return build_app(config, counts=False)


_COUNT_FIELDS = ("groups", "autoscaling")


def app_args(config: FlotillaConfig) -> dict[str, Any]:
    """The config as the Serve YAML's `args`: everything but the group counts (pool_options)."""
    args = config.model_dump(mode="json", exclude_unset=True)
    for key in _COUNT_FIELDS:
        args.pop(key, None)
    pools = args.get("pools")
    if pools:
        pools.pop("autoscaling_ratio", None)
        for role in ("prefill", "decode"):
            for key in _COUNT_FIELDS:
                pools.get(role, {}).pop(key, None)
    return args


def pool_overrides(config: FlotillaConfig) -> list[dict[str, Any]]:
    """The Serve YAML's `deployments:` entries: each pool's count and user_config."""
    return [{"name": p.deployment, **pool_options(config, p)} for p in config.pool_specs()]


def application(config: FlotillaConfig) -> dict[str, Any]:
    """The app's entry in a Serve config (`applications:`), as `serve deploy` takes it."""
    app: dict[str, Any] = {
        "name": config.serve.app_name,
        "route_prefix": "/",
        "import_path": "deploy.app:declarative_app",
        "args": app_args(config),
        "runtime_env": runtime_env(config),
        "deployments": pool_overrides(config),
    }
    policy = app_autoscaling_policy(config)
    if policy is not None:
        app["autoscaling_policy"] = policy
    return app


def grpc_options(config: FlotillaConfig) -> gRPCOptions:
    return gRPCOptions(
        port=config.serve.grpc_port,
        grpc_servicer_functions=[GRPC_SERVICER],
        request_timeout_s=config.serve.request_timeout_s,
    )


def http_options(config: FlotillaConfig) -> dict[str, Any]:
    return {
        "host": config.serve.host,
        "port": config.serve.http_port,
        "request_timeout_s": config.serve.request_timeout_s,
    }


def runtime_env(config: FlotillaConfig) -> dict[str, Any]:
    """The `runtime_env` for ray.init when we start the cluster: every process Serve starts for
    this job (controller, proxies, replicas) inherits these variables."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        proxy_bind.HOST_ENV: config.serve.host,  # the gRPC proxy listens there too
    }
    if config.serve.throughput_optimized:
        env |= {
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",  # keep the HTTP and gRPC proxies
            "RAY_SERVE_PROXY_USE_GRPC": "1",
        }
    return {"env_vars": env, "worker_process_setup_hook": "deploy.proxy_bind.install"}


def start(config: FlotillaConfig, timeout_s: float = 900.0) -> serve.handle.DeploymentHandle:
    """serve.start with our proxies' options, then apply the app the way `serve deploy` does
    (declaratively: later applies change group counts in place, and an app-level autoscaling
    policy is only taken this way); returns the router's handle once the app is RUNNING.
    Ray must be initialized. Proxy options are fixed by the first serve.start in a cluster."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options=http_options(config), grpc_options=grpc_options(config))
    apply(_get_global_client(), ServeDeploySchema, config)
    wait_running(config.serve.app_name, timeout_s)
    return serve.get_deployment_handle("router", config.serve.app_name)


def apply(client: Any, schema: Any, config: FlotillaConfig) -> None:
    """Deploy our app, keeping every other app the controller runs (a deploy of a config
    replaces the whole set, as `serve deploy` does)."""
    ours = application(config)
    others = [a for a in _current_apps(client) if a.get("name") != ours["name"]]
    client.deploy_apps(schema(applications=[*others, ours]))


def _current_apps(client: Any) -> list[dict[str, Any]]:
    try:
        details = client.get_serve_details()
    except Exception:  # no app yet
        return []
    apps = details.get("applications", {}) if isinstance(details, dict) else {}
    return [
        a["deployed_app_config"]
        for a in apps.values()
        if isinstance(a, dict) and a.get("deployed_app_config")
    ]


def wait_running(app_name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        status = getattr(app, "status", None)
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"the app failed to deploy: {app.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the app is not running after {timeout_s:g} s: {status}")
        time.sleep(0.25)


def drain(config: FlotillaConfig, timeout_s: float, report: Callable[[str], None] = print) -> int:
    """Stop admitting, then wait up to `timeout_s` for in-flight requests to finish: every group
    refuses new requests (the routers answer UNAVAILABLE / 503 "shutting down") while its
    running streams go on. Returns how many were still running when the wait ended. Ctrl-C and
    SIGTERM take this path; a group removed alone (scale-down) drains itself
    (cluster.served_group)."""
    router = serve.get_deployment_handle("router", config.serve.app_name)

    def in_flight() -> int:
        return router.drain_groups.remote().result(timeout_s=30)

    left = in_flight()
    deadline = time.monotonic() + timeout_s
    report(
        f"stopping: new requests are refused; {left} request(s) in flight"
        + (f", waiting up to {timeout_s:g} s for them" if left else "")
    )
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = in_flight()
    return left
