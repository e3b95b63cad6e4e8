"""Pictures through the model plane on a real local Ray cluster (Serve's gRPC ingress): a
DeepSeek-VL2 application reads them, a text-only one refuses them naming itself, and a
picture that does not decode is INVALID_ARGUMENT with the decoder's message."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image
from ray import serve
from ray.serve.api import RunTarget

from model.tokenizer import Tokenizer
from services.engine import Engine, SamplingParams
from services.engine.image_prompt import render_vl2
from services.rpc.dsv2.v1 import inference_pb2 as pb
from services.rpc.dsv2.v1 import inference_pb2_grpc
from services.serving.app import build_app
from services.serving.local import LocalServe
from tests.engine.vl2_support import write_vl2_checkpoint
from tests.serving.conftest import app_args

APPS = ("text-only", "vl2")


def _md(app: str) -> tuple[tuple[str, str], ...]:
    return (("application", app),)


@pytest.fixture(scope="module")
def vl2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vl2_checkpoint(tmp_path_factory.mktemp("serving-vl2"), seed=1)


@pytest.fixture(scope="module")
def stub(
    ray_serve: LocalServe, tiny_checkpoint: Path, vl2_checkpoint: Path
) -> Iterator[inference_pb2_grpc.InferenceStub]:
    checkpoints = {"text-only": tiny_checkpoint, "vl2": vl2_checkpoint}
    targets = []
    for name in APPS:
        args = app_args(checkpoints[name], 0)
        args["model_id"] = name
        targets.append(RunTarget(target=build_app(args), name=name, route_prefix=f"/{name}"))
    serve.run_many(targets)
    try:
        with grpc.insecure_channel(ray_serve.grpc_target) as channel:
            yield inference_pb2_grpc.InferenceStub(channel)
    finally:
        for name in APPS:
            serve.delete(name)


def png(colour: tuple[int, int, int], size: tuple[int, int] = (120, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def ask(content: str, *pictures: bytes) -> pb.GenerateRequest:
    images = [pb.Image(data=p, mime_type="image/png") for p in pictures]
    message = pb.ChatMessage(role="user", content=content, images=images)
    return pb.GenerateRequest(
        messages=pb.ChatMessages(messages=[message]),
        sampling=pb.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
    )


def test_a_vl2_application_reads_pictures(stub, vl2_checkpoint: Path):
    info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=_md("vl2"), timeout=30)
    assert info.accepts_images and info.max_image_tokens == 27
    req = ask("<image>\nWhat colour is this?", png((200, 30, 30)))
    responses = list(stub.Generate(req, metadata=_md("vl2"), timeout=120))
    tokens = [t for r in responses for t in r.token_ids]

    engine = Engine.from_pretrained(vl2_checkpoint, block_size=8)
    ids, spans = render_vl2(
        req.messages.messages, Tokenizer.from_pretrained(vl2_checkpoint), engine.model.vl2_config
    )
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = engine.generate([ids], params, images=[spans])[0]
    assert tokens == want.token_ids
    assert responses[-1].usage.prompt_tokens == len(ids) > spans[0].num_tokens == 17


@pytest.mark.parametrize(
    ("app", "req", "message"),
    [
        (
            "text-only",
            ask("<image>\nWhat is this?", png((1, 2, 3))),
            "model 'text-only' takes no images",
        ),
        (
            "vl2",
            ask("<image>\nWhat is this?", b"\x89PNG\r\n\x1a\n broken"),
            "messages[0].images[0]: ",
        ),
        ("vl2", ask("What is this?", png((1, 2, 3))), "holds 0 '<image>' placeholders"),
    ],
)
def test_pictures_that_cannot_be_served_get_invalid_argument(stub, app, req, message):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(req, metadata=_md(app), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
