"""Pictures in the chat page, against the real gateway (uvicorn, real Redis) in Debian's
chromium, with the scripted model plane (backend_double.py): attach from the file picker (by
keyboard too), paste, drop; preview and remove; the checks shown beside the composer; the
pictures in the sent message, in what the model plane received, and again after a reload
(from the session the gateway stored); the gateway's own refusal shown inline.

Whether a model answers a picture correctly is test_image_answer.py's (a real checkpoint)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.page.backend_double import ScriptedBackend
from tests.page.pictures import encode, payload, plain
from tests.page.stack import (
    ROOMY,
    RunningGateway,
    assert_no_page_errors,
    last_reply,
    open_page,
    running_gateway,
    wait_done,
)

RED_PNG = plain((64, 48), "red")
BLUE_JPEG = plain((80, 60), "blue", "JPEG")
GREEN_WEBP = plain((50, 50), "green", "WEBP")
ORANGE_GIF = plain((40, 30), "orange", "GIF")
MAX_IMAGES = 4  # the gateway's per-message cap, as the page knows it


@pytest.fixture(scope="module")
def images_gateway(redis_server, tmp_path_factory) -> Iterator[RunningGateway]:
    folder = tmp_path_factory.mktemp("page-images")
    tiers = {"free": {**ROOMY, "images_per_day": 100}}
    with running_gateway(redis_server.url, folder, "images", tiers) as gateway:
        yield gateway


@pytest.fixture
def gateway(images_gateway: RunningGateway) -> RunningGateway:
    images_gateway.backend.reset()
    return images_gateway


@pytest.fixture(scope="module")
def text_only_gateway(redis_server, tmp_path_factory) -> Iterator[RunningGateway]:
    backend = ScriptedBackend()
    backend.accepts_images = False
    backend.reset = lambda: None  # type: ignore[method-assign]  # stays text-only
    folder = tmp_path_factory.mktemp("page-text-only")
    with running_gateway(
        redis_server.url, folder, "text-only", {"free": ROOMY}, backend=backend
    ) as gateway:
        yield gateway


def pictures_left(page: Page) -> int:
    """The pictures left today, as the quota panel shows them ("98 / 100 pictures")."""
    text = page.locator("#usage").inner_text()
    found = re.search(r"([\d,]+) / 100 pictures", text)
    assert found, text
    return int(found.group(1).replace(",", ""))


def shown_pictures(page: Page, selector: str) -> list[dict]:
    """Each picture under `selector`: alt, the bytes of its data URL, and whether the browser
    decoded it (its natural size; 0 x 0 for a broken image)."""
    pictures = page.locator(selector).evaluate_all(
        """(imgs) => imgs.map((img) => ({
            alt: img.alt, src: img.getAttribute('src'), complete: img.complete,
            width: img.naturalWidth, height: img.naturalHeight }))"""
    )
    for picture in pictures:
        head, _, data = picture.pop("src").partition(",")
        picture["mime"] = head.removeprefix("data:").removesuffix(";base64")
        picture["data"] = base64.b64decode(data)
    return pictures


def wait_pictures_decoded(page: Page, selector: str) -> None:
    page.wait_for_function(
        """(selector) => [...document.querySelectorAll(selector)]
            .every((img) => img.complete && img.naturalWidth > 0)""",
        arg=selector,
    )


def test_attach_preview_remove_send_and_see_them_after_reload(
    page: Page, gateway: RunningGateway, tmp_path: Path, output_dir: Path
) -> None:
    # Intercept file choosers from the start: enabling it only when the key is pressed races
    # the press (an unintercepted chooser in headless Chromium just closes).
    page.on("filechooser", lambda chooser: None)
    open_page(page, gateway.url)

    # The attach button opens the file picker, from the keyboard as well.
    page.locator("#attach").focus()
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    assert chooser.value.is_multiple()
    chooser.value.set_files(
        [
            payload("red.png", RED_PNG, "image/png"),
            payload("blue.jpg", BLUE_JPEG, "image/jpeg"),
            payload("green.webp", GREEN_WEBP, "image/webp"),
        ]
    )
    previews = page.locator("#attachments .attachment-image")
    expect(previews).to_have_count(3)
    expect(page.get_by_role("list", name="Pictures to send")).to_be_visible()
    wait_pictures_decoded(page, "#attachments img")
    assert [p["alt"] for p in shown_pictures(page, "#attachments img")] == [
        "Picture 1: red.png",
        "Picture 2: blue.jpg",
        "Picture 3: green.webp",
    ]

    # Remove the first by keyboard: the focus moves to the next picture's remove button.
    page.get_by_role("button", name="Remove picture 1: red.png").focus()
    page.keyboard.press("Enter")
    expect(previews).to_have_count(2)
    expect(page.get_by_role("button", name="Remove picture 1: blue.jpg")).to_be_focused()
    assert shown_pictures(page, "#attachments img") == [
        {"alt": "Picture 1: blue.jpg", "complete": True, "width": 80, "height": 60,
         "mime": "image/jpeg", "data": BLUE_JPEG},
        {"alt": "Picture 2: green.webp", "complete": True, "width": 50, "height": 50,
         "mime": "image/webp", "data": GREEN_WEBP},
    ]  # fmt: skip
    question = "Which colours do you see?"
    page.locator("#input").fill(question)
    left = pictures_left(page)
    page.screenshot(path=str(tmp_path / "attached.png"))
    page.screenshot(path=str(output_dir / "pictures-attached.png"))

    gateway.backend.reply_with("Blue ", "and green.")
    page.locator("#input").press("Enter")
    wait_done(page)
    expect(previews).to_have_count(0)
    expect(page.locator("#attachments")).to_be_hidden()
    expect(page.locator(".message.user .message-body")).to_have_text([question])
    expect(last_reply(page).locator(".message-body")).to_have_text("Blue and green.")
    expect(page.locator("#usage")).to_contain_text(f"{left - 2} / 100 pictures")
    sent = [
        {"alt": "Picture 1: blue.jpg", "complete": True, "width": 80, "height": 60,
         "mime": "image/jpeg", "data": BLUE_JPEG},
        {"alt": "Picture 2: green.webp", "complete": True, "width": 50, "height": 50,
         "mime": "image/webp", "data": GREEN_WEBP},
    ]  # fmt: skip
    wait_pictures_decoded(page, ".message.user img")
    assert shown_pictures(page, ".message.user img") == sent

    # The model plane got both pictures, byte for byte, in order, with one <image> each.
    (role, content), = gateway.backend.prompts()[-1]  # fmt: skip
    assert role == "user"
    assert content.count("<image>") == 2 and question in content
    assert gateway.backend.images()[-1] == [[("image/jpeg", BLUE_JPEG), ("image/webp", GREEN_WEBP)]]
    page.screenshot(path=str(tmp_path / "sent.png"))

    # Reload: the pictures come back from the stored session, with the reply.
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator(".message.user .message-body")).to_have_text([question])
    expect(last_reply(page).locator(".message-body")).to_have_text("Blue and green.")
    expect(page.locator(".message.user img")).to_have_count(2)
    wait_pictures_decoded(page, ".message.user img")
    reloaded = shown_pictures(page, ".message.user img")
    assert reloaded == [
        {**sent[0], "alt": "Picture 1"},
        {**sent[1], "alt": "Picture 2"},
    ]
    page.screenshot(path=str(tmp_path / "reloaded.png"))
    page.screenshot(path=str(output_dir / "pictures-reloaded.png"))

    # A picture opens full size (by keyboard too) and Escape closes it.
    opener = page.get_by_role("button", name="Picture 2").first
    opener.focus()
    page.keyboard.press("Enter")
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    expect(page.locator("#viewer-title")).to_have_text("Picture 2")
    wait_pictures_decoded(page, "#viewer-image")
    assert shown_pictures(page, "#viewer-image") == [{**sent[1], "alt": "Picture 2"}]
    page.screenshot(path=str(tmp_path / "viewer.png"))
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()
    expect(opener).to_be_focused()
    assert_no_page_errors(page)


MAKE_TRANSFER = """(files) => {
  const transfer = new DataTransfer();
  for (const { b64, name, type } of files) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    transfer.items.add(new File([bytes], name, { type }));
  }
  return transfer;
}"""


def transfer(page: Page, *files: tuple[str, bytes, str]):
    args = [{"name": n, "b64": base64.b64encode(d).decode(), "type": t} for n, d, t in files]
    return page.evaluate_handle(MAKE_TRANSFER, args)


PASTE = """([transfer, text]) => {
  const data = transfer ?? new DataTransfer();
  if (text) data.setData('text/plain', text);
  const event = new ClipboardEvent('paste', { clipboardData: data, bubbles: true, cancelable: true });
  return document.getElementById('input').dispatchEvent(event);  // false: the page took it
}"""


def test_paste_and_drop_attach_pictures(
    page: Page, gateway: RunningGateway, tmp_path: Path
) -> None:
    open_page(page, gateway.url)
    previews = page.locator("#attachments img")

    # Pasted text is left to the browser; a pasted picture (a screenshot: no name) is taken.
    assert page.evaluate(PASTE, [None, "just text"]) is True
    expect(previews).to_have_count(0)
    pasted = transfer(page, ("", RED_PNG, "image/png"))
    assert page.evaluate(PASTE, [pasted, None]) is False
    expect(previews).to_have_count(1)
    expect(previews).to_have_attribute("alt", "Picture 1: pasted image")

    # Dragging files over the composer shows where to drop; dropping attaches them.
    dropped = transfer(
        page, ("blue.jpg", BLUE_JPEG, "image/jpeg"), ("orange.gif", ORANGE_GIF, "image/gif")
    )
    composer = page.locator("#composer")
    composer.dispatch_event("dragover", {"dataTransfer": dropped})
    expect(page.locator("#drop-hint")).to_be_visible()
    composer.dispatch_event("dragleave", {"dataTransfer": dropped})  # dragged away again
    expect(page.locator("#drop-hint")).to_be_hidden()
    # Dropped beside the composer: not attached, and the browser must not leave the chat
    # to show the file (the drop's default is prevented).
    beside = page.evaluate(
        """(transfer) => document.getElementById('messages').dispatchEvent(
            new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }))""",
        dropped,
    )
    assert beside is False
    expect(previews).to_have_count(1)
    composer.dispatch_event("dragover", {"dataTransfer": dropped})
    expect(page.locator("#drop-hint")).to_be_visible()
    page.screenshot(path=str(tmp_path / "dragging.png"))
    composer.dispatch_event("drop", {"dataTransfer": dropped})
    expect(page.locator("#drop-hint")).to_be_hidden()
    expect(previews).to_have_count(3)
    wait_pictures_decoded(page, "#attachments img")
    assert [(p["alt"], p["mime"], p["data"]) for p in shown_pictures(page, "#attachments img")] == [
        ("Picture 1: pasted image", "image/png", RED_PNG),
        ("Picture 2: blue.jpg", "image/jpeg", BLUE_JPEG),
        ("Picture 3: orange.gif", "image/gif", ORANGE_GIF),
    ]

    # Pictures alone, without words, can be sent.
    page.locator("#send").click()
    wait_done(page)
    expect(page.locator(".message.user img")).to_have_count(3)
    expect(page.locator(".message.user .message-body")).to_be_hidden()
    assert gateway.backend.images()[-1] == [
        [("image/png", RED_PNG), ("image/jpeg", BLUE_JPEG), ("image/gif", ORANGE_GIF)]
    ]
    assert_no_page_errors(page)


def test_wrong_format_size_and_count_are_shown_inline_and_nothing_is_sent(
    page: Page, gateway: RunningGateway, tmp_path: Path
) -> None:
    open_page(page, gateway.url)
    error = page.locator("#composer-error")
    expect(error).to_be_hidden()
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 megapixels, a few KB
    page.locator("#file-input").set_input_files(
        [
            payload("notes.png", b"not a picture at all\n", "image/png"),
            payload("huge.png", b"\x89PNG\r\n\x1a\n" + bytes(11 * 1024 * 1024), "image/png"),
            payload("bomb.png", bomb, "image/png"),
            payload("red.png", RED_PNG, "image/png"),
        ]
    )
    expect(error).to_be_visible()
    expect(error).to_have_attribute("role", "alert")
    expect(error).to_have_text(
        '"notes.png" is not an image the model can read. Use a PNG, JPEG, WebP or GIF image. '
        '"huge.png" is 11 MB; an image can be at most 10 MB. Send a smaller or more compressed '
        'one. "bomb.png" is 10000×10000 pixels (100 megapixels); an image can have at most 16 '
        "megapixels. Scale it down and try again."
    )
    # The good one was attached; the message box is described by the error.
    expect(page.locator("#attachments img")).to_have_count(1)
    described = page.locator("#input").get_attribute("aria-describedby") or ""
    assert "composer-error" in described.split()
    page.screenshot(path=str(tmp_path / "refused.png"))

    # Past the per-message cap: the rest are not added, and the button says why.
    page.locator("#file-input").set_input_files(
        [payload(f"p{i}.png", plain((20 + i, 20), "gray"), "image/png") for i in range(MAX_IMAGES)]
    )
    expect(page.locator("#attachments img")).to_have_count(MAX_IMAGES)
    expect(error).to_have_text(
        f'A message can carry at most {MAX_IMAGES} pictures; "p{MAX_IMAGES - 1}.png" was not added.'
    )
    page.locator("#attach").focus()  # aria-disabled, but still says why when pressed
    page.keyboard.press("Enter")
    expect(error).to_have_text(
        f"A message can carry at most {MAX_IMAGES} pictures: remove one to attach another."
    )
    page.get_by_role("button", name="Remove picture 1: red.png").click()
    expect(error).to_be_hidden()
    assert gateway.backend.requests == []
    assert_no_page_errors(page)


def test_the_gateway_refusing_a_picture_is_shown_inline_and_keeps_the_message(
    page: Page, gateway: RunningGateway
) -> None:
    # A PNG whose header is fine (the page lets it through) but whose pixels are cut off:
    # only the gateway's decoder can tell.
    broken = RED_PNG[: len(RED_PNG) // 2]
    open_page(page, gateway.url)
    page.locator("#file-input").set_input_files([payload("cut.png", broken, "image/png")])
    expect(page.locator("#attachments img")).to_have_count(1)
    page.locator("#input").fill("What is this?")
    page.locator("#input").press("Enter")

    error = page.locator("#composer-error")
    expect(error).to_be_visible()
    # The gateway's own words (as its sessions API answers the same turn), naming the picture
    # the user sees instead of the field path.
    session = page.request.post(gateway.url + "/v1/sessions", data={}).json()
    url = "data:image/png;base64," + base64.b64encode(broken).decode()
    refusal = page.request.post(
        f"{gateway.url}/v1/sessions/{session['id']}/messages",
        data={"content": [{"type": "image_url", "image_url": {"url": url}},
                          {"type": "text", "text": "What is this?"}]},
    )  # fmt: skip
    assert refusal.status == 400, refusal.text()
    words = refusal.json()["error"]
    assert words["param"] == "content.0.image_url.url"
    assert words["message"].startswith("content.0.image_url.url: ")
    detail = words["message"].removeprefix("content.0.image_url.url: ")
    expect(error).to_have_text(f"Picture 1 (cut.png): {detail}")
    # Nothing lost: the text and the picture are back in the composer, no half turn shown.
    expect(page.locator("#input")).to_have_value("What is this?")
    expect(page.locator("#attachments img")).to_have_count(1)
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#notice")).to_be_hidden()
    assert gateway.backend.requests == []

    # Removing the picture clears the error; the text goes through on its own.
    page.get_by_role("button", name="Remove picture 1: cut.png").click()
    expect(error).to_be_hidden()
    page.locator("#send").click()
    wait_done(page)
    expect(page.locator(".message.user .message-body")).to_have_text(["What is this?"])


def test_a_text_only_model_refusal_names_the_model_inline(
    page: Page, text_only_gateway: RunningGateway
) -> None:
    open_page(page, text_only_gateway.url)
    page.locator("#file-input").set_input_files([payload("red.png", RED_PNG, "image/png")])
    page.locator("#input").fill("What colour is this?")
    page.locator("#send").click()
    error = page.locator("#composer-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("dsv2-test")
    expect(error).to_contain_text("does not accept images")
    expect(error).not_to_contain_text("Picture 1")  # about the model, not this picture
    expect(page.locator("#input")).to_have_value("What colour is this?")
    expect(page.locator("#attachments img")).to_have_count(1)
    expect(page.locator(".message")).to_have_count(0)
    assert text_only_gateway.backend.requests == []


def test_pictures_fit_at_phone_width(browser, gateway: RunningGateway, tmp_path: Path) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    try:
        open_page(page, gateway.url)
        wide = plain((1600, 400), "purple")
        page.locator("#file-input").set_input_files(
            [payload(f"a-very-long-file-name-{i}.png", wide, "image/png") for i in range(4)]
        )
        expect(page.locator("#attachments img")).to_have_count(4)
        page.locator("#input").fill("Four wide pictures on a phone")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(tmp_path / "phone-attached.png"))
        page.locator("#send").click()
        wait_done(page)
        wait_pictures_decoded(page, ".message.user img")
        boxes = page.locator(".message.user img").evaluate_all(
            "(imgs) => imgs.map((img) => img.getBoundingClientRect().right)"
        )
        assert len(boxes) == 4 and max(boxes) <= 390
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(tmp_path / "phone-sent.png"))
    finally:
        context.close()


@pytest.fixture(scope="module")
def small_sessions_gateway(redis_server, tmp_path_factory) -> Iterator[RunningGateway]:
    # Room for the blue picture but not for the green one besides it.
    tier = {**ROOMY, "max_session_image_bytes": len(BLUE_JPEG) + len(GREEN_WEBP) - 1}
    folder = tmp_path_factory.mktemp("page-small-sessions")
    with running_gateway(redis_server.url, folder, "small-sessions", {"free": tier}) as gateway:
        yield gateway


def test_a_chat_full_of_pictures_says_so_and_keeps_the_message(
    page: Page, small_sessions_gateway: RunningGateway
) -> None:
    gateway = small_sessions_gateway
    open_page(page, gateway.url)
    page.locator("#file-input").set_input_files([payload("blue.jpg", BLUE_JPEG, "image/jpeg")])
    page.locator("#input").fill("first")
    page.locator("#send").click()
    wait_done(page)

    page.locator("#file-input").set_input_files([payload("green.webp", GREEN_WEBP, "image/webp")])
    page.locator("#input").fill("second")
    page.locator("#send").click()
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("is full of pictures")
    expect(notice).to_contain_text("Start a new session")
    expect(notice).to_contain_text("Your message is still in the box.")
    expect(page.locator("#input")).to_have_value("second")
    expect(page.locator("#attachments img")).to_have_count(1)
    expect(page.locator(".message.user")).to_have_count(1)
    assert len(gateway.backend.requests) == 1  # refused once, not retried as a busy chat

    # A new chat takes the same message.
    page.locator("#new-chat").click()
    page.locator("#send").click()
    wait_done(page)
    expect(page.locator(".message.user .message-body")).to_have_text(["second"])
    assert gateway.backend.images()[-1] == [[("image/webp", GREEN_WEBP)]]
