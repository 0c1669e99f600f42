"""Config -> Ray Serve application: N replica-group deployments bound into the router ingress.

    build_app(FlotillaConfig) -> Application    (also usable as a Serve YAML `import_path`:
                                                  deploy.app:build_app with the config as args)

Each group is its own deployment with one replica (named group-0, group-1, ...), so the
router's policy -- not Serve's default load balancing -- decides where a request goes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve.config import gRPCOptions

from cluster.config import EngineConfig
from cluster.replica_group import ReplicaGroup
from deploy.config import FlotillaConfig, GroupSpec
from deploy.serve_config import GRPC_SERVICER
from deploy.serve_config import runtime_env as runtime_env  # re-exported: one definition
from router.ingress import Ingress

# Serve calls for stats / info besides the requests themselves.
_GROUP_CONTROL_HEADROOM = 64


def group_names(config: FlotillaConfig) -> list[str]:
    return [g.name for g in config.group_specs()]


def engine_config(config: FlotillaConfig, spec: GroupSpec | None = None) -> EngineConfig:
    """A group's EngineConfig. Unset torch threads become this machine's cores shared among
    the groups: Ray starts workers with OMP_NUM_THREADS=1, which would leave each engine one
    thread. (On a multi-node cluster, set engine.model.num_threads explicitly.)"""
    specs = config.group_specs()
    engine = (spec or specs[0]).engine
    if engine.model.num_threads is None:
        threads = max(1, (os.cpu_count() or 1) // len(specs))
        engine = engine.model_copy(
            update={"model": engine.model.model_copy(update={"num_threads": threads})}
        )
    return engine


def build_app(config: FlotillaConfig | dict[str, Any]) -> serve.Application:
    if not isinstance(config, FlotillaConfig):
        config = FlotillaConfig.model_validate(config)
    s, pools = config.serve, config.pools
    group_deployment = serve.deployment(ReplicaGroup)
    groups = {}
    for spec in config.group_specs():
        sched, engine = spec.engine.scheduler, spec.engine
        # A one-rank group runs the model inside the Serve replica: on CUDA it needs its GPU
        # there (Ray hides every GPU from an actor that asked for none). Multi-rank groups
        # place their rank actors, one GPU each, themselves (cluster.ray_executor).
        group_gpus = 1 if engine.model.device == "cuda" and engine.parallel.is_single else 0
        groups[spec.name] = group_deployment.options(
            name=spec.name,
            num_replicas=1,
            # Above what the engine admits, so an overloaded engine refuses (429 /
            # RESOURCE_EXHAUSTED) instead of Serve queueing silently in front of it.
            max_ongoing_requests=sched.max_num_seqs + sched.max_waiting + _GROUP_CONTROL_HEADROOM,
            ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": group_gpus},
            health_check_period_s=s.health_check_period_s,
            graceful_shutdown_timeout_s=s.group_graceful_shutdown_s,
            graceful_shutdown_wait_loop_s=0.5,
            # The router polls stats() several times a second: keep those calls out of the log.
            logging_config={"enable_access_log": False},
        ).bind(
            engine_config(config, spec),
            spec.name,
            spec.role,
            pools.kv_lease_s if pools else 30.0,
            pools.kv_transfer_timeout_s if pools else 30.0,
        )
    ingress = serve.deployment(Ingress).options(
        name="router",
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=s.ingress_max_ongoing_requests,
        max_queued_requests=s.ingress_max_queued_requests,
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
        health_check_period_s=s.health_check_period_s,
    )
    roles = {spec.name: spec.role for spec in config.group_specs()}
    return ingress.bind(config.router, config.model_name, groups, roles)


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


def start(config: FlotillaConfig, blocking: bool = False) -> serve.handle.DeploymentHandle:
    """serve.start with our proxies' options, then run the app; returns the router's handle.
    Ray must be initialized. Proxy options are fixed by the first serve.start in a cluster."""
    serve.start(
        proxy_location=config.serve.proxy_location,
        http_options=http_options(config),
        grpc_options=grpc_options(config),
    )
    return serve.run(
        build_app(config), name=config.serve.app_name, route_prefix="/", blocking=blocking
    )


def drain(config: FlotillaConfig, timeout_s: float, report: Callable[[str], None] = print) -> int:
    """Stop admitting, then wait up to `timeout_s` for in-flight requests to finish: every group
    refuses new requests (the routers answer UNAVAILABLE / 503 "shutting down") while its
    running streams go on. Returns how many were still running when the wait ended. The same
    path serves Ctrl-C, SIGTERM and (later) scale-down."""
    handles = [
        serve.get_deployment_handle(name, config.serve.app_name) for name in group_names(config)
    ]
    in_flight = sum(h.drain.remote().result(timeout_s=30) for h in handles)
    deadline = time.monotonic() + timeout_s
    report(
        f"stopping: new requests are refused; {in_flight} request(s) in flight"
        + (f", waiting up to {timeout_s:g} s for them" if in_flight else "")
    )
    while in_flight and time.monotonic() < deadline:
        time.sleep(0.25)
        in_flight = sum(h.drain.remote().result(timeout_s=30) for h in handles)
    return in_flight
