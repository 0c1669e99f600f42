"""The Serve ingress deployment: one class serving the OpenAI-compatible HTTP API (FastAPI,
through Serve's HTTP proxy) and the flotilla.v1 gRPC service (through Serve's gRPC proxy: a
method named like an rpc serves it; an async generator serves a server-streaming rpc).

deploy/app.py binds the group registry and the pools' deployments into it. The constructor is
async: the replica reports ready only once a group has sent the model's limits and tokenizer.
"""

import logging
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from router import grpc_api, grpc_health, openai_api, utility_api
from router.config import RouterConfig
from router.core import Router
from router.directory import RegistryDirectory
from router.metrics import RequestMetrics
from router.proto import flotilla_pb2 as pb

log = logging.getLogger(__name__)

app = FastAPI(title="Flotilla", docs_url=None, redoc_url=None)


@serve.ingress(app)
class Ingress:
    async def __init__(
        self,
        config: RouterConfig | dict,
        model: str,
        registry: Any,
        pools: dict[str, Any],
    ):
        """`registry`: the app's group registry; `pools`: role -> that pool's deployment."""
        if isinstance(config, dict):
            config = RouterConfig.model_validate(config)
        self.router = Router(
            RegistryDirectory(registry),
            config,
            model,
            RequestMetrics(model),
            info_sources=[pools[r] for r in ("colocated", "decode", "prefill") if r in pools],
            disaggregated="prefill" in pools,
        )
        await self.router.start()

    # ---- HTTP (OpenAI-compatible) ---------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await openai_api.completions(self.router, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await openai_api.chat_completions(self.router, request)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return openai_api.models(self.router, request)

    @app.get("/health")
    async def health(self) -> Response:
        return openai_api.health(self.router)

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await utility_api.tokenize(self.router, request)

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        return await utility_api.detokenize(self.router, request)

    @app.get("/version")
    async def version(self, request: Request) -> Response:
        return utility_api.version(self.router, request)

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        return utility_api.metrics(self.router, request)

    # ---- gRPC (flotilla.v1.Flotilla) --------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:  # noqa: N802
        return await grpc_api.generate(self.router, request, grpc_context)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context):  # noqa: N802
        async for msg in grpc_api.generate_stream(self.router, request, grpc_context):
            yield msg

    async def Health(self, request: pb.HealthRequest) -> pb.HealthResponse:  # noqa: N802
        return await grpc_api.health(self.router)

    async def ListModels(
        self, request: pb.ListModelsRequest, grpc_context
    ) -> pb.ListModelsResponse:  # noqa: N802
        return grpc_api.list_models(self.router, grpc_context)

    async def Abort(self, request: pb.AbortRequest, grpc_context) -> pb.AbortResponse:  # noqa: N802
        return grpc_api.abort(self.router, request, grpc_context)

    # ---- gRPC (grpc.health.v1.Health, registered by router.grpc_server) ---------------------
    async def Check(self, request, grpc_context):  # noqa: N802
        return grpc_health.check(self.router, request, grpc_context)

    async def Watch(self, request, grpc_context):  # noqa: N802
        async for msg in grpc_health.watch(self.router, request, grpc_context):
            yield msg

    # ---- operations (DeploymentHandle only) --------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config hook (also callable through a handle): switch the routing
        policy without restarting, e.g. {"policy": "round_robin"}."""
        policy = user_config.get("policy")
        if policy and getattr(self, "router", None) is not None:
            self.router.set_policy(policy)

    async def group_stats(self, refresh: bool = True) -> list[dict[str, Any]]:
        if refresh:
            await self.router.poll_once()
        return self.router.group_stats()

    def identity(self) -> dict[str, Any]:
        """Which router replica answered: its router id (as groups know it, e.g. in their
        stats' router_requests) and its Ray actor name (for fault tests)."""
        return {
            "router_id": self.router.router_id,
            "actor": ray.get_runtime_context().get_actor_name(),
        }

    def router_counters(self) -> dict[str, int]:
        """This router replica's request migrations and prefill fallbacks so far."""
        return dict(self.router.counters)

    async def drain_groups(self) -> int:
        """App shutdown: every group refuses new requests; returns how many are in flight."""
        return await self.router.drain_groups()

    def __del__(self) -> None:
        router = getattr(self, "router", None)
        if router is not None:
            router.stop()
