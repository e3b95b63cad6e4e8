"""RemoteExpertExecutor: the engine's routed experts, computed by expert shards over gRPC.

Per MoE layer per step the engine calls `start()` from its (synchronous) step thread. We split
the token rows by shard (each shard gets only the rows routed to it, with their ids and
weights), send to every involved shard at once over one persistent bidi stream per shard, and
return a handle; the engine computes the shared experts meanwhile, then `wait()` sums the
partials. The grpc.aio channels live on a dedicated event-loop thread.

Failure policy: expert computation is a pure function, so an exchange that fails on a broken
stream is retried once on a fresh connection (the shard may have been replaced at a new
address). Otherwise the step fails with `ExpertShardError` within `exchange_timeout_s +
connect_timeout_s`: a dead shard never hangs a request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.experts import codec
from services.experts.loop import LoopThread
from services.experts.metrics import ExpertTraffic, register
from services.experts.placement import shard_range
from services.experts.server import GRPC_OPTIONS, SERVICE_NAME
from services.rpc.dsv2.v1 import experts_pb2, experts_pb2_grpc

log = logging.getLogger(__name__)

# shard index -> "host:port"; may block (it runs on a worker thread), may raise.
Resolver = Callable[[int], str]

CHANNEL_OPTIONS = [
    *GRPC_OPTIONS,
    # Notice a peer that vanished without closing its sockets (a lost node).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect quickly once a replaced shard is up again.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class ExpertShardError(RuntimeError):
    """An expert shard could not compute its part of a step (down, timed out, or failed)."""


class _StreamBroken(Exception):
    """The stream to a shard failed; the exchange may be retried once on a fresh stream."""


@dataclass
class ShardStatus:
    shard: int
    serving: bool
    address: str
    detail: str


class _ShardLink:
    """One shard: address discovery, channel, and one persistent Dispatch stream."""

    def __init__(
        self,
        index: int,
        num_shards: int,
        expert_range: tuple[int, int],
        resolver: Resolver,
        connect_timeout_s: float,
        retry_interval_s: float,
    ) -> None:
        self.index = index
        self.num_shards = num_shards
        self.expert_range = expert_range
        self._resolver = resolver
        self._connect_timeout = connect_timeout_s
        self._retry_interval = retry_interval_s
        self.address = ""
        self.detail = "not connected yet"
        self._channel: grpc.aio.Channel | None = None
        self._stub: experts_pb2_grpc.ExpertsStub | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._last_failed_connect = -1e9
        self._seq = 0
        self._watcher: asyncio.Task | None = None

    @property
    def connected(self) -> bool:
        return self._call is not None

    def _error(self, what: str) -> ExpertShardError:
        where = f" at {self.address}" if self.address else ""
        return ExpertShardError(f"expert shard {self.index}{where} {what}")

    async def _drop(self, detail: str) -> None:
        call, channel = self._call, self._channel
        self._call = self._stub = self._channel = None
        self.detail = detail
        if call is not None:
            call.cancel()
        if channel is not None:
            await channel.close(grace=None)

    async def _watch(self, call: grpc.aio.StreamStreamCall) -> None:
        """Mark the link broken as soon as its stream ends, even while idle."""
        try:
            code = await call.code()
        except asyncio.CancelledError:
            return
        if self._call is call:
            details = await call.details()
            log.warning("stream to expert shard %d ended: %s %s", self.index, code, details)
            await self._drop(f"stream ended: {code.name} {details}")

    async def connect(self, force: bool = False) -> None:
        if self._call is not None:
            return
        if not force and time.monotonic() - self._last_failed_connect < self._retry_interval:
            raise self._error(f"unavailable: {self.detail}")
        timeout = self._connect_timeout
        try:
            address = await asyncio.wait_for(asyncio.to_thread(self._resolver, self.index), timeout)
            self.address = address
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            try:
                # No channel_ready(): a refused connection fails this call at once.
                stub = experts_pb2_grpc.ExpertsStub(channel)
                info = await stub.ShardInfo(experts_pb2.ShardInfoRequest(), timeout=timeout)
                expected = (self.index, self.num_shards, *self.expert_range)
                found = (info.shard, info.num_shards, info.expert_start, info.expert_end)
                if found != expected:
                    raise ValueError(
                        f"serves shard {found[0]}/{found[1]} experts [{found[2]}, {found[3]}), "
                        f"expected shard {expected[0]}/{expected[1]} experts "
                        f"[{expected[2]}, {expected[3]})"
                    )
                call = stub.Dispatch()
            except BaseException:
                await channel.close(grace=None)
                raise
        except Exception as exc:
            self._last_failed_connect = time.monotonic()
            detail = _describe(exc)
            self.detail = f"connect failed: {detail}"
            raise self._error(f"unavailable: {detail}") from exc
        self._channel, self._stub, self._call = channel, stub, call
        self.detail = "connected"
        # Keep a reference: the loop holds tasks only weakly.
        self._watcher = asyncio.get_running_loop().create_task(self._watch(call))
        log.info("connected to expert shard %d at %s", self.index, self.address)

    async def send(self, request: experts_pb2.DispatchRequest) -> None:
        """Write one request on the stream (connecting first if needed)."""
        await self.connect()
        assert self._call is not None
        self._seq += 1
        request.seq = self._seq
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            await self._drop(f"stream failed: {_describe(exc)}")
            raise _StreamBroken(_describe(exc)) from exc

    async def receive(self, layer: int) -> experts_pb2.DispatchResponse:
        """Read the reply to the request just sent."""
        call = self._call
        if call is None:
            raise _StreamBroken(self.detail)
        while True:
            try:
                reply = await call.read()
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                await self._drop(f"stream failed: {_describe(exc)}")
                raise _StreamBroken(_describe(exc)) from exc
            if reply is grpc.aio.EOF:
                await self._drop("stream closed by the shard")
                raise _StreamBroken("stream closed by the shard")
            if reply.seq >= self._seq:
                break
            # The late answer to an exchange that was abandoned: skip it.
        if reply.seq != self._seq:
            await self._drop(f"reply out of order ({reply.seq} != {self._seq})")
            raise self._error("answered out of order")
        if reply.error:
            raise self._error(f"failed layer {layer}: {reply.error}")
        return reply

    async def abort(self, detail: str) -> None:
        """Give up on the stream (a timed-out exchange leaves it in an unknown state)."""
        await self._drop(detail)

    async def probe(self, timeout_s: float) -> ShardStatus:
        try:
            await self.connect(force=True)
            assert self._channel is not None
            health = health_pb2_grpc.HealthStub(self._channel)
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s
            )
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            detail = (
                "serving"
                if serving
                else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            )
        except Exception as exc:
            serving, detail = False, self.detail if self._call is None else _describe(exc)
        return ShardStatus(self.index, serving, self.address, detail)

    async def close(self) -> None:
        await self._drop("closed")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _PendingRemote:
    """The engine's PendingExperts for one MoE layer of one step."""

    def __init__(
        self,
        future: concurrent.futures.Future | None,
        like: torch.Tensor,
        timeout: float,
    ) -> None:
        self._future = future
        self._like = like
        self._timeout = timeout

    def wait(self) -> torch.Tensor:
        num_rows, width = self._like.shape
        # summed on the host, where the shards' replies arrive; one copy back to the engine's
        # device at the end
        out = torch.zeros(num_rows, width, dtype=self._like.dtype, device="cpu")  # [T, D]
        if self._future is not None:
            try:
                parts = self._future.result(self._timeout)
            except concurrent.futures.TimeoutError:
                self._future.cancel()
                raise ExpertShardError(
                    f"expert shards did not answer within {self._timeout} s"
                ) from None
            for rows, partial in parts:
                out.index_add_(0, rows, partial.to(out.dtype))
        return out.to(self._like.device)


