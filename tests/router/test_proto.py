"""The checked-in gRPC stubs match flotilla.proto (regenerate with `make proto`)."""

from __future__ import annotations

from pathlib import Path

from router.proto import codegen


def test_stubs_are_in_sync(tmp_path):
    for fresh in codegen.generate(tmp_path):
        checked_in = codegen.ROOT / "router" / "proto" / fresh.name
        assert checked_in.read_text() == fresh.read_text(), (
            f"{checked_in} is stale: run `make proto`"
        )


def test_service_module_imports_by_package_path():
    text = Path(codegen.ROOT, "router", "proto", "flotilla_pb2_grpc.py").read_text()
    assert "from router.proto import flotilla_pb2" in text
    assert "\nimport flotilla_pb2" not in text
