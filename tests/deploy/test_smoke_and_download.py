"""`dsv2 k8s smoke` (the chart's helm test) against the real gateway, and the model download's
resume logic.

The gateway runs for real (HTTP + Redis) with the gateway tests' scripted model plane behind
it: the smoke check is about the gateway's HTTP flow (health, readiness, one chat completion),
and the real model plane needs a checkpoint and a Ray cluster that this check does not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import main as dsv2_main
from services.k8s import download
from services.k8s.smoke import SmokeError, smoke
from tests.gateway.conftest import TEST_TIERS, ThreadedGateway, gateway_settings
from tests.gateway.scripted_backend import ScriptedBackend


@pytest.fixture(scope="module")
def live_gateway(redis_server) -> Iterator[ThreadedGateway]:
    gateway = ThreadedGateway(gateway_settings(redis_server.url), ScriptedBackend(), TEST_TIERS)
    yield gateway
    gateway.stop()


def test_smoke_completes_one_chat_request(live_gateway: ThreadedGateway, capsys) -> None:
    live_gateway.backend.serving = True
    reply = smoke(live_gateway.http_url, max_tokens=4, timeout=20)
    assert reply.startswith("reply to")
    # It reached the model plane as one chat with the smoke check's limit.
    request = live_gateway.backend.requests[-1]
    assert request.sampling.max_tokens == 4
    assert request.messages.messages[-1].content == "Say hello in one word."
    # The command the helm test pod runs.
    assert dsv2_main(["k8s", "smoke", "--url", live_gateway.http_url, "--max-tokens", "4"]) == 0
    assert "ok: gateway healthy" in capsys.readouterr().out


def test_smoke_fails_when_the_model_plane_is_down(live_gateway: ThreadedGateway, capsys) -> None:
    live_gateway.backend.serving = False
    try:
        with pytest.raises(SmokeError, match=r"/readyz answered 503"):
            smoke(live_gateway.http_url, timeout=1)
        assert dsv2_main(["k8s", "smoke", "--url", live_gateway.http_url, "--timeout", "1"]) == 1
        assert "FAILED: gateway not ready in time" in capsys.readouterr().err
    finally:
        live_gateway.backend.serving = True


def test_smoke_fails_when_nothing_listens() -> None:
    from tests.support.redis_fixtures import free_port

    with pytest.raises(SmokeError, match="gateway unreachable"):
        smoke(f"http://127.0.0.1:{free_port()}", timeout=0.5)


def test_download_skips_a_finished_revision_without_network(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    # A pod restarting on a persistent volume: the marker says the revision is there, so the
    # Hub is not contacted (offline mode would make any call fail).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = tmp_path / "DeepSeek-V2-Lite-Chat"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    (dest / download.MARKER).write_text("deepseek-ai/DeepSeek-V2-Lite-Chat@main\n")
    args = [
        "--repo",
        "deepseek-ai/DeepSeek-V2-Lite-Chat",
        "--revision",
        "main",
        "--dest",
        str(dest),
    ]
    assert download.main(args) == 0
    assert "already holds" in capsys.readouterr().out
    # Another revision is not taken for this one.
    assert not download.is_complete(dest, "deepseek-ai/DeepSeek-V2-Lite-Chat", "v1.1")