class RemoteExpertExecutor:
    """ExpertExecutor over S expert shards reached by gRPC."""

    def __init__(
        self,
        num_experts: int,
        num_shards: int,
        *,
        targets: Sequence[str] | None = None,
        resolver: Resolver | None = None,
        moe_layers: Sequence[int] = (),
        exchange_timeout_s: float = 8.0,
        connect_timeout_s: float = 2.0,
        retry_interval_s: float = 0.5,
    ) -> None:
        if (targets is None) == (resolver is None):
            raise ValueError("pass exactly one of targets or resolver")
        if targets is not None:
            if len(targets) != num_shards:
                raise ValueError(f"{len(targets)} targets for {num_shards} shards")
            fixed = list(targets)
            resolver = fixed.__getitem__
        assert resolver is not None
        self.num_experts = num_experts
        self.num_shards = num_shards
        self.exchange_timeout_s = exchange_timeout_s
        self.connect_timeout_s = connect_timeout_s
        ranges = [shard_range(num_experts, k, num_shards) for k in range(num_shards)]
        # bucketize(ids, ends, right=True) maps an expert id to its shard index
        self._ends = torch.tensor([end for _, end in ranges], dtype=torch.int64, device="cpu")
        self._links = [
            _ShardLink(k, num_shards, ranges[k], resolver, connect_timeout_s, retry_interval_s)
            for k in range(num_shards)
        ]
        self.traffic = ExpertTraffic(list(moe_layers), num_experts, num_shards)
        register(self.traffic)
        self._loop = LoopThread(name="dsv2-expert-client")
        self._lock_obj: asyncio.Lock | None = None
        self._closed = False

    @property
    def _lock(self) -> asyncio.Lock:
        if self._lock_obj is None:  # created on first use: it belongs to the loop thread
            self._lock_obj = asyncio.Lock()
        return self._lock_obj

    @classmethod
    def for_checkpoint(cls, path: str, num_shards: int, **kwargs: object) -> RemoteExpertExecutor:
        """Size the executor from a checkpoint's config (experts, MoE layers)."""
        from model import DeepseekV2Config, moe_layer_indices

        config = DeepseekV2Config.from_pretrained(path)
        return cls(
            config.n_routed_experts,
            num_shards,
            moe_layers=moe_layer_indices(config),
            **kwargs,  # type: ignore[arg-type]
        )

    # -- ExpertExecutor -------------------------------------------------------------------

    def start(
        self, layer_idx: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> _PendingRemote:
        """hidden [T, D], expert_ids [T, K] int64, weights [T, K] float32."""
        if self._closed:
            raise ExpertShardError("the remote expert executor is closed")
        # every row routes to some shard (top-k picks k experts), so the whole step's hidden
        # rows cross to the host once; shards then get only their rows. Host tensors are
        # made on "cpu" explicitly, whatever the engine's device or torch's default device.
        hidden_cpu = hidden.detach().cpu()
        expert_ids = expert_ids.detach().cpu().long()
        weights = weights.detach().cpu()
        shard_of = torch.bucketize(expert_ids, self._ends, right=True)  # [T, K]
        shards_hit = torch.zeros(hidden_cpu.shape[0], dtype=torch.int64, device="cpu")  # [T]
        jobs: list[tuple[int, torch.Tensor, experts_pb2.DispatchRequest]] = []
        for k in range(self.num_shards):
            in_shard = shard_of == k  # [T, K]
            row_mask = in_shard.any(dim=1)  # [T]
            rows = row_mask.nonzero().flatten()  # [N]
            if rows.numel() == 0:
                continue
            shards_hit += row_mask
            request = experts_pb2.DispatchRequest(layer=layer_idx)
            codec.encode(hidden_cpu.index_select(0, rows), request.hidden)
            codec.encode(expert_ids.index_select(0, rows), request.expert_ids)
            row_weights = weights.index_select(0, rows)
            codec.encode(
                torch.where(in_shard.index_select(0, rows), row_weights, 0.0), request.weights
            )
            jobs.append((k, rows, request))
        self.traffic.record_routing(layer_idx, expert_ids, shards_hit)
        future = self._loop.submit(self._exchange_all(jobs)) if jobs else None
        # The loop enforces the exchange timeout; this bound only guards against a stuck loop.
        bound = self.exchange_timeout_s + 1.0
        return _PendingRemote(future, hidden, bound)

    async def _exchange_all(
        self, jobs: list[tuple[int, torch.Tensor, experts_pb2.DispatchRequest]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Write to every involved shard, then read every reply: the shards work in parallel.

        No task per shard and one timeout for the whole exchange: this runs once per MoE layer
        per step, so its fixed cost matters.
        """
        async with self._lock:
            pending = list(jobs)
            replies: dict[int, experts_pb2.DispatchResponse] = {}
            try:
                async with asyncio.timeout(self.exchange_timeout_s):
                    # Connect first so that a shard that is down fails the step before anything
                    # is written to the others.
                    for k, _, _ in jobs:
                        await self._links[k].connect()
                    for attempt in (0, 1):
                        broken: list[tuple[int, torch.Tensor, experts_pb2.DispatchRequest]] = []
                        written = []
                        for job in pending:
                            try:
                                if attempt:  # the stream broke: reconnect now, once
                                    await self._links[job[0]].connect(force=True)
                                await self._links[job[0]].send(job[2])
                                written.append(job)
                            except _StreamBroken:
                                broken.append(job)
                        for job in written:
                            try:
                                replies[job[0]] = await self._links[job[0]].receive(job[2].layer)
                            except _StreamBroken:
                                broken.append(job)
                        if not broken:
                            break
                        if attempt:
                            link = self._links[broken[0][0]]
                            raise link._error(f"failed: {link.detail}")
                        # Experts are a pure function: resending on a fresh stream is safe.
                        pending = broken
            except TimeoutError:
                late = [k for k, _, _ in jobs if k not in replies]
                for k in late:
                    await self._links[k].abort(f"no reply within {self.exchange_timeout_s} s")
                raise ExpertShardError(
                    f"expert shard(s) {late} did not answer within {self.exchange_timeout_s} s"
                ) from None
        results = []
        for k, rows, request in jobs:
            reply = replies[k]
            self.traffic.record_exchange(k, request.ByteSize(), reply.ByteSize())
            partial = codec.decode(reply.output)
            if partial.shape[0] != rows.shape[0]:
                raise ExpertShardError(
                    f"expert shard {k} returned {partial.shape[0]} rows for {rows.shape[0]}"
                )
            results.append((rows, partial))
        return results

    # -- control --------------------------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> None:
        """Block until every shard is reachable (retrying), or raise ExpertShardError."""
        deadline = time.monotonic() + timeout

        async def all_links() -> None:
            while True:
                try:
                    for link in self._links:
                        await link.connect(force=True)
                    return
                except ExpertShardError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

        self._loop.run(all_links(), timeout=timeout + self.connect_timeout_s * 2 + 1)

    def health(self, timeout: float = 1.0) -> list[ShardStatus]:
        """Probe every shard now (reconnecting to those that were down)."""

        async def probe_all() -> list[ShardStatus]:
            return list(await asyncio.gather(*(link.probe(timeout) for link in self._links)))

        try:
            return self._loop.run(probe_all(), timeout=timeout + self.connect_timeout_s + 2)
        except TimeoutError:
            return [
                ShardStatus(link.index, False, link.address, "health probe timed out")
                for link in self._links
            ]

    @property
    def addresses(self) -> list[str]:
        return [link.address for link in self._links]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def close_all() -> None:
            await asyncio.gather(*(link.close() for link in self._links))

        try:
            self._loop.run(close_all(), timeout=5)
        except Exception as exc:  # closing must not raise during shutdown
            log.debug("closing expert links: %s", exc)
        self._loop.stop()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
