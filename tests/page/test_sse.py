"""The page's SSE reader in the real browser: events split anywhere in the byte stream, even
inside a Chinese character or between "\\r" and "\\n", come out whole."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from playwright.sync_api import Browser

from services.gateway.http.routes.page import router
from tests.page.server import serve

READ_IN_CHUNKS = """async ({ body, size }) => {
  const { readServerSentEvents } = await import('/static/sse.js');
  const bytes = new TextEncoder().encode(body);
  const stream = new ReadableStream({
    start(controller) {
      for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
      controller.close();
    },
  });
  const events = [];
  for await (const event of readServerSentEvents(new Response(stream))) events.push(event);
  return events;
}"""


@pytest.fixture(scope="module")
def run(browser: Browser) -> Iterator:
    app = FastAPI()
    app.include_router(router)
    with serve(app) as url:
        context = browser.new_context()
        page = context.new_page()
        page.goto(url + "/")
        yield lambda body, size: page.evaluate(READ_IN_CHUNKS, {"body": body, "size": size})
        context.close()


DELTAS = ["你好", "，世界！", " DeepSeek-V2 ", "😀 émoji", "\n```python\nprint('ok')\n```"]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_events_survive_any_chunking(run, newline: str) -> None:
    body = f": ping{newline}{newline}"
    for text in DELTAS:
        body += f"data: {json.dumps({'type': 'delta', 'text': text}, ensure_ascii=False)}"
        body += newline * 2
    body += f"event: message{newline}data: {json.dumps({'type': 'done'})}{newline}{newline}"
    expected = [*({"type": "delta", "text": t} for t in DELTAS), {"type": "done"}]
    for size in (1, 2, 3, 5, 7, 4096):
        events = run(body, size)
        assert [json.loads(e["data"]) for e in events] == expected, size
