"""The `helm test` check: the gateway is healthy and completes one chat request.

Works against any gateway URL (a cluster Service, a port-forward, or a local `dsv2 serve`).
"""

from __future__ import annotations

import time

import httpx


class SmokeError(RuntimeError):
    """What failed, in words a person can act on."""


def _wait_ready(http: httpx.Client, deadline: float) -> None:
    last = "no answer"
    while True:
        try:
            health = http.get("/healthz")
            if health.status_code != 200:
                raise SmokeError(f"GET /healthz answered {health.status_code}: {health.text[:200]}")
            ready = http.get("/readyz")
            if ready.status_code == 200:
                return
            last = f"GET /readyz answered {ready.status_code}: {ready.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"gateway unreachable: {exc}"
        left = deadline - time.monotonic()
        if left <= 0:
            raise SmokeError(f"gateway not ready in time; last: {last}")
        time.sleep(min(2.0, left))


def smoke(
    url: str, *, max_tokens: int = 8, timeout: float = 120.0, api_key: str | None = None
) -> str:
    """Return the assistant's reply text, or raise SmokeError saying what failed."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # The client keeps the anonymous cookie the gateway sets, as a browser would.
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as http:
        _wait_ready(http, deadline)
        models = http.get("/v1/models")
        if models.status_code != 200:
            raise SmokeError(f"GET /v1/models answered {models.status_code}: {models.text[:200]}")
        data = models.json().get("data") or []
        if not data:
            raise SmokeError("GET /v1/models lists no model")
        model = data[0]["id"]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello in one word."}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        response = http.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise SmokeError(
                f"POST /v1/chat/completions answered {response.status_code}: {response.text[:300]}"
            )
        completion = response.json()
        try:
            choice = completion["choices"][0]
            text = choice["message"]["content"]
            finish = choice["finish_reason"]
        except (KeyError, IndexError, TypeError) as exc:
            raise SmokeError(f"malformed chat completion: {completion!r}") from exc
        if finish not in ("stop", "length"):
            raise SmokeError(f"chat completion finished with {finish!r}: {completion!r}")
        generated = (completion.get("usage") or {}).get("completion_tokens")
        if not isinstance(text, str) or (generated is not None and generated < 1):
            raise SmokeError(f"chat completion produced no tokens: {completion!r}")
        return text
