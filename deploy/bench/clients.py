"""Endpoint clients: one spec in, one `RequestResult` out, never raising for a failed request
(the failure is the result: its gRPC status name or HTTP status, so errors are counted).

    grpc://host:port          flotilla.v1.Flotilla GenerateStream (deploy.bench.grpc_client)
    http(s)://host:port[/v1]  any OpenAI-compatible server, SSE streaming (deploy.bench.http_client)

`probe()` is the bounded health check done before a run; it raises `EndpointError` with a
message for the user when the endpoint is unreachable or not serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlparse

from deploy.bench.records import RequestResult, RequestSpec

SCHEMES = ("grpc", "http", "https")


class EndpointError(Exception):
    """The endpoint cannot be benchmarked (unreachable, unhealthy, unknown model)."""


@dataclass(frozen=True)
class SendOptions:
    """What every request carries besides its prompt."""

    model: str = ""
    temperature: float = 0.0
    # Generate exactly max_tokens (vLLM and Flotilla both accept it): fixed output lengths.
    ignore_eos: bool = True
    request_timeout_s: float = 300.0
    api: Literal["completions", "chat"] = "completions"  # HTTP endpoint for non-chat specs


class Client(Protocol):
    backend: str

    async def open(self) -> None: ...

    async def probe(self, timeout_s: float) -> list[str]:
        """Model ids the endpoint serves; EndpointError when it is not serving."""
        ...

    async def send(self, spec: RequestSpec, opts: SendOptions) -> RequestResult: ...

    async def close(self) -> None: ...


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """-> (scheme, address): 'grpc://h:p' -> ('grpc', 'h:p'); HTTP keeps the whole base URL.
    ValueError for another scheme or a missing host/port."""
    u = urlparse(endpoint)
    if u.scheme not in SCHEMES:
        raise ValueError(
            f"endpoint {endpoint!r}: unknown scheme {u.scheme or '(none)'!r}; expected "
            "grpc://HOST:PORT or http(s)://HOST:PORT"
        )
    try:
        port = u.port
    except ValueError:
        port = None
    if not u.hostname or (u.scheme == "grpc" and port is None):
        raise ValueError(f"endpoint {endpoint!r}: expected {u.scheme}://HOST:PORT")
    if u.scheme == "grpc":
        return "grpc", f"{u.hostname}:{port}"
    return "http", endpoint.rstrip("/")


def make_client(endpoint: str, app_name: str = "flotilla") -> Client:
    """`app_name`: the Serve application, sent as gRPC metadata ("application", name)."""
    scheme, address = parse_endpoint(endpoint)
    if scheme == "grpc":
        from deploy.bench.grpc_client import GrpcClient

        return GrpcClient(address, app_name)
    from deploy.bench.http_client import HttpClient

    return HttpClient(address)


def client_error(result: RequestResult, exc: BaseException) -> RequestResult:
    """Fill `result` for an exception no API status covers (timeouts, refused connections)."""
    import asyncio

    result.ok = False
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        result.error_code = "TIMEOUT"
    elif isinstance(exc, ConnectionError | OSError):
        result.error_code = "CONNECTION_ERROR"
    else:
        result.error_code = f"CLIENT_ERROR:{type(exc).__name__}"
    result.error_message = str(exc) or type(exc).__name__
    return result
