"""Generation engine: paged latent cache, prefix cache, continuous batching, streaming."""

from services.engine.async_engine import AsyncEngine
from services.engine.engine import Engine, InvalidRequest
from services.engine.metrics import MetricsSnapshot
from services.engine.params import EngineOptions, SamplingParams
from services.engine.priority import Overloaded, Priority
from services.engine.sequence import RequestOutput, StreamDelta

__all__ = [
    "AsyncEngine",
    "Engine",
    "EngineOptions",
    "InferenceService",
    "InvalidRequest",
    "MetricsSnapshot",
    "Overloaded",
    "Priority",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
]


def __getattr__(name: str):
    # the service imports the generated protobuf modules; load them only when asked for
    if name == "InferenceService":
        from services.engine.service import InferenceService

        return InferenceService
    raise AttributeError(name)
