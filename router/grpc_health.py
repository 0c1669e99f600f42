"""The standard grpc.health.v1.Health service (what Kubernetes gRPC probes, Envoy and
grpc-health-probe call), on the same port as flotilla.v1.

Registered in Serve's gRPC proxy next to flotilla.v1 (router.grpc_server), so the proxy routes
it to the ingress replica like any of our rpcs (its `Check` / `Watch` methods). SERVING means
what the flotilla.v1 Health rpc's "SERVING" means: a replica group is healthy and the router
has the model's limits. The service name may be "" (the server) or "flotilla.v1.Flotilla";
any other is NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch), as the protocol says. No API key
is needed, as for the other health checks. Through Serve's proxy it reaches the application
when the cluster runs only one; with several, the caller must send the `application`
metadata, which most probes cannot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

try:  # the package's messages when it is installed: one definition per process
    from grpc_health.v1 import health_pb2, health_pb2_grpc
except ImportError:
    from router.proto import health_pb2, health_pb2_grpc  # type: ignore[no-redef]

if TYPE_CHECKING:  # the proxy process registers the service without loading the router
    from router.core import Router

SERVICES = ("", "flotilla.v1.Flotilla")
WATCH_INTERVAL_S = 1.0
_Status = health_pb2.HealthCheckResponse


def add_to_server(servicer: Any, server: Any) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def status(router: Router) -> int:
    serving = bool(router.healthy_groups()) and router.limits is not None
    return _Status.SERVING if serving else _Status.NOT_SERVING


def check(router: Router, req: Any, context: Any = None) -> Any:
    if req.service not in SERVICES:
        if context is not None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service {req.service!r}")
        return _Status()
    return _Status(status=status(router))


async def watch(router: Router, req: Any, context: Any = None) -> AsyncIterator[Any]:
    """The status now, then each change (polled every WATCH_INTERVAL_S) until the caller
    goes away."""
    last = None
    while True:
        now = status(router) if req.service in SERVICES else _Status.SERVICE_UNKNOWN
        if now != last:
            yield _Status(status=now)
            last = now
        await asyncio.sleep(WATCH_INTERVAL_S)
