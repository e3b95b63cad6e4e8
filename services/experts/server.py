"""The expert shard: a grpc.aio server holding one slice of the routed experts of every MoE layer.

`Dispatch` is a bidi stream: one request per MoE layer per engine step with only the rows
routed here; the reply carries their weighted partial sums. Compute runs on one worker thread
(torch parallelises inside an op) so the event loop keeps answering health checks meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from services.experts import codec
from services.experts.loop import LoopThread
from services.experts.placement import shard_range
from services.rpc.dsv2.v1 import experts_pb2, experts_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "dsv2.v1.Experts"
# Prefill batches can carry thousands of rows of hidden states: lift gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 1 << 30
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Engines ping every 10 s to notice a vanished shard; accept that instead of answering
# GOAWAY "too_many_pings" (which would break the stream every few minutes).
SERVER_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]

# Requests up to this many bytes of hidden states are computed on the event loop itself.
INLINE_COMPUTE_BYTES = 256 << 10

# (hidden [N, D], expert_ids [N, K], weights [N, K]) -> [N, D]; model.RoutedExperts fits.
ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ShardSpec:
    shard: int
    num_shards: int
    expert_start: int
    expert_end: int
    dtype: torch.dtype
    moe_layers: tuple[int, ...] = field(default=())


def load_shard(
    path: str | Path,
    shard: int,
    num_shards: int,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "auto",
) -> tuple[dict[int, ExpertFn], ShardSpec]:
    """Read only this shard's slice of every MoE layer from a checkpoint, straight onto
    ``device`` ("auto": the GPU when this process was given one, as a Ray replica with
    num_gpus > 0 is, else the CPU; an explicit device that is missing is an error)."""
    from model import DeepseekV2Config, load_routed_experts
    from model.placement import resolve_device, resolve_dtype

    target = resolve_device(str(device))
    dtype = resolve_dtype(dtype, target)
    config = DeepseekV2Config.from_pretrained(str(path))
    start, end = shard_range(config.n_routed_experts, shard, num_shards)
    experts = load_routed_experts(str(path), start, end, dtype, device=target)
    for module in experts.values():
        module.eval()
    spec = ShardSpec(shard, num_shards, start, end, dtype, tuple(sorted(experts)))
    return dict(experts), spec


class ExpertsServicer(experts_pb2_grpc.ExpertsServicer):
    def __init__(self, experts: Mapping[int, ExpertFn], spec: ShardSpec) -> None:
        self._experts = experts
        self._spec = spec
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="expert-compute")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _device_of(experts: ExpertFn) -> torch.device:
        if isinstance(experts, torch.nn.Module):
            for parameter in experts.parameters():
                return parameter.device
        return torch.device("cpu")

    def compute(self, request: experts_pb2.DispatchRequest) -> experts_pb2.DispatchResponse:
        """Decode, run this shard's experts, encode. Bad input becomes an error reply."""
        reply = experts_pb2.DispatchResponse(seq=request.seq)
        try:
            experts = self._experts.get(request.layer)
            if experts is None:
                raise ValueError(
                    f"layer {request.layer} is not a MoE layer of this shard "
                    f"(MoE layers: {sorted(self._experts)})"
                )
            hidden = codec.decode(request.hidden)
            expert_ids = codec.decode(request.expert_ids)
            weights = codec.decode(request.weights)
            if hidden.dim() != 2 or expert_ids.dim() != 2 or weights.shape != expert_ids.shape:
                raise ValueError(
                    f"expected hidden [N, D], expert_ids [N, K], weights [N, K]; got "
                    f"{tuple(hidden.shape)}, {tuple(expert_ids.shape)}, {tuple(weights.shape)}"
                )
            if hidden.shape[0] != expert_ids.shape[0]:
                raise ValueError(
                    f"hidden has {hidden.shape[0]} rows but expert_ids has {expert_ids.shape[0]}"
                )
            device = self._device_of(experts)
            with torch.inference_mode():
                out = experts(
                    hidden.to(device, self._spec.dtype),
                    expert_ids.to(device, torch.int64),
                    weights.to(device, torch.float32),
                )
            codec.encode(out.to("cpu", hidden.dtype), reply.output)
        except Exception as exc:  # one bad request must not tear down the stream
            log.warning("dispatch for layer %d failed: %s", request.layer, exc)
            reply.error = f"{type(exc).__name__}: {exc}"
        return reply

    async def Dispatch(
        self,
        request_iterator: AsyncIterator[experts_pb2.DispatchRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        # context.read()/write() rather than an async generator: measurably less per message.
        loop = asyncio.get_running_loop()
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            if len(request.hidden.data) <= INLINE_COMPUTE_BYTES:
                # Decode-sized work: two thread hops would cost more than the compute.
                reply = self.compute(request)
            else:
                reply = await loop.run_in_executor(self._pool, self.compute, request)
            await context.write(reply)

    async def ShardInfo(
        self, request: experts_pb2.ShardInfoRequest, context: grpc.aio.ServicerContext
    ) -> experts_pb2.ShardInfoResponse:
        spec = self._spec
        return experts_pb2.ShardInfoResponse(
            shard=spec.shard,
            num_shards=spec.num_shards,
            expert_start=spec.expert_start,
            expert_end=spec.expert_end,
            moe_layers=list(spec.moe_layers or sorted(self._experts)),
            dtype=codec.dtype_name(spec.dtype),
        )


class ExpertShardServer:
    """grpc.aio server for one shard; its coroutines must run on one event loop."""

    def __init__(self, experts: Mapping[int, ExpertFn], spec: ShardSpec) -> None:
        self.spec = spec
        self._servicer = ExpertsServicer(experts, spec)
        self._health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        experts_pb2_grpc.add_ExpertsServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"could not bind the expert shard server to {host}:{port}")
        await server.start()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server, self.host, self.port = server, host, bound
        log.info(
            "expert shard %d/%d (experts [%d, %d)) serving on %s",
            self.spec.shard,
            self.spec.num_shards,
            self.spec.expert_start,
            self.spec.expert_end,
            self.address,
        )
        return self.address

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
        self._servicer.close()


class ThreadedShardServer:
    """A shard server on its own loop thread: for synchronous hosts (tests, Ray actors, CLI)."""

    def __init__(self, experts: Mapping[int, ExpertFn], spec: ShardSpec) -> None:
        self._loop = LoopThread(name=f"expert-shard-{spec.shard}")
        self.server = ExpertShardServer(experts, spec)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        shard: int,
        num_shards: int,
        dtype: torch.dtype | str = "auto",
        device: torch.device | str = "auto",
    ) -> ThreadedShardServer:
        experts, spec = load_shard(path, shard, num_shards, dtype, device)
        return cls(experts, spec)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        return self._loop.run(self.server.start(host, port), timeout=30)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def running(self) -> bool:
        return self._loop.running and self.server.running

    def stop(self, grace: float | None = 1.0) -> None:
        if self._loop.running:
            try:
                self._loop.run(self.server.stop(grace), timeout=(grace or 0) + 5)
            finally:
                self._loop.stop()
