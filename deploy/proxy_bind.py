"""Make Serve's gRPC proxy listen on `serve.host` instead of every interface.

Ray Serve 2.60 binds its gRPC server to `[::]:port` whatever the HTTP host is
(ray/serve/_private/grpc_util.py calls `default_impl.add_grpc_address(server, "[::]:port")`),
and gRPCOptions has no host field. When `flotilla serve` starts the cluster it names
`install` as the job's `worker_process_setup_hook`, so it runs first in every process Serve
starts for the job, the proxies included, and it passes the host in `FLOTILLA_GRPC_HOST`
(this module is the proxy's config loader: the environment is how Ray hands it settings).

`install` patches `add_grpc_address` when that module is imported, not before: importing Ray
Serve in every worker process (rank actors too) would cost each of them a second. The same
hook guards the HTTP proxy against headers it cannot decode (deploy.proxy_headers).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

from deploy import proxy_headers

HOST_ENV = "FLOTILLA_GRPC_HOST"
_TARGET = "ray.serve._private.default_impl"


def grpc_address(address: str, host: str) -> str:
    """`[::]:9000` -> `127.0.0.1:9000` (IPv6 hosts bracketed)."""
    port = address.rsplit(":", 1)[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _patch(module) -> None:
    host = os.environ.get(HOST_ENV)
    original = module.add_grpc_address
    if not host or getattr(original, "flotilla_host", None):
        return

    def add_grpc_address(server, address: str):
        return original(server, grpc_address(address, host))

    add_grpc_address.flotilla_host = host  # type: ignore[attr-defined]
    module.add_grpc_address = add_grpc_address


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, target: str = _TARGET, patch=_patch):
        self.target, self.patch = target, patch

    def find_spec(self, name, path, target=None):
        if name != self.target:
            return None
        sys.meta_path.remove(self)  # one shot: find the real module, then wrap its loading
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_then_patch  # type: ignore[method-assign]
        return spec


def install() -> None:
    """The worker_process_setup_hook (see the module docstring)."""
    if not os.environ.get(HOST_ENV):
        return
    for target, patch in ((_TARGET, _patch), (proxy_headers.TARGET, proxy_headers.patch)):
        if target in sys.modules:
            patch(sys.modules[target])
        elif not any(getattr(f, "target", None) == target for f in sys.meta_path):
            sys.meta_path.insert(0, _PatchOnImport(target, patch))
