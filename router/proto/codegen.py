"""Generate the Python gRPC stubs from flotilla.proto and health.proto (the standard
grpc.health.v1 service): `python -m router.proto.codegen`.

Run from any directory. The proto is compiled with the repository root as the include path,
so the generated service module imports `router.proto.flotilla_pb2` (a package path that
resolves in the Serve proxy and replicas), not a top-level `flotilla_pb2`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "router/proto/flotilla.proto"
HEALTH_PROTO = "router/proto/health.proto"
GENERATED = tuple(
    f"{stem}{suffix}"
    for stem in ("flotilla", "health")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)


def generate(out_root: Path = ROOT) -> list[Path]:
    """Write the stubs under `out_root`/router/proto/ and return their paths."""
    from grpc_tools import protoc  # a test/dev dependency: only needed to regenerate

    out_dir = Path(out_root) / "router" / "proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(ROOT / PROTO),
        str(ROOT / HEALTH_PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO} or {HEALTH_PROTO}")
    return [out_dir / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
