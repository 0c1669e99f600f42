"""What the real-Serve test modules of tests/deploy share: free loopback ports, the config of
an app of a tiny seeded model, a Ray cluster with Serve running the app for a module, and a
gRPC stub on its port.

The cluster outlives the module: starting Ray and Serve is ~11 s of a 2-core machine, so the
next module that runs an app on the same cluster settings (job runtime_env, proxy
options -- all in `_cluster_key`) deploys into it; only the app is deleted at the module's
end. A module with other settings gets a fresh cluster. tests/conftest.py stops it before
any test of a module that does not use `running_app` (such a module may start Ray itself, and
ray.init() would attach to this one) and at the end of the session; tests/deploy/conftest.py
runs the modules that use it one after another."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import grpc

from router.proto import flotilla_pb2_grpc as pb_grpc

META = (("application", "flotilla"),)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (each socket is held until all are bound)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


# The proxies' ports (fixed by a cluster's first serve.start) and Ray's metrics export port:
# one set for the session, so that every app of a shared cluster listens where its config says.
HTTP_PORT, GRPC_PORT, METRICS_PORT = free_ports(3)
# A cluster's CPUs: what the largest app here asks for (two TP-2 groups and two routers).
NUM_CPUS = 6


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
            "http_port": HTTP_PORT,
            "grpc_port": GRPC_PORT,
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
def running_app(config) -> Iterator[Any]:
    """`config`'s app running on a local Ray cluster (the shared one where its settings match);
    yields the router's handle. The app is deleted afterwards; if that fails, the cluster goes."""
    from deploy.app import runtime_env as app_env
    from deploy.app import start

    if not _SHARED["marked"]:
        raise RuntimeError("a module that uses running_app is marked pytest.mark.serve_cluster")
    env = app_env(config)
    _ensure_cluster(_cluster_key(config, env), env)
    try:
        yield start(config)
    finally:
        _delete_app(config.serve.app_name)


# key: the running shared cluster's _cluster_key (None: none is up); marked: whether the test
# being set up is marked serve_cluster (tests/conftest.py says so before each test).
_SHARED: dict[str, Any] = {"key": None, "marked": False}


def enter_test(marked: bool) -> None:
    _SHARED["marked"] = marked
    if not marked:
        stop_shared_cluster()


def _cluster_key(config, env: dict) -> str:
    """What a cluster and its Serve instance fix at their start (the CPUs are always
    NUM_CPUS)."""
    from deploy.app import grpc_options, http_options

    grpc = grpc_options(config)
    return json.dumps(
        {
            "env": env,
            "http": http_options(config),
            "grpc": [grpc.port, grpc.request_timeout_s, grpc.grpc_servicer_functions],
            "proxy_location": str(config.serve.proxy_location),
        },
        sort_keys=True,
        default=str,
    )


def _ensure_cluster(key: str, env: dict) -> None:
    import ray

    if _SHARED["key"] == key and ray.is_initialized():
        return
    stop_shared_cluster()
    ray.init(
        num_cpus=NUM_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=env,
        _metrics_export_port=METRICS_PORT,
    )
    _SHARED["key"] = key


def _delete_app(name: str) -> None:
    """Delete the app and wait until its replicas are gone (serve.delete blocks until then);
    a cluster whose app will not go is not reused. Every replica must have stopped by itself:
    one that Serve force-killed after its grace period never freed its engine (a group once
    waited 10 s on the registry that was being deleted with it)."""
    from ray import serve

    before = _controller_log_sizes()
    try:
        serve.delete(name, _blocking=True)
    except BaseException:
        stop_shared_cluster()
        raise
    killed = [ln for ln in _controller_log_since(before) if "force-killing" in ln]
    assert not killed, f"deleting app {name!r}: replicas force-killed: {killed}"


def _controller_logs() -> list[Any]:
    """The Serve controller's log files (a restarted controller writes a new one)."""
    from pathlib import Path

    import ray._private.worker

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return sorted(logs.glob("controller_*.log"))


def _controller_log_sizes() -> dict[Any, int]:
    return {p: p.stat().st_size for p in _controller_logs()}


def _controller_log_since(sizes: dict[Any, int]) -> list[str]:
    lines: list[str] = []
    for p in _controller_logs():
        with open(p, "rb") as f:
            f.seek(sizes.get(p, 0))
            lines += f.read().decode(errors="replace").splitlines()
    return lines


def stop_shared_cluster() -> None:
    """Stop the shared cluster if it is up; a cluster a module started itself is left alone."""
    if _SHARED["key"] is None:
        return
    _SHARED["key"] = None
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
