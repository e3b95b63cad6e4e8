"""A scripted model plane for the gateway tests.

TEST DOUBLE: this stands in for the model plane (the engine behind Ray Serve), which needs a
checkpoint, torch and a Ray cluster; the gateway's own tests check the gateway, so they use this
deterministic backend instead. It implements the same `ModelBackend` protocol (the
dsv2.v1.Inference calls with proto messages), records every request it receives, can stream
slowly, and notices when a generation is cancelled. `ScriptedInferenceServicer` serves it over a
real grpc.aio server so GrpcModelBackend is tested over the wire too.

Token rule (deterministic and easy to check): every whitespace-separated word is one token; a
chat message costs 3 tokens + its words, plus 2 for the generation prompt. Pictures (only
when `accepts_images`, like a DeepSeek-VL2 model plane): each costs `image_tokens` tokens,
its `<image>` marker counts as a word, and a message whose markers do not match its pictures
is refused as the real model plane refuses it (INVALID_ARGUMENT). The reply to a user
message "X" is the words "reply to X" repeated, one token per step, ending with "stop" after
`reply_tokens` tokens (or "length" at max_tokens).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from services.rpc.dsv2.v1 import inference_pb2 as pb
from services.rpc.dsv2.v1 import inference_pb2_grpc as pb_grpc


class Overloaded(Exception):
    """Stands in for services.engine.Overloaded (load shedding), which the gateway recognises
    by name in embedded mode and as RESOURCE_EXHAUSTED over gRPC."""


def count_message_tokens(messages: list[pb.ChatMessage], image_tokens: int = 0) -> int:
    return sum(3 + len(m.content.split()) + image_tokens * len(m.images) for m in messages) + 2


def check_pictures(messages: list[pb.ChatMessage], accepts_images: bool) -> None:
    """What the model plane refuses: pictures for a text-only model; markers that do not
    match the pictures; pictures without bytes (the gateway must have fetched them)."""
    for i, m in enumerate(messages):
        if m.images and not accepts_images:
            raise ValueError("this model does not accept images")
        if m.images and m.content.count("<image>") != len(m.images):
            raise ValueError(f"message {i}: <image> markers do not match its images")
        if any(not image.data or not image.mime_type for image in m.images):
            raise ValueError(f"message {i}: an image without bytes or mime type")


@dataclass
class ScriptedBackend:
    model_id: str = "dsv2-scripted"
    max_context_tokens: int = 4096
    reply_tokens: int = 8
    delay_s: float = 0.0  # pause before each generated token
    fail_after: int | None = None  # abort with an error after this many tokens
    requests: list[pb.GenerateRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    generated: dict[str, int] = field(default_factory=dict)  # request id -> tokens yielded
    tokenize_calls: int = 0
    tokenized_bytes: list[int] = field(default_factory=list)  # content bytes per tokenize call
    serving: bool = True
    start_delay_s: float = 0.0  # pause before the first message (a queued, overloaded plane)
    health_delay_s: float = 0.0  # a slow health answer
    health_error: bool = False  # health fails as if the plane were unreachable
    max_token_bytes: int = 0  # reported by model_info (0 = unknown)
    # GenerateRequest.priority values refused at once, like an overloaded engine's shed classes
    shed_priorities: set[int] = field(default_factory=set)
    accepts_images: bool = False
    image_tokens: int = 50  # what each picture costs (a real model's depends on its tiling)
    max_image_tokens: int = 60  # reported by model_info: the bound the gateway reserves

    def reply_words(self, req: pb.GenerateRequest) -> list[str]:
        if req.WhichOneof("prompt") == "messages":
            users = [m.content for m in req.messages.messages if m.role == "user"]
            last = users[-1] if users else ""
        else:
            last = req.text
        return ["reply", "to", *last.split()[:4]]

    async def generate(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        self.requests.append(req)
        if req.priority in self.shed_priorities:
            raise Overloaded("the model plane is overloaded (scripted); retry shortly")
        kind = req.WhichOneof("prompt")
        if kind == "messages":
            check_pictures(list(req.messages.messages), self.accepts_images)
            prompt = count_message_tokens(list(req.messages.messages), self.image_tokens)
        elif kind == "text":
            prompt = len(req.text.split())
        else:
            prompt = len(req.token_ids.ids)
        if req.sampling.max_tokens <= 0:
            raise ValueError("max_tokens must be > 0")
        if prompt + req.sampling.max_tokens > self.max_context_tokens:
            raise ValueError("prompt + max_tokens exceeds the context window")
        words = self.reply_words(req)
        n = min(self.reply_tokens, req.sampling.max_tokens)
        finish = (
            pb.FINISH_REASON_STOP
            if self.reply_tokens <= req.sampling.max_tokens
            else pb.FINISH_REASON_LENGTH
        )
        done = False
        try:
            if self.start_delay_s:
                await asyncio.sleep(self.start_delay_s)
            yield pb.GenerateResponse(usage=pb.Usage(prompt_tokens=prompt))
            for i in range(n):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if self.fail_after is not None and i >= self.fail_after:
                    done = True
                    yield pb.GenerateResponse(
                        finish_reason=pb.FINISH_REASON_ABORT,
                        error="scripted failure",
                        usage=pb.Usage(prompt_tokens=prompt, completion_tokens=i),
                    )
                    return
                last = i == n - 1
                done = last
                self.generated[req.request_id] = i + 1
                yield pb.GenerateResponse(
                    text=words[i % len(words)] + " ",
                    token_ids=[100 + i],
                    finish_reason=finish if last else pb.FINISH_REASON_UNSPECIFIED,
                    usage=pb.Usage(prompt_tokens=prompt, completion_tokens=i + 1) if last else None,
                )
        finally:
            (self.completed if done else self.cancelled).append(req.request_id)

    async def tokenize(self, req: pb.TokenizeRequest) -> pb.TokenizeResponse:
        self.tokenize_calls += 1
        if req.WhichOneof("prompt") == "messages":
            check_pictures(list(req.messages.messages), self.accepts_images)
            n = count_message_tokens(list(req.messages.messages), self.image_tokens)
            self.tokenized_bytes.append(sum(len(m.content.encode()) for m in req.messages.messages))
        else:
            n = len(req.text.split())
        return pb.TokenizeResponse(num_tokens=n)

    async def model_info(self, req: pb.ModelInfoRequest) -> pb.ModelInfoResponse:
        return pb.ModelInfoResponse(
            model_id=self.model_id,
            max_context_tokens=self.max_context_tokens,
            dtype="float32",
            max_token_bytes=self.max_token_bytes,
            accepts_images=self.accepts_images,
            max_image_tokens=self.max_image_tokens if self.accepts_images else 0,
        )

    async def health(self, req: pb.HealthRequest) -> pb.HealthResponse:
        if self.health_delay_s:
            await asyncio.sleep(self.health_delay_s)
        if self.health_error:
            raise ConnectionError("scripted: model plane unreachable")
        return pb.HealthResponse(serving=self.serving)

    def expected_reply(self, user_content: str, n: int | None = None) -> str:
        words = ["reply", "to", *user_content.split()[:4]]
        n = self.reply_tokens if n is None else n
        return "".join(words[i % len(words)] + " " for i in range(n))


class ScriptedInferenceServicer(pb_grpc.InferenceServicer):
    """Serves a ScriptedBackend as dsv2.v1.Inference (a stand-in for Ray Serve's ingress);
    requires the ("application", app) metadata like the ingress does."""

    def __init__(self, backend: ScriptedBackend, app_name: str = "dsv2") -> None:
        self.backend = backend
        self.app_name = app_name

    async def _check_app(self, context) -> None:
        md = dict(context.invocation_metadata() or ())
        if md.get("application") != self.app_name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no application {md.get('application')!r}"
            )

    async def Generate(self, request, context):
        await self._check_app(context)
        try:
            async for resp in self.backend.generate(request):
                yield resp
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Overloaded as e:  # what the Ray Engine deployment answers (services/serving)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

    async def Tokenize(self, request, context):
        await self._check_app(context)
        try:
            return await self.backend.tokenize(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def ModelInfo(self, request, context):
        await self._check_app(context)
        return await self.backend.model_info(request)

    async def Health(self, request, context):
        await self._check_app(context)
        return await self.backend.health(request)


async def start_inference_server(
    backend: ScriptedBackend, app_name: str = "dsv2"
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(ScriptedInferenceServicer(backend, app_name), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def main() -> None:
    """Run a scripted inference server in its own process (used by multi-process tests).
    Prints the port on stdout, then serves until killed."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--reply-tokens", type=int, default=8)
    args = parser.parse_args()

    async def serve() -> None:
        backend = ScriptedBackend(delay_s=args.delay_s, reply_tokens=args.reply_tokens)
        server, port = await start_inference_server(backend)
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
