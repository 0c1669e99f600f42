"""gRPC client for Flotilla's flotilla.v1.Flotilla service (GenerateStream).

Every stream message lists the token ids it carries, so output tokens are counted exactly
from the stream and checked against the usage on the last message. Prompts go out as token
ids, text or chat messages, whichever the spec holds. One channel (HTTP/2, multiplexed) serves
all concurrent requests.
"""

from __future__ import annotations

import time

import grpc

from deploy.bench.clients import EndpointError, SendOptions, client_error
from deploy.bench.records import RequestResult, RequestSpec
from router.proto import flotilla_pb2 as pb
from router.proto import flotilla_pb2_grpc as pb_grpc


class GrpcClient:
    backend = "grpc"

    def __init__(self, address: str, app_name: str = "flotilla"):
        self.address = address
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.FlotillaStub | None = None
        # Serve's gRPC proxy routes by this metadata (optional while only one app runs).
        self.metadata = (("application", app_name),) if app_name else ()

    async def open(self) -> None:
        self.channel = grpc.aio.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", -1)]
        )
        self.stub = pb_grpc.FlotillaStub(self.channel)

    async def probe(self, timeout_s: float) -> list[str]:
        assert self.stub is not None, "open() first"
        try:
            health = await self.stub.Health(
                pb.HealthRequest(), timeout=timeout_s, metadata=self.metadata, wait_for_ready=True
            )
            models = await self.stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout_s, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise EndpointError(
                    f"gRPC endpoint {self.address} unreachable (no answer within {timeout_s:g} s)"
                ) from None
            raise EndpointError(
                f"gRPC endpoint {self.address} not usable: {e.code().name}: {e.details()}"
            ) from None
        if health.status != "SERVING":
            raise EndpointError(f"gRPC endpoint {self.address} reports {health.status}")
        return [m.id for m in models.models]

    def request(self, spec: RequestSpec, opts: SendOptions) -> pb.GenerateRequest:
        params = pb.SamplingParams(max_tokens=spec.max_tokens, temperature=opts.temperature)
        if opts.ignore_eos:
            params.ignore_eos = True
        req = pb.GenerateRequest(model=opts.model, params=params, session_id=spec.session_id or "")
        if spec.prompt_ids is not None:
            req.prompt_token_ids.ids.extend(spec.prompt_ids)
        elif spec.messages is not None:
            req.messages.messages.extend(
                pb.ChatMessage(role=r, content=c) for r, c in spec.messages
            )
        else:
            req.prompt = spec.prompt_text or ""
        return req

    async def send(self, spec: RequestSpec, opts: SendOptions) -> RequestResult:
        assert self.stub is not None, "open() first"
        result = RequestResult(index=spec.index, input_len=spec.input_len, tokens_source="ids")
        tokens = result.chunk_tokens
        assert tokens is not None
        req = self.request(spec, opts)
        t0 = time.perf_counter()
        try:
            call = self.stub.GenerateStream(
                req, timeout=opts.request_timeout_s, metadata=self.metadata
            )
            async for msg in call:
                now = time.perf_counter() - t0
                if msg.token_ids:
                    result.chunk_times.append(now)
                    tokens.append(len(msg.token_ids))
                if msg.finish_reason:
                    result.finish_reason = msg.finish_reason
                if msg.HasField("usage"):
                    result.usage_prompt_tokens = msg.usage.prompt_tokens
                    result.usage_completion_tokens = msg.usage.completion_tokens
        except grpc.aio.AioRpcError as e:
            result.error_code, result.error_message = e.code().name, e.details()
        except Exception as e:  # a client-side failure: reported under its own code
            client_error(result, e)
        result.e2e = time.perf_counter() - t0
        result.streamed_tokens = result.output_tokens = sum(tokens)
        if result.chunk_times:
            result.ttft = result.chunk_times[0]
        if result.error_code is None:
            if result.finish_reason is None:
                result.error_code = "INCOMPLETE_STREAM"
                result.error_message = "the stream ended without a finish_reason"
            else:
                result.ok = True
        return result

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
