"""Embedded mode: the gateway over the real engine's InferenceService in-process (the tiny
random checkpoint), to check the two sides agree on the ModelBackend protocol."""

from __future__ import annotations

import openai
import pytest

from tests.gateway.conftest import TEST_TIERS, ThreadedGateway, gateway_settings

pytestmark = pytest.mark.slow


def test_chat_completion_through_the_real_engine(tiny_checkpoint, redis_url):
    import torch

    torch.set_num_threads(1)
    from services.gateway.cli.gateway import embedded_backend

    backend = embedded_backend(tiny_checkpoint)
    gw = ThreadedGateway(gateway_settings(redis_url), backend, TEST_TIERS)
    try:
        key = gw.create_key("engine-user", "pro")
        client = openai.OpenAI(base_url=gw.http_url + "/v1", api_key=key, max_retries=0)
        model = client.models.list().data[0].id
        resp = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6,
            temperature=0,
        )
        assert resp.usage.completion_tokens >= 1
        assert resp.usage.prompt_tokens > 0
        assert resp.choices[0].finish_reason in ("stop", "length")
        chunks = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for c in chunks:
            if c.choices:
                text += c.choices[0].delta.content or ""
            usage = c.usage or usage
        assert text == resp.choices[0].message.content  # greedy: same reply both ways
        assert usage.completion_tokens == resp.usage.completion_tokens
    finally:
        gw.stop()
        backend.engine.close()  # the AsyncEngine's step thread
