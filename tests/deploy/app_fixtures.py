"""What the real-Serve test modules of tests/deploy share: free loopback ports, the config of
an app of a tiny seeded model, one Ray cluster with the app running for a module (stopped
whatever happens), and a gRPC stub on its port."""

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


def tiny_app_config(model: str, overrides: dict[str, Any] | None = None):
    """A FlotillaConfig serving `model` (a tiny seeded model's directory) on loopback ports of
    its own, with small caches and queues and one thread per group; `overrides` is merged
    into it section by section (a None value removes the key, e.g. "groups" for "pools")."""
    from deploy.config import FlotillaConfig

    base: dict[str, Any] = {
        "engine": {
            "model": {"model": model, "dtype": "float32", "max_model_len": 1024, "num_threads": 1},
            "cache": {"block_size": 8, "num_blocks": 1024},
            "scheduler": {"max_num_seqs": 8, "max_waiting": 8},
        },
        "groups": 1,
        "router": {"stats_interval_s": 0.1},
        "serve": {
            "http_port": free_port(),
            "grpc_port": free_port(),
            "metrics_export_port": None,
            "group_num_cpus": 0.5,
            "group_graceful_shutdown_s": 1.0,
        },
    }
    return FlotillaConfig.model_validate(_merge(base, overrides or {}))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@contextlib.contextmanager
def running_app(config, num_cpus: int = 4, runtime_env: dict | None = None) -> Iterator[Any]:
    """A local Ray cluster running `config`'s app; yields the router's handle."""
    import ray

    from deploy.app import runtime_env as app_env
    from deploy.app import start

    env = runtime_env or app_env(config)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=env)
    try:
        yield start(config)
    finally:
        stop_local_cluster()


@contextlib.contextmanager
def grpc_stub(config) -> Iterator[pb_grpc.FlotillaStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}")
    try:
        yield pb_grpc.FlotillaStub(channel)
    finally:
        channel.close()


def stop_local_cluster() -> None:
    """End a local Ray cluster started by ray.init with a Serve app on it: ray.shutdown() stops
    every process of it (replicas, proxy, controller); a serve.shutdown() first would only add
    ~6 s of graceful draining per module. The driver's cached Serve client is dropped so that
    the next module's serve.start makes a new one."""
    import ray
    from ray.serve.context import _set_global_client

    ray.shutdown()
    _set_global_client(None)
