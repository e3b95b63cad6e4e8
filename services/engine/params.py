"""User-facing knobs: per-request sampling and per-engine options."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.placement import check_device_name, dtype_name
from services.engine.priority import Priority


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 is greedy; top_p in (0, 1) and top_k > 0 narrow the distribution; a seed
    makes the request's output reproducible whatever else runs in the same batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError with a message saying what to fix."""
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop must not contain empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class EngineOptions:
    """Where and how the engine runs: device, dtype and sizing. Every way of starting an
    engine (``Engine.from_pretrained``, ``dsv2 serve``, ``dsv2 gateway --model``, the Ray
    Engine deployment, the Helm chart's ``serve.engine``) builds it from this one object.
    Cache capacity is given in tokens or bytes (tokens wins when both)."""

    # "auto" (CUDA when a GPU is visible, else the CPU), "cpu", "cuda" or "cuda:N"; an explicit
    # device that is not there is an error at start (model.placement)
    device: str = "auto"
    # "auto" (bfloat16 on CUDA, float32 on the CPU), "float32", "bfloat16" or "float16": the
    # weights' and the latent cache's dtype
    dtype: str = "auto"

    block_size: int = 16
    cache_tokens: int | None = None
    cache_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    # bf16/fp16 on CPU: keep oneDNN pre-packed copies of the weights a decode step reads
    # besides the routed experts (attention projections, dense/shared MLPs, lm_head) -- faster
    # batched decoding for a second copy of those weights (see model.linear)
    prepack_weights: bool = True
    cuda_graphs: bool = True  # on CUDA, replay decode-only steps from captured graphs
    # on the CPU, decode-only steps of a few rows run all layers as one C++ call (two calls a
    # layer where some half is not covered) where the C++ kernels are built
    # (model.fused_decode); false: op by op (eager)
    fused_decode: bool = True
    # image embeddings of recently seen pictures kept on the device (by content and tiling),
    # so a picture asked about again skips the vision tower even where the prefix cache
    # cannot cover its last rows (they share the prompt's last, partial block); 0: off
    image_cache_bytes: int = 64 << 20
    # Priority and load shedding (services/engine/priority.py). A waiting request counts as
    # if it had arrived priority_aging_s earlier per class above free, so a free request that
    # has waited that long goes before a pro request that just arrived (no starvation).
    priority_aging_s: float = 30.0
    # New requests of the shed_priorities classes are refused at once (Overloaded) while the
    # waiting queue holds at least this many requests / prompt tokens; None: no bound.
    max_waiting_requests: int | None = None
    max_waiting_tokens: int | None = None
    shed_priorities: list[str] = field(default_factory=lambda: ["free"])

    def __post_init__(self) -> None:
        # torch objects are accepted and kept as their option spelling (configs stay plain)
        if not isinstance(self.dtype, str):
            self.dtype = dtype_name(self.dtype)
        if not isinstance(self.device, str):
            self.device = str(self.device)

    def validate(self) -> None:
        """Raise ValueError naming the option to fix (spelling only: whether the hardware
        has the device is checked where the engine starts, see model.placement.resolve_device)."""
        check_device_name(self.device)
        dtype_name(self.dtype)
        if self.block_size <= 0:
            raise ValueError("block_size must be > 0")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be > 0")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be > 0")
        if self.cache_tokens is not None and self.cache_tokens < self.block_size:
            raise ValueError("cache_tokens must hold at least one block")
        if (
            isinstance(self.image_cache_bytes, bool)
            or not isinstance(self.image_cache_bytes, int)
            or self.image_cache_bytes < 0
        ):
            raise ValueError(
                f"image_cache_bytes must be a whole number >= 0, got {self.image_cache_bytes!r}"
            )
        if not self.priority_aging_s > 0:  # also refuses NaN
            raise ValueError(f"priority_aging_s must be > 0, got {self.priority_aging_s}")
        for name in ("max_waiting_requests", "max_waiting_tokens"):
            bound = getattr(self, name)
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                raise ValueError(f"{name} must be a whole number or null, got {bound!r}")
            if bound is not None and bound < 0:
                raise ValueError(f"{name} must be >= 0 (or null for no bound), got {bound}")
        self.shed_classes()

    def shed_classes(self) -> frozenset[Priority]:
        """The priority classes refused under overload; ValueError naming the option."""
        if isinstance(self.shed_priorities, str) or not isinstance(
            self.shed_priorities, list | tuple
        ):
            raise ValueError(
                f"shed_priorities must be a list of priority names, got {self.shed_priorities!r}"
            )
        return frozenset(Priority.parse(n, "shed_priorities") for n in self.shed_priorities)


# Default cache budget when neither tokens nor bytes are given.
DEFAULT_CACHE_BYTES = 1 << 30
