"""Liveness, readiness (Redis + model plane) and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway.http.deps import GatewayDep
from services.rpc.dsv2.v1 import inference_pb2 as pb

router = APIRouter(tags=["health"])

# How recent a model-plane answer must be for a slow health check to read as busy.
BUSY_GRACE_S = 10.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(gw: GatewayDep) -> JSONResponse:
    """Ready to serve: not draining (SIGTERM), Redis answers (and the sessions Redis, when
    separate) and the model plane reports SERVING."""
    checks: dict[str, str] = {}
    if gw.drain_state.draining:
        checks["gateway"] = "draining: the server is restarting"
    redises = {"redis": gw.redis}
    if gw.session_redis is not gw.redis:
        redises["sessions_redis"] = gw.session_redis
    for name, client in redises.items():
        try:
            await asyncio.wait_for(client.ping(), timeout=2)
            checks[name] = "ok"
        except Exception as e:
            checks[name] = f"unavailable: {type(e).__name__}"
    try:
        h = await asyncio.wait_for(gw.backend.health(pb.HealthRequest()), timeout=3)
        checks["model"] = "ok" if h.serving else "not serving"
    except TimeoutError:
        # A slow health answer from a plane that is streaming replies means busy, not down
        # (taking the gateway out of rotation would only move the load); an error means down.
        busy = gw.backend.answered_within(BUSY_GRACE_S)
        checks["model"] = "ok" if busy else "unavailable: no answer within 3 s"
    except Exception as e:
        checks["model"] = f"unavailable: {type(e).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics")
async def metrics(gw: GatewayDep) -> Response:
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
