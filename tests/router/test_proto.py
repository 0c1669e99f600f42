"""The checked-in gRPC stubs say what flotilla.proto and health.proto say (regenerate with
`make proto`).

What matters is the API, not which grpcio-tools release wrote the files: the messages and
services are compared as protobuf descriptors, and the service module as text with its
generator-version stamp masked. A release of grpcio-tools alone therefore cannot fail this
test; an edit of the proto without `make proto` does.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from google.protobuf import descriptor_pb2

from router.proto import codegen, health_pb2
from router.proto import flotilla_pb2 as pb

_STAMP = re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M)


def _descriptor_of(pb2_source: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto that a generated _pb2.py registers (its AddSerializedFile
    argument), without importing it (the proto is registered already in this process)."""
    m = re.search(r"AddSerializedFile\((b'.*?')\)\n", pb2_source, re.S)
    assert m, "no AddSerializedFile(...) in the generated module"
    return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(m.group(1)))


def test_messages_and_services_match_the_proto(tmp_path):
    codegen.generate(tmp_path)
    for module, service in ((pb, "Flotilla"), (health_pb2, "Health")):
        name = module.__name__.rsplit(".", 1)[1]
        fresh = tmp_path / "router" / "proto" / f"{name}.py"
        want = _descriptor_of(fresh.read_text())
        have = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert have == want, f"router/proto/{name}.py is stale: run `make proto`"
        assert [s.name for s in have.service] == [service]


def test_service_module_matches_the_proto(tmp_path):
    codegen.generate(tmp_path)
    for name in ("flotilla_pb2_grpc.py", "health_pb2_grpc.py"):
        fresh = (tmp_path / "router" / "proto" / name).read_text()
        checked_in = (codegen.ROOT / "router" / "proto" / name).read_text()
        mask = "GRPC_GENERATED_VERSION = '*'"
        assert _STAMP.sub(mask, checked_in) == _STAMP.sub(mask, fresh), (
            f"router/proto/{name} is stale: run `make proto`"
        )


def test_the_check_sees_a_changed_proto(tmp_path, monkeypatch):
    """Guard for the test above: a proto edited without regenerating is caught."""
    edited = tmp_path / "src" / codegen.PROTO
    edited.parent.mkdir(parents=True)
    text = (codegen.ROOT / codegen.PROTO).read_text()
    (edited.parent / "health.proto").write_text((codegen.ROOT / codegen.HEALTH_PROTO).read_text())
    edited.write_text(
        text.replace(
            "message SamplingParams {",
            "message SamplingParams {\n  optional uint32 extra_field_for_test = 99;",
            1,
        )
    )
    monkeypatch.setattr(codegen, "ROOT", tmp_path / "src")
    codegen.generate(tmp_path / "out")
    want = _descriptor_of((tmp_path / "out" / "router" / "proto" / "flotilla_pb2.py").read_text())
    have = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert have != want


def test_service_module_imports_by_package_path():
    text = Path(codegen.ROOT, "router", "proto", "flotilla_pb2_grpc.py").read_text()
    assert "from router.proto import flotilla_pb2" in text
    assert "\nimport flotilla_pb2" not in text
