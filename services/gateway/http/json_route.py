"""FastAPI routes whose JSON bodies are read by validation.parse_json, the reader the fast lane
uses too, so both paths accept and refuse the same bytes (and none of them gets a 500:
FastAPI's own reader, json.loads, raises RecursionError on deep nesting and lets lone
surrogates and duplicate keys through)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from services.gateway.core.validation import parse_json


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Use as `APIRouter(route_class=StrictJSONRoute)`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
