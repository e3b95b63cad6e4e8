"""The committed services/rpc modules are exactly what the protos generate today."""

from pathlib import Path

from services.rpc.generate import OUTPUT_ROOT, generate_into


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path): p.read_text() for p in generate_into(tmp_path)}
    assert fresh, "protoc produced nothing"
    for relative, text in fresh.items():
        committed = OUTPUT_ROOT / relative
        assert committed.exists(), f"{relative} is generated but not committed"
        assert committed.read_text() == text, (
            f"{relative} is stale: run `python -m services.rpc.generate`"
        )


def test_generated_modules_import_by_package_path() -> None:
    from services.rpc.dsv2.v1 import chat_pb2_grpc, experts_pb2_grpc, inference_pb2_grpc

    assert hasattr(inference_pb2_grpc, "InferenceStub")
    assert hasattr(experts_pb2_grpc, "ExpertsStub")
    assert hasattr(chat_pb2_grpc, "ChatStub")
