"""The page's Markdown renderer in the real browser: formatting works and nothing in a reply
can become markup or script."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from playwright.sync_api import Browser

from services.gateway.http.routes.page import router
from tests.page.server import serve

RENDER = """async (source) => {
  const { renderMarkdown } = await import('/static/markdown.js');
  const box = document.createElement('div');
  box.id = 'probe';
  document.body.replaceChildren(box);
  box.append(renderMarkdown(source));
  await new Promise((resolve) => setTimeout(resolve, 100)); // let any injected handler fire
  return {
    html: box.innerHTML,
    text: box.textContent,
    tags: [...box.querySelectorAll('*')].map((node) => node.tagName.toLowerCase()),
    hrefs: [...box.querySelectorAll('a')].map((a) => a.getAttribute('href')),
    handlers: [...box.querySelectorAll('*')].flatMap(
      (node) => [...node.attributes].map((a) => a.name).filter((n) => n.startsWith('on'))),
    pwned: window.__pwned ?? null,
  };
}"""

ALLOWED_TAGS = {
    "p", "br", "strong", "em", "del", "code", "pre", "a", "ul", "ol", "li", "blockquote",
    "h1", "h2", "h3", "h4", "h5", "h6", "hr", "table", "thead", "tbody", "tr", "th", "td",
    "div", "span", "button",
}  # fmt: skip


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = FastAPI()
    app.include_router(router)
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def render(browser: Browser, base_url: str) -> Iterator[Callable[[str], dict]]:
    # One page for the whole module: each case replaces the probe's content.
    context = browser.new_context()
    page = context.new_page()
    page.goto(base_url + "/")
    yield lambda source: page.evaluate(RENDER, source)
    context.close()


HOSTILE = [
    "<script>window.__pwned = 1</script>",
    '<img src=x onerror="window.__pwned = 2">',
    "[click me](javascript:window.__pwned=3)",
    "[data](data:text/html,<script>window.__pwned=4</script>)",
    '<a href="javascript:window.__pwned=5">x</a>',
    "# <svg onload=window.__pwned=6>",
    "| <img src=x onerror=window.__pwned=7> |\n|---|\n| <script>x</script> |",
    "- <iframe src=javascript:window.__pwned=8>",
    "```html\n<script>window.__pwned = 9</script>\n```",
    "`<img src=x onerror=window.__pwned=10>`",
    "**<b onmouseover=window.__pwned=11>bold</b>**",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_markup_in_a_reply_is_shown_as_text(render, source: str) -> None:
    result = render(source)
    assert result["pwned"] is None
    assert result["handlers"] == []
    assert set(result["tags"]) <= ALLOWED_TAGS, result["html"]
    assert all(href is None or href.startswith(("http:", "https:")) for href in result["hrefs"])
    # The characters the model wrote are all still visible.
    for fragment in ("<script>", "<img", "<svg", "<iframe", "<b "):
        if fragment in source and "`" not in source:
            assert fragment in result["text"]


def test_formatting(render) -> None:
    result = render(
        "# Title\n\nSome **bold**, *italic*, `x < y` and [a link](https://example.com/a?b=1).\n\n"
        "```python\ndef f(x):\n    return x * 2  # 双倍\n```\n\n"
        "1. first\n2. second\n   - nested\n\n> quoted\n\n| a | b |\n|---|--:|\n| 1 | 2 |\n"
    )
    tags = result["tags"]
    for tag in ("h1", "strong", "em", "code", "pre", "ol", "ul", "blockquote", "table", "a"):
        assert tag in tags, (tag, result["html"])
    assert result["hrefs"] == ["https://example.com/a?b=1"]
    assert "def f(x):\n    return x * 2  # 双倍" in result["text"]
    assert "x < y" in result["text"]


def test_streaming_partial_code_fence_and_chinese(render) -> None:
    # Mid-stream the closing fence has not arrived yet: the code still shows as code.
    result = render("中文回答：\n\n```js\nconst s = '你好，世界';")
    assert "pre" in result["tags"]
    assert "中文回答：" in result["text"]
    assert "const s = '你好，世界';" in result["text"]


def test_snake_case_and_arithmetic_are_not_emphasis(render) -> None:
    for source in (
        "use my_var_name and 2 * 3 * 4",
        "window.__pwned = 1 and window.__pwned = 2",
    ):
        result = render(source)
        assert "em" not in result["tags"] and "strong" not in result["tags"], source
        assert result["text"] == source
