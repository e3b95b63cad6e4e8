"""The model plane as one Ray Serve application.

    Engine (R replicas) ──gRPC Dispatch streams──▶ ExpertShard0 … ExpertShard{S-1}

Each ExpertShard deployment runs a grpc.aio expert shard server holding experts
[k*E/S, (k+1)*E/S) of every MoE layer and reports its address through a handle method
(control plane only: a handle hop costs ~2 ms, the data plane a fraction of that). The Engine
deployment holds everything but the routed experts and serves `dsv2.v1.Inference` through
Serve's gRPC ingress: its methods carry the RPC names.

`build_app` is the import path for `serve run`, KubeRay's serveConfigV2 and `dsv2 model-plane`:
`services.serving.app:build_app`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from services.rpc.dsv2.v1 import inference_pb2 as pb
from services.serving.config import ModelPlaneConfig

log = logging.getLogger(__name__)


def _advertised_host(bind_host: str) -> str:
    if bind_host in ("0.0.0.0", "::", ""):
        import ray

        return ray.util.get_node_ip_address()
    return bind_host


@serve.deployment
class ExpertShard:
    """One expert shard: a gRPC server on its own event-loop thread inside this replica."""

    def __init__(self, config: dict[str, Any], shard: int) -> None:
        import torch

        from services.experts import ThreadedShardServer

        cfg = ModelPlaneConfig.model_validate(config)
        torch.set_num_threads(cfg.shard_deployment.threads())
        self.shard = shard
        device, dtype = cfg.shard_placement()
        self._server = ThreadedShardServer.from_checkpoint(
            cfg.model_path, shard, cfg.num_expert_shards, dtype, device
        )
        port = cfg.shard_port_base + shard if cfg.shard_port_base else 0
        bound = self._server.start(cfg.shard_host, port)
        self._address = f"{_advertised_host(cfg.shard_host)}:{bound.rsplit(':', 1)[1]}"
        log.info("ExpertShard%d serving on %s", shard, self._address)

    def address(self) -> str:
        """Where engines reach this shard's `dsv2.v1.Experts` service."""
        return self._address

    def check_health(self) -> None:
        if not self._server.running:
            raise RuntimeError(f"expert shard {self.shard}'s gRPC server is not running")

    def __del__(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.stop(grace=None)


def _serve_metrics(host: str, port: int) -> None:
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host)
    except OSError as exc:  # e.g. two replicas on one node: keep serving, say why
        log.warning("prometheus metrics not served on port %d: %s", port, exc)


def _invalid_argument(grpc_context: Any, message: str) -> None:
    if grpc_context is not None:
        grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        grpc_context.set_details(message)


def _overloaded(grpc_context: Any, message: str) -> None:
    # RESOURCE_EXHAUSTED, not UNAVAILABLE: the gateway must tell "shed, come back later"
    # (503 + Retry-After to the caller, reservation refunded) from "model plane down".
    if grpc_context is not None:
        grpc_context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        grpc_context.set_details(message)


