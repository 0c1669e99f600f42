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
from deploy import serve_config
from deploy.config import FlotillaConfig, PoolSpec
from deploy.serve_config import GRPC_SERVICER, pool_options
from deploy.serve_config import runtime_env as runtime_env  # re-exported: one definition
from router.ingress import Ingress

# Serve calls for info besides the requests themselves (which travel on the data plane).
_GROUP_CONTROL_HEADROOM = 64
# Serve kills a replica this long after its drain (ServedGroup.__del__) ran out of time.
_SHUTDOWN_MARGIN_S = 5.0
# How often a stopping replica checks whether its requests are done (Serve's default 2 s: a
# router or registry with nothing in flight took 2 s to stop).
_WAIT_LOOP_S = 0.5


def pool_deployment(config: FlotillaConfig, spec: PoolSpec, counts: bool) -> serve.Deployment:
    s = config.serve
    sched, engine = spec.engine.scheduler, spec.engine
    # A one-rank group runs the model inside the Serve replica: on CUDA it needs its GPU there
    # (Ray hides every GPU from an actor that asked for none). Multi-rank groups place their
    # rank actors, one GPU each, themselves (cluster.ray_executor).
    group_gpus = 1 if engine.model.device == "cuda" and engine.parallel.is_single else 0
    actor = {"num_cpus": spec.num_cpus, "num_gpus": group_gpus}
    if spec.resources:  # pins the pool's groups to the nodes that have them
        actor["resources"] = dict(spec.resources)
    options = pool_options(config, spec)
    if not counts:  # the Serve YAML's overrides set them
        options = {"user_config": options["user_config"]}
    return serve.deployment(ServedGroup).options(
        name=spec.deployment,
        max_ongoing_requests=sched.max_num_seqs + sched.max_waiting + _GROUP_CONTROL_HEADROOM,
        ray_actor_options=actor,
        health_check_period_s=s.health_check_period_s,
        health_check_timeout_s=s.health_check_timeout_s,
        graceful_shutdown_timeout_s=s.group_graceful_shutdown_s + _SHUTDOWN_MARGIN_S,
        graceful_shutdown_wait_loop_s=_WAIT_LOOP_S,
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
            health_check_timeout_s=s.health_check_timeout_s,
            graceful_shutdown_wait_loop_s=_WAIT_LOOP_S,
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
            pools.kv_arena_mib if pools else 0,
            pools.kv_transport if pools else "auto",
            config.kv_link_backend(),
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
        health_check_timeout_s=s.health_check_timeout_s,
        graceful_shutdown_wait_loop_s=_WAIT_LOOP_S,
    )
    return ingress.bind(config.router, config.model_name, registry, bound)


def declarative_app(config: dict[str, Any]) -> serve.Application:
    """The Serve YAML's import path: counts come from the `deployments:` overrides."""
    return build_app(config, counts=False)


def grpc_options(config: FlotillaConfig) -> gRPCOptions:
    return gRPCOptions(
        port=config.serve.grpc_port,
        grpc_servicer_functions=[GRPC_SERVICER],
        request_timeout_s=config.serve.request_timeout_s,
        enable_reflection=True,  # Serve's default, said here: grpcurl lists flotilla.v1
    )


def http_options(config: FlotillaConfig) -> dict[str, Any]:
    return {
        "host": config.serve.host,
        "port": config.serve.http_port,
        "request_timeout_s": config.serve.request_timeout_s,
    }


def start(config: FlotillaConfig, timeout_s: float = 900.0) -> serve.handle.DeploymentHandle:
    """serve.start with our proxies' options, then apply the app the way `serve deploy` does
    (declaratively: later applies change group counts in place, and an app-level autoscaling
    policy is only taken this way); returns the router's handle once the app is RUNNING.
    Ray must be initialized. Proxy options are fixed by the first serve.start in a cluster."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start(
        proxy_location=config.serve.proxy_location,
        http_options=http_options(config),
        grpc_options=grpc_options(config),
    )
    apply(_get_global_client(), ServeDeploySchema, config)
    wait_running(config.serve.app_name, timeout_s)
    return serve.get_deployment_handle("router", config.serve.app_name)


def apply(client: Any, schema: Any, config: FlotillaConfig) -> None:
    """Deploy our app, keeping every other app the controller runs (a deploy of a config
    replaces the whole set, as `serve deploy` does)."""
    ours = serve_config.application(config)
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
