"""Issue 16's must-show in the page: attach a picture, get the answer, reload, picture and
answer still there -- on the real chain: the gateway (uvicorn, real Redis) over the real engine
running a checkpoint that reads pictures, in this process as `dsv2 serve --no-ray` runs it.
No double, and nothing here skips:

- on a tiny random DeepSeek-VL2 checkpoint: the picture goes through the whole chain, an
  answer arrives, and after a reload the very picture and that answer are shown;
- on the shipped demo checkpoint (the tiny DeepSeek-VL2 demo model): the answer is the right
  one (how many shapes, which number).

Turns are sent at temperature 0 (a route adds it to the request the page makes): the page
itself sends none and the sessions API samples at 0.7; a test must not depend on a draw."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, Route, expect

from services.demo.evaluate import DEFAULT_CHECKPOINT, final_number
from tests.page.pictures import number, payload, shapes
from tests.page.stack import ROOMY, RunningGateway, open_page, running_gateway

QUESTIONS = [
    pytest.param("three-shapes.png", shapes(3), "How many shapes are in this picture?", 3, id="shapes-en"),
    pytest.param("two-shapes.png", shapes(2), "图里有几个图形？", 2, id="shapes-zh"),
    pytest.param("forty-seven.png", number(47), "What number is in this picture?", 47, id="number"),
]  # fmt: skip

ANSWER_TIMEOUT_MS = 180_000  # a CPU engine on a shared machine: the first turn warms it up


@contextmanager
def engine_gateway(checkpoint: Path, redis_url: str, folder: Path) -> Iterator[RunningGateway]:
    """The gateway over an in-process engine on `checkpoint` (the CPU, its default dtype)."""
    from services.gateway.cli.gateway import embedded_backend

    model_id = f"{checkpoint.parent.name}/{checkpoint.name}"  # e.g. demo/checkpoint
    backend = embedded_backend(checkpoint, model_id, {"device": "cpu"})
    try:
        with running_gateway(
            redis_url, folder, f"engine-{folder.name}", {"free": ROOMY}, backend=backend
        ) as gateway:
            yield gateway
    finally:
        backend.engine.close()


@pytest.fixture(scope="module")
def random_vl2_gateway(redis_server, tmp_path_factory) -> Iterator[RunningGateway]:
    from tests.engine.vl2_support import write_vl2_checkpoint

    checkpoint = write_vl2_checkpoint(tmp_path_factory.mktemp("page-vl2") / "random-vl2")
    with engine_gateway(checkpoint, redis_server.url, tmp_path_factory.mktemp("vl2")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def demo_gateway(redis_server, tmp_path_factory) -> Iterator[RunningGateway]:
    folder = tmp_path_factory.mktemp("demo")
    with engine_gateway(DEFAULT_CHECKPOINT, redis_server.url, folder) as gateway:
        yield gateway


def deterministic_turns(page: Page, **extra: object) -> None:
    def rewrite(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}")
        route.continue_(post_data=json.dumps({**body, "temperature": 0, **extra}))

    page.route("**/v1/sessions/*/messages", rewrite)


def ask_about_a_picture(
    page: Page, url: str, name: str, picture: bytes, question: str, shots: Path
) -> str:
    """Attach `picture` in the page, ask `question`, wait for the whole answer, reload, and
    check the picture (byte for byte) and the answer are shown again; returns the answer."""
    open_page(page, url)
    page.locator("#file-input").set_input_files([payload(name, picture, "image/png")])
    expect(page.locator("#attachments img")).to_have_count(1)
    page.locator("#input").fill(question)
    page.screenshot(path=str(shots / "attached.png"))
    page.locator("#send").click()

    reply = page.locator(".message.assistant").last
    error = page.locator("#composer-error")
    notice = page.locator("#notice")
    # The reply ends, or the gateway refuses the picture (inline), or the service fails.
    outcome = page.locator(
        '.message.assistant:not([data-state="streaming"]), '
        "#composer-error:not([hidden]), #notice:not([hidden])"
    )
    expect(outcome.first).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    if error.is_visible():
        pytest.fail(f"the gateway refused the picture (a text-only model?): {error.text_content()}")
    if notice.is_visible():
        pytest.fail(f"no answer: {notice.text_content()}")
    expect(reply).to_have_attribute("data-state", "done")
    answer = reply.locator(".message-body").inner_text()  # as read: paragraphs on lines
    assert answer.strip(), "the reply finished empty"
    shown_text = reply.locator(".message-body").text_content()
    page.screenshot(path=str(shots / "answered.png"))

    # Reload: the picture and the answer come back from the stored session.
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator(".message.user .message-body")).to_have_text([question])
    assert page.locator(".message.assistant .message-body").all_text_contents() == [shown_text]
    shown = page.locator(".message.user img")
    expect(shown).to_have_count(1)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.message.user img')]"
        ".every((img) => img.complete && img.naturalWidth > 0)"
    )
    src = shown.get_attribute("src") or ""
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.partition(",")[2]) == picture
    page.screenshot(path=str(shots / "reloaded.png"))
    return answer


def test_a_picture_goes_through_the_real_engine_and_stays_after_reload(
    page: Page, random_vl2_gateway: RunningGateway, tmp_path: Path
) -> None:
    # A random model answers nonsense: what counts is that it answered, with the picture.
    deterministic_turns(page, max_tokens=12)
    ask_about_a_picture(
        page, random_vl2_gateway.url, "shapes.png", shapes(3), "What is in this picture?", tmp_path
    )
    problems = page.problems  # type: ignore[attr-defined]
    assert problems.errors == []


@pytest.mark.parametrize("name, picture, question, expected", QUESTIONS)
def test_the_demo_model_answers_a_picture_right(
    page: Page,
    demo_gateway: RunningGateway,
    tmp_path: Path,
    name: str,
    picture: bytes,
    question: str,
    expected: int,
) -> None:
    deterministic_turns(page)
    answer = ask_about_a_picture(page, demo_gateway.url, name, picture, question, tmp_path)
    assert final_number(answer) == expected, f"asked {question!r} about {name}: {answer!r}"
