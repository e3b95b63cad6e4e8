"""One config for the model plane, from `serve run` args, a KubeRay serveConfigV2 or the CLI.

`build_app(args)` receives a plain dict (YAML in serveConfigV2); this validates it and says
which field is wrong instead of failing inside a replica.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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


class ModelPlaneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_path: str
    model_id: str | None = None  # name shown by /v1/models; default: the checkpoint's folder
    num_expert_shards: int = Field(2, ge=0)  # 0: routed experts in the engine process
    engine_replicas: int = Field(1, ge=1)
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
    def served_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        return self.model_path.rstrip("/").rsplit("/", 1)[-1] or "dsv2"
