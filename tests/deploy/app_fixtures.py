"""What the real-Serve test modules of tests/deploy share: free loopback ports, one Ray cluster
with the app running for a module (stopped whatever happens), and a gRPC stub on its port."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import grpc

from router.proto import flotilla_pb2_grpc as pb_grpc

META = (("application", "flotilla"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(config, num_cpus: int = 4, runtime_env: dict | None = None) -> Iterator[Any]:
    """A local Ray cluster running `config`'s app; yields the router's handle."""
    import ray
    from ray import serve

    from deploy.app import runtime_env as app_env
    from deploy.app import start

    env = runtime_env or app_env(config)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=env)
    try:
        yield start(config)
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def grpc_stub(config) -> Iterator[pb_grpc.FlotillaStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}")
    try:
        yield pb_grpc.FlotillaStub(channel)
    finally:
        channel.close()
