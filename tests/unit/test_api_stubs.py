"""The committed gRPC stubs are exactly what protoc makes from the committed .proto files."""

from __future__ import annotations

import importlib
from pathlib import Path

from kvrelay.proto import generate


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    committed = generate.PROTO_ROOT / generate.PACKAGE_DIR
    names = sorted(p.name for p in fresh)
    assert names == sorted(
        p.name for p in committed.iterdir() if p.name.endswith(generate.SUFFIXES)
    ), "stub files missing or extra: run python -m kvrelay.proto.generate"
    for path in fresh:
        assert path.read_bytes() == (committed / path.name).read_bytes(), (
            f"{path.name} is stale: run python -m kvrelay.proto.generate"
        )
    assert len(names) == 3 * len(generate.proto_files())


def test_stubs_import_as_package_modules() -> None:
    for name in ("generation_pb2", "generation_pb2_grpc", "admin_pb2", "admin_pb2_grpc"):
        mod = importlib.import_module(f"kvrelay.proto.kvrelay.v1.{name}")
        assert "from kvrelay.v1" not in Path(mod.__file__ or "").read_text()
    from kvrelay.proto.kvrelay.v1 import admin_pb2, generation_pb2

    assert generation_pb2.DESCRIPTOR.package == "kvrelay.v1"
    assert set(generation_pb2.DESCRIPTOR.services_by_name) == {"Generation"}
    assert set(admin_pb2.DESCRIPTOR.services_by_name) == {"Admin"}
    req = generation_pb2.GenerateRequest(text="hi")
    assert req.WhichOneof("prompt") == "text"