@serve.deployment
class Engine:
    """Attention shard: embeddings, MLA + paged cache, gates, shared experts, sampling."""

    def __init__(self, config: dict[str, Any], *shards: DeploymentHandle) -> None:
        import torch

        from services.engine import AsyncEngine, InferenceService
        from services.engine import Engine as CoreEngine

        cfg = ModelPlaneConfig.model_validate(config)
        torch.set_num_threads(cfg.engine_deployment.threads())
        self._cfg = cfg
        self._shards = list(shards)
        self._executor = None
        options = cfg.replica_engine_options()  # device and dtype resolve here, in the replica
        if cfg.num_expert_shards:
            from services.experts import RemoteExpertExecutor

            self._executor = RemoteExpertExecutor.for_checkpoint(
                cfg.model_path,
                cfg.num_expert_shards,
                resolver=self._resolve_shard,
                exchange_timeout_s=cfg.exchange_timeout_s,
            )
            # Shards load in parallel with us; wait for all of them before taking traffic.
            self._executor.connect(timeout=cfg.shard_connect_timeout_s)
            core = CoreEngine.from_pretrained(
                cfg.model_path, experts="none", expert_executor=self._executor, **options
            )
        else:
            core = CoreEngine.from_pretrained(cfg.model_path, **options)
        if cfg.metrics_port is not None:
            from services.engine.prometheus import register

            register(core)  # queue depth per priority class, shed requests
            _serve_metrics(cfg.metrics_host, cfg.metrics_port)
        self._engine = AsyncEngine(core)
        self._service = InferenceService(
            self._engine,
            core.tokenizer,
            cfg.served_model_id,
            num_expert_shards=cfg.num_expert_shards,
            shard_health=self._shard_health if self._executor is not None else None,
        )

    # -- discovery and health of the shards -----------------------------------------------

    def _resolve_shard(self, shard: int) -> str:
        # Runs on a worker thread of the executor's loop, never on a Serve event loop.
        timeout = self._executor.connect_timeout_s if self._executor is not None else 5.0
        return self._shards[shard].address.remote().result(timeout_s=timeout)

    async def _shard_health(self) -> list[pb.ShardHealth]:
        assert self._executor is not None
        statuses = await asyncio.to_thread(self._executor.health)
        return [
            pb.ShardHealth(shard=s.shard, serving=s.serving, address=s.address, detail=s.detail)
            for s in statuses
        ]

    def expert_traffic(self) -> dict[str, Any]:
        """Counters of this replica's expert traffic (tests and operators)."""
        return self._executor.traffic.snapshot() if self._executor is not None else {}

    # -- dsv2.v1.Inference (Serve's gRPC ingress calls these by RPC name) -----------------

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        from services.engine import InvalidRequest, Overloaded

        try:
            stream = self._service.generate(request)
        except InvalidRequest as exc:
            _invalid_argument(grpc_context, str(exc))
            raise
        try:
            async for response in stream:
                yield response
        except InvalidRequest as exc:  # a picture that fails to decode, before any output
            _invalid_argument(grpc_context, str(exc))
            raise
        except Overloaded as exc:  # raised at the first step, before any work or output
            _overloaded(grpc_context, str(exc))
            raise

    async def Tokenize(
        self, request: pb.TokenizeRequest, grpc_context: Any = None
    ) -> pb.TokenizeResponse:
        from services.engine import InvalidRequest

        try:
            return await self._service.tokenize(request)
        except InvalidRequest as exc:
            _invalid_argument(grpc_context, str(exc))
            raise

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, grpc_context: Any = None
    ) -> pb.ModelInfoResponse:
        return await self._service.model_info(request)

    async def Health(
        self, request: pb.HealthRequest, grpc_context: Any = None
    ) -> pb.HealthResponse:
        return await self._service.health(request)

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.close()


def build_app(args: dict[str, Any]) -> Application:
    """The model plane from one config dict (see ModelPlaneConfig for the fields)."""
    cfg = ModelPlaneConfig.model_validate(args)
    config = cfg.model_dump()
    shards = [
        ExpertShard.options(
            name=f"ExpertShard{k}",
            num_replicas=1,
            max_ongoing_requests=cfg.shard_deployment.max_ongoing_requests,
            ray_actor_options=cfg.shard_deployment.actor_options(),
        ).bind(config, k)
        for k in range(cfg.num_expert_shards)
    ]
    return Engine.options(**engine_options(cfg)).bind(config, *shards)


def engine_options(cfg: ModelPlaneConfig) -> dict[str, Any]:
    """The Engine deployment's Serve options: replicas (fixed or autoscaled), resources and
    the request router."""
    options: dict[str, Any] = {
        "name": "Engine",
        "max_ongoing_requests": cfg.engine_deployment.max_ongoing_requests,
        "ray_actor_options": cfg.engine_deployment.actor_options(),
    }
    if cfg.engine_autoscaling is not None:
        options["autoscaling_config"] = cfg.engine_autoscaling.serve_config()
    else:
        options["num_replicas"] = cfg.engine_replicas
    router = cfg.routing.router_config()
    if router is not None:
        options["request_router_config"] = router
    return options
