"""The chat page against the real gateway (FastAPI app under uvicorn, real Redis) in Debian's
chromium. Only the model plane is a double (backend_double.py): a checkpoint, torch and Ray
have nothing to add to what the page does, and the double lets a test hold a reply half-way
and read the exact prompt the model received."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.page.stack import (
    ROOMY,
    RunningGateway,
    assert_no_page_errors,
    last_reply,
    open_page,
    running_gateway,
    send,
    wait_done,
)


@pytest.fixture(scope="module")
def chat_gateway(redis_server, tmp_path_factory) -> Iterator[RunningGateway]:
    folder = tmp_path_factory.mktemp("page-gateway")
    with running_gateway(
        redis_server.url, folder, "chat", {"free": ROOMY, "pro": {**ROOMY, "concurrent_streams": 4}}
    ) as gateway:
        yield gateway


@pytest.fixture
def gateway(chat_gateway: RunningGateway) -> RunningGateway:
    chat_gateway.backend.reset()
    return chat_gateway


def test_streams_a_reply_keeps_the_chat_and_sends_history(
    page: Page, gateway: RunningGateway, output_dir: Path
) -> None:
    backend = gateway.backend
    open_page(page, gateway.url)
    expect(page.locator("#usage")).to_contain_text("requests")

    # The backend holds the reply after three pieces: what shows by then was streamed.
    backend.reply_with("Hello", "! I am ", "DeepSeek-V2", " (a test double). ", "你好，", "世界！")
    backend.hold(after=3)
    send(page, "Hi there, who are you?")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "streaming")
    expect(reply.locator(".message-body")).to_have_text("Hello! I am DeepSeek-V2")
    expect(page.locator("#stop")).to_be_visible()
    backend.release()
    wait_done(page)
    first_answer = "Hello! I am DeepSeek-V2 (a test double). 你好，世界！"
    expect(reply.locator(".message-body")).to_have_text(first_answer)
    expect(page.locator(".session-open")).to_have_text(["Hi there, who are you?"])

    # Reload: the chat is listed and its messages come back from the server.
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator(".session-open")).to_have_text(["Hi there, who are you?"])
    expect(page.locator(".message.user .message-body")).to_have_text(["Hi there, who are you?"])
    expect(page.locator(".message.assistant .message-body")).to_have_text([first_answer])

    # Second turn: the model gets the first turn as context; Markdown code renders as code.
    backend.reply_with(
        "Sure, here is one:\n\n", "```python\n", "def greet(name):\n", "    print(f'你好, {name}')\n",
        "```\n\n", "It prints a **greeting**.",
    )  # fmt: skip
    send(page, "Show me a Python function")
    wait_done(page)
    code = last_reply(page).locator("pre code")
    expect(code).to_have_text("def greet(name):\n    print(f'你好, {name}')")
    expect(last_reply(page).locator("strong")).to_have_text("greeting")
    assert backend.prompts()[-1] == [
        ("user", "Hi there, who are you?"),
        ("assistant", first_answer),
        ("user", "Show me a Python function"),
    ]
    expect(page.locator(".session-open")).to_have_count(1)
    page.locator("#input").fill("And in Rust?")  # mid-conversation, a draft in the box
    page.screenshot(path=str(output_dir / "chat.png"))
    assert_no_page_errors(page)


def test_stop_cancels_the_generation(page: Page, gateway: RunningGateway, output_dir: Path) -> None:
    backend = gateway.backend
    open_page(page, gateway.url)
    backend.reply_with("Counting: ", "one, ", "two, ", "three, ", "four.")
    backend.hold(after=2)
    send(page, "Count to four, slowly")
    expect(last_reply(page).locator(".message-body")).to_have_text("Counting: one,")
    page.screenshot(path=str(output_dir / "streaming.png"))
    page.locator("#stop").click()

    assert backend.cancelled.wait(10), "the backend request was not cancelled"
    assert not backend.completed.is_set()
    expect(last_reply(page)).to_have_attribute("data-state", "stopped")
    expect(last_reply(page).locator(".message-status")).to_have_text("Stopped.")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    backend.release()

    # The chat is usable again at once, and the stopped part is part of the history.
    backend.reply_with("Sure.")
    send(page, "Thanks")
    wait_done(page)
    expect(last_reply(page).locator(".message-body")).to_have_text("Sure.")
    assert backend.prompts()[-1] == [
        ("user", "Count to four, slowly"),
        ("assistant", "Counting: one, "),
        ("user", "Thanks"),
    ]
    assert_no_page_errors(page)


def test_markup_in_replies_and_titles_is_shown_as_text(page: Page, gateway: RunningGateway) -> None:
    hostile_reply = (
        '<script>window.__pwned = 1</script> and <img src=x onerror="window.__pwned = 2">'
    )
    hostile_title = '<b onmouseover="window.__pwned=3">b</b><img src=y onerror="window.__pwned=4">'
    open_page(page, gateway.url)
    gateway.backend.reply_with(
        "<script>window.__pwned = 1</script>", " and ", '<img src=x onerror="window.__pwned = 2">'
    )
    send(page, hostile_title)
    wait_done(page)

    for attempt in ("live", "reloaded"):
        expect(last_reply(page).locator(".message-body")).to_have_text(hostile_reply)
        expect(page.locator(".message.user .message-body")).to_have_text([hostile_title])
        expect(page.locator(".session-open")).to_have_text([hostile_title])
        expect(page.locator("#chat-title")).to_have_text(hostile_title)
        injected = page.locator(
            "#messages script, #messages img, #messages b, #sidebar img, #sidebar b"
        )
        assert injected.count() == 0, attempt
        assert page.evaluate("window.__pwned ?? null") is None, attempt
        if attempt == "live":
            page.reload()
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
    assert_no_page_errors(page)


def test_model_outage_keeps_what_the_user_typed(page: Page, gateway: RunningGateway) -> None:
    open_page(page, gateway.url)
    gateway.backend.down = True
    draft = "Please keep this text — 请保留这段文字"
    send(page, draft)
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("temporarily unavailable")
    expect(page.locator("#input")).to_have_value(draft)
    expect(page.locator(".message")).to_have_count(0)

    # Back up: the same text goes through with one click.
    gateway.backend.down = False
    gateway.backend.reply_with("Kept.")
    page.locator("#send").click()
    wait_done(page)
    expect(page.locator(".message.user .message-body")).to_have_text([draft])
    expect(notice).to_be_hidden()
    expect(page.locator("#input")).to_have_value("")


def test_shed_request_says_busy_counts_down_and_keeps_the_text(
    page: Page, gateway: RunningGateway
) -> None:
    open_page(page, gateway.url)
    gateway.backend.shedding = True  # the model plane refuses free-tier work for now
    draft = "Is anyone there?"
    send(page, draft)
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_have_attribute("data-kind", "busy")
    expect(notice).to_contain_text("very busy right now")
    expect(notice).to_contain_text("nothing was taken from your quota")
    expect(notice).to_contain_text(re.compile(r"You can send again in \d+ s\."))
    expect(page.locator("#input")).to_have_value(draft)
    expect(page.locator(".message")).to_have_count(0)

    gateway.backend.shedding = False
    gateway.backend.reply_with("Here now.")
    page.locator("#send").click()
    wait_done(page)
    expect(page.locator(".message.user .message-body")).to_have_text([draft])
    expect(notice).to_be_hidden()
    assert_no_page_errors(page)


def test_new_chat_and_delete(page: Page, gateway: RunningGateway) -> None:
    open_page(page, gateway.url)
    send(page, "first chat")
    wait_done(page)
    page.locator("#new-chat").click()
    expect(page.locator(".message")).to_have_count(0)
    send(page, "second chat")
    wait_done(page)
    # Newest first.
    expect(page.locator(".session-open")).to_have_text(["second chat", "first chat"])

    page.locator(".session-open", has_text="first chat").click()
    expect(page.locator(".message.user .message-body")).to_have_text(["first chat"])
    page.get_by_role("button", name="Delete chat: first chat").click()
    expect(page.locator(".session-open")).to_have_text(["second chat"])
    expect(page.locator(".message")).to_have_count(0)
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator(".session-open")).to_have_text(["second chat"])


def test_sidebar_lists_every_chat_across_pages(page: Page, gateway: RunningGateway) -> None:
    open_page(page, gateway.url)  # gets the anonymous cookie
    for i in range(130):  # the API lists 100 a page: the page must follow next_cursor
        resp = page.request.post(gateway.url + "/v1/sessions", data={"title": f"chat {i}"})
        assert resp.status == 201, resp.text()
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator(".session-open")).to_have_count(130)
    expect(page.locator(".session-open").last).to_have_text("chat 0")


def test_api_key_is_kept_and_sent_as_bearer(page: Page, gateway: RunningGateway) -> None:
    key = gateway.create_key("page-user", "pro")
    open_page(page, gateway.url)
    send(page, "as a guest")
    wait_done(page)
    expect(page.locator("#usage")).to_contain_text("Free tier")

    page.locator("#open-settings").click()
    page.locator("#api-key").fill(key)
    page.locator("#save-key").click()
    expect(page.locator("#usage")).to_contain_text("Pro tier")
    expect(page.locator("#identity")).to_contain_text(key[-4:])
    expect(page.locator(".session-open")).to_have_count(0)  # another user's chats
    send(page, "as a registered user")
    wait_done(page)

    # The key stays in this browser across reloads.
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#usage")).to_contain_text("Pro tier")
    expect(page.locator(".session-open")).to_have_text(["as a registered user"])

    # A wrong key is reported where it can be fixed.
    page.locator("#open-settings").click()
    page.locator("#api-key").fill("sk-not-a-real-key")
    page.locator("#save-key").click()
    expect(page.locator("#notice")).to_contain_text("API key was not accepted")

    page.locator("#open-settings").click()
    page.locator("#remove-key").click()
    expect(page.locator("#usage")).to_contain_text("Free tier")
    expect(page.locator(".session-open")).to_have_text(["as a guest"])


def test_works_at_phone_width(browser: Browser, gateway: RunningGateway, output_dir: Path) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    try:
        open_page(page, gateway.url)
        sidebar = page.locator("#sidebar")
        expect(sidebar).not_to_be_in_viewport()
        gateway.backend.reply_with("Short answer: ", "**yes**. ", "移动端也可以。")
        send(page, "Does this work on a phone?")
        wait_done(page)
        expect(last_reply(page).locator(".message-body")).to_have_text(
            "Short answer: yes. 移动端也可以。"
        )
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        expect(page.locator("#usage-compact")).to_have_text("999 left")  # of 1000 this minute
        page.screenshot(path=str(output_dir / "phone.png"))

        page.locator("#toggle-sidebar").tap()
        expect(sidebar).to_be_in_viewport()
        expect(page.locator(".session-open")).to_have_text(["Does this work on a phone?"])
        page.locator("#new-chat").tap()
        expect(sidebar).not_to_be_in_viewport()
        expect(page.locator(".message")).to_have_count(0)
    finally:
        context.close()


@pytest.fixture(scope="module")
def limited_gateway(redis_server, tmp_path_factory) -> Iterator[RunningGateway]:
    folder = tmp_path_factory.mktemp("page-limited")
    tiers = {"free": {**ROOMY, "requests_per_minute": 2}}
    with running_gateway(redis_server.url, folder, "limited", tiers) as gateway:
        yield gateway


def test_third_message_in_a_minute_shows_the_limit(
    page: Page, limited_gateway: RunningGateway, output_dir: Path
) -> None:
    open_page(page, limited_gateway.url)
    for text in ("one", "two"):
        send(page, text)
        wait_done(page)
    expect(page.locator("#usage")).to_contain_text("0 / 2 requests")

    send(page, "three")
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("You've reached the free usage limit.")
    expect(notice).to_contain_text(re.compile(r"You can send again in \d+ s\."))
    expect(notice).to_contain_text("2 requests per minute")
    expect(page.locator("#input")).to_have_value("three")
    expect(page.locator(".message.user")).to_have_count(2)
    assert len(limited_gateway.backend.requests) == 2
    page.screenshot(path=str(output_dir / "limit.png"))


def test_enter_sends_and_shift_enter_starts_a_new_line(page: Page, gateway: RunningGateway) -> None:
    open_page(page, gateway.url)
    box = page.locator("#input")
    box.press_sequentially("line one")
    box.press("Shift+Enter")
    box.press_sequentially("line two")
    expect(box).to_have_value("line one\nline two")
    expect(page.locator(".message")).to_have_count(0)
    box.press("Enter")
    wait_done(page)
    expect(box).to_have_value("")
    assert gateway.backend.prompts()[-1] == [("user", "line one\nline two")]
    text = page.locator(".message.user .message-body").inner_text()
    assert text == "line one\nline two"


def test_redis_outage_keeps_what_the_user_typed(
    page: Page, own_redis_server, tmp_path: Path
) -> None:
    with running_gateway(own_redis_server.url, tmp_path, "outage", {"free": ROOMY}) as gateway:
        open_page(page, gateway.url)
        own_redis_server.stop()
        draft = "Still here after the outage?"
        send(page, draft)
        notice = page.locator("#notice")
        expect(notice).to_contain_text("temporarily unavailable")
        expect(notice).to_contain_text("Redis")
        expect(page.locator("#input")).to_have_value(draft)
        expect(page.locator(".message")).to_have_count(0)

        # Redis comes back (empty): the gateway reconnects and the same text goes through.
        own_redis_server.start()
        page.locator("#send").click()
        wait_done(page)
        expect(page.locator(".message.user .message-body")).to_have_text([draft])
        expect(page.locator(".session-open")).to_have_text([draft])
