"""One config for the model plane, from `serve run` args, a KubeRay serveConfigV2 or the CLI.

`build_app(args)` receives a plain dict (YAML in serveConfigV2); this validates it and says
which field is wrong instead of failing inside a replica.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from services.engine.params import EngineOptions

APP_NAME = "dsv2"
GRPC_PORT = 9000
HTTP_PORT = 8001
INFERENCE_SERVICER = "services.rpc.dsv2.v1.inference_pb2_grpc.add_InferenceServicer_to_server"


class DeploymentResources(BaseModel):
    """Ray resources and concurrency of one deployment's replicas."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    max_ongoing_requests: int = Field(256, gt=0)
    # torch intra-op threads in the replica; default: num_cpus rounded, at least 1
    torch_threads: int | None = Field(None, gt=0)

    def actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        return options

    def threads(self) -> int:
        return self.torch_threads or max(1, round(self.num_cpus))


class RoutingConfig(BaseModel):
    """How Serve picks an Engine replica for each request (services/serving/router.py)."""

    model_config = ConfigDict(extra="forbid")

    # prefix_affinity: the replica holding the longest cached prefix of the prompt (or the
    # session's last replica) while within max_imbalance; default: Serve's power of two choices.
    policy: Literal["prefix_affinity", "default"] = "prefix_affinity"
    # Requests in flight a preferred replica may carry beyond the least loaded one before a
    # request goes to the least loaded instead (a cache hit is not worth waiting in a queue).
    max_imbalance: int = Field(4, ge=0)
    # Bounds of the router's memory: prefix hashes per replica and sessions remembered.
    max_keys_per_replica: int = Field(100_000, gt=0)
    max_sessions: int = Field(100_000, gt=0)

    def router_config(self) -> dict[str, Any] | None:
        """Serve's `request_router_config` for the Engine deployment (None: Serve's default)."""
        if self.policy == "default":
            return None
        return {
            "request_router_class": "services.serving.router:PrefixAffinityRouter",
            "request_router_kwargs": {
                "max_imbalance": self.max_imbalance,
                "max_keys_per_replica": self.max_keys_per_replica,
                "max_sessions": self.max_sessions,
            },
        }


class EngineAutoscaling(BaseModel):
    """Serve autoscaling of Engine replicas on ongoing requests per replica. A request counts
    from the moment a proxy queues it until its stream ends, so requests waiting in the
    engine's scheduler (queue depth) and in the proxies both push replicas up."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    # Ongoing requests per replica Serve steers toward: about the batch a replica serves at
    # a good time to first token.
    target_ongoing_requests: float = Field(16.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)  # engines are slow to load: keep them a while

    @model_validator(mode="after")
    def _check(self) -> EngineAutoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"engine_autoscaling.max_replicas={self.max_replicas} is below "
                f"min_replicas={self.min_replicas}"
            )
        return self

    def serve_config(self) -> dict[str, Any]:
        """Serve's `autoscaling_config`."""
        return self.model_dump()


class ModelPlaneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_path: str
    model_id: str | None = None  # name shown by /v1/models; default: the checkpoint's folder
    num_expert_shards: int = Field(2, ge=0)  # 0: routed experts in the engine process
    engine_replicas: int = Field(1, ge=1)
    # Scale Engine replicas on load instead of a fixed engine_replicas (None: fixed).
    engine_autoscaling: EngineAutoscaling | None = None
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    # services.engine.EngineOptions fields: device, dtype, cache size, batching...
    engine: dict[str, Any] = Field(default_factory=dict)
    # Expert shard k listens on shard_port_base + k; 0 lets each pick a free port.
    shard_port_base: int = Field(0, ge=0, le=65535)
    # Bind address of the shards' gRPC servers. "0.0.0.0" (multi-node) advertises the
    # node's IP to the engines; anything else is advertised as is.
    shard_host: str = "127.0.0.1"
    exchange_timeout_s: float = Field(8.0, gt=0)
    # Engine replicas serve prometheus metrics (expert load, bytes to shards) on this port;
    # None: not served (Ray's own metrics still work).
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    shard_connect_timeout_s: float = Field(180.0, gt=0)  # wait for shards at engine start
    engine_deployment: DeploymentResources = Field(default_factory=DeploymentResources)
    shard_deployment: DeploymentResources = Field(
        default_factory=lambda: DeploymentResources(max_ongoing_requests=64)
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_options(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dtype" in data:
            raise ValueError(
                "dtype is an engine option: set engine.dtype (and engine.device) instead of "
                "a top-level dtype"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelPlaneConfig:
        if self.shard_port_base and self.shard_port_base + self.num_expert_shards > 65536:
            raise ValueError("shard_port_base + num_expert_shards must stay below 65536")
        if self.engine_autoscaling is not None and "engine_replicas" in self.model_fields_set:
            raise ValueError(
                "engine_replicas and engine_autoscaling both set: with autoscaling, bound the "
                "replicas with engine_autoscaling.min_replicas and max_replicas"
            )
        from services.engine.params import EngineOptions  # torch: only when validating

        known = set(EngineOptions.__dataclass_fields__)
        unknown = set(self.engine) - known
        if unknown:
            raise ValueError(f"unknown engine options {sorted(unknown)}; known: {sorted(known)}")
        options = self.engine_options()
        options.validate()  # spelling of device/dtype, sizes; the hardware is checked in replicas
        gpus = self.engine_deployment.num_gpus
        if options.device.startswith("cuda") and gpus == 0:
            raise ValueError(
                f"engine.device={options.device!r} needs engine_deployment.num_gpus > 0: Ray "
                "hides GPUs from replicas that reserve none"
            )
        if options.device == "cpu" and gpus > 0:
            raise ValueError(
                f"engine_deployment.num_gpus={gpus:g} reserves a GPU but engine.device='cpu': "
                "set num_gpus to 0, or device to 'auto' or 'cuda'"
            )
        return self

    def engine_options(self) -> EngineOptions:
        from services.engine.params import EngineOptions

        return EngineOptions(**self.engine)

    def replica_engine_options(self) -> dict[str, Any]:
        """The engine options an Engine replica starts with: ``auto`` becomes ``cuda`` when
        the deployment reserves a GPU (so a replica that got none fails loudly instead of
        computing on the CPU) and ``cpu`` when it reserves none."""
        options = dict(self.engine)
        if options.get("device", "auto") == "auto":
            options["device"] = "cuda" if self.engine_deployment.num_gpus > 0 else "cpu"
        return options

    def shard_placement(self) -> tuple[str, str]:
        """(device, dtype) of the expert shards: their own deployment's GPU decides the
        device the same way; the dtype is the engine's."""
        device = "cuda" if self.shard_deployment.num_gpus > 0 else "cpu"
        return device, self.engine_options().dtype

    @property
    def min_engine_replicas(self) -> int:
        """Engine replicas the plane runs at least (what must fit the cluster at start)."""
        if self.engine_autoscaling is not None:
            return self.engine_autoscaling.min_replicas
        return self.engine_replicas

    @property
    def served_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        return self.model_path.rstrip("/").rsplit("/", 1)[-1] or "dsv2"
