"""`make serve` from the repository root: the whole chatbot on this machine (embedded Redis,
a local Ray with the Engine and 2 expert shards over gRPC, the gateway), asked through its HTTP
API, then stopped with Ctrl-C (SIGINT to the process group, as a terminal sends it).

Also the demo model's must-shows: a picture sent with the `openai` client gets the right
answer, and arithmetic asked in held-out phrasings through the full distributed stack scores
>= 95% and gives the same answers as the in-process engine.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from services.demo import vl2_corpus
from services.demo.evaluate import (
    DEFAULT_CHECKPOINT,
    EngineBackend,
    OpenAIHTTPBackend,
    evaluate,
    final_number,
)
from services.serving.local import free_port
from tests.page.pictures import number, shapes

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 90


@dataclass
class RunningStack:
    process: subprocess.Popen[str]
    base_url: str
    output: list[str] = field(default_factory=list)
    descendants: dict[int, str] = field(default_factory=dict)

    def remember_descendants(self) -> None:
        """Every process `make serve` started (Redis, Ray's raylet/GCS/workers, ...)."""
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                try:
                    self.descendants[child.pid] = " ".join(child.cmdline())[:120]
                except psutil.Error:
                    pass
        except psutil.NoSuchProcess:
            pass

    def ctrl_c(self) -> int:
        self.remember_descendants()
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=STOP_TIMEOUT_S)


def _pump(stream, sink: list[str], ready: threading.Event) -> None:
    for line in stream:
        sink.append(line)
        if "Press Ctrl-C" in line:
            ready.set()


# A port free_port() found free can be taken by another process before `make serve` binds it
# (gRPC then fails with "Failed to bind to address"): such a start is retried on new ports.
BIND_FAILURES = ("Failed to bind to address", "Address already in use")
START_ATTEMPTS = 3


def _start_stack(state_dir: Path) -> tuple[RunningStack, bool]:
    """`make serve` on fresh ports; returns the stack and whether it came up (False: it exited
    or did not come up within START_TIMEOUT_S)."""
    port = free_port()
    serve_args = (
        f"--port {port} --grpc-port {free_port()} --model-grpc-port {free_port()} "
        f"--state-dir {state_dir}"
    )
    process = subprocess.Popen(
        ["make", "--no-print-directory", "serve", f"SERVE_ARGS={serve_args}"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    running = RunningStack(process, f"http://127.0.0.1:{port}")
    ready = threading.Event()
    pump = threading.Thread(target=_pump, args=(process.stdout, running.output, ready), daemon=True)
    pump.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.wait(1):
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                running.ctrl_c()
            pump.join(10)  # the rest of its output, for the failure message
            return running, False
    return running, True


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    for attempt in range(1, START_ATTEMPTS + 1):
        running, up = _start_stack(tmp_path_factory.mktemp("dsv2-state"))
        if up:
            break
        output = "".join(running.output)
        if attempt == START_ATTEMPTS or not any(m in output for m in BIND_FAILURES):
            pytest.fail("make serve did not come up:\n" + "".join(running.output[-40:]))
    try:
        running.remember_descendants()
        yield running
    finally:
        if running.process.poll() is None:  # a failed test: still stop everything
            running.ctrl_c()


def _internal_api_key(stack: RunningStack) -> str:
    """A key of the `internal` tier, made with `dsv2 keys create` against the stack's embedded
    Redis: the anonymous free tier allows 10 requests a minute, the evaluation needs 200."""
    redis_url = next(line.split()[-1] for line in stack.output if line.startswith("Redis:"))
    created = subprocess.run(
        [sys.executable, "-m", "services.cli", "keys", "--redis-url", redis_url, "create",
         "--user", "e2e-eval", "--tier", "internal"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )  # fmt: skip
    return created.stdout.strip()


def _model_id(base_url: str) -> str:
    return httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def test_make_serve_answers_a_chat_request(stack: RunningStack) -> None:
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={
            "model": _model_id(stack.base_url),
            "messages": [{"role": "user", "content": "What is 12 + 34?"}],
            "temperature": 0,
            "max_tokens": 96,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert final_number(body["choices"][0]["message"]["content"]) == 46, body
    assert body["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("picture", "question", "answer"),
    [
        pytest.param(shapes(3), "How many shapes are in this picture?", 3, id="shapes"),
        pytest.param(number(47), "What number is in this picture?", 47, id="number"),
        pytest.param(shapes(2), "图里有几个图形？", 2, id="shapes-zh"),
    ],
)
def test_openai_client_with_a_picture_gets_the_right_answer(
    stack: RunningStack, picture: bytes, question: str, answer: int
) -> None:
    """Issue 16's must-show: the `openai` package, an image_url content part with a data
    URL, the demo model's answer through the whole distributed stack."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=_internal_api_key(stack))
    data_url = "data:image/png;base64," + base64.b64encode(picture).decode()
    completion = client.chat.completions.create(
        model=_model_id(stack.base_url),
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        temperature=0,
        max_tokens=32,
    )
    reply = completion.choices[0].message.content
    assert final_number(reply) == answer, reply
    assert completion.usage.prompt_tokens > 41  # the picture's tokens are counted


def test_page_is_served(stack: RunningStack) -> None:
    response = httpx.get(f"{stack.base_url}/", timeout=10)
    assert response.status_code == 200
    assert "content-security-policy" in response.headers


def test_demo_model_through_distributed_stack_matches_in_process_engine(
    stack: RunningStack,
) -> None:
    import torch

    from model.tokenizer import Tokenizer
    from services.engine import Engine

    http = OpenAIHTTPBackend(
        stack.base_url,
        api_key=_internal_api_key(stack),
        model=_model_id(stack.base_url),
        concurrency=16,
    )
    # the VL2 demo's text must-show: questions in phrasings no training template had
    items = vl2_corpus.held_out_text_items(200)
    distributed = evaluate(http, items)
    print(distributed.summary(), "(distributed stack over HTTP)", file=sys.stderr)
    assert distributed.total == 200
    assert distributed.accuracy >= 0.95, distributed.failures[:10]

    torch.set_num_threads(1)
    local = evaluate(
        EngineBackend(
            Engine.from_pretrained(DEFAULT_CHECKPOINT),
            Tokenizer.from_pretrained(DEFAULT_CHECKPOINT),
        ),
        items,
    )
    print(local.summary(), "(in-process engine)", file=sys.stderr)
    distributed_answers = [final_number(r) for r in distributed.replies]
    local_answers = [final_number(r) for r in local.replies]
    assert distributed_answers == local_answers


def test_ctrl_c_stops_everything(stack: RunningStack) -> None:
    started = time.monotonic()
    # make itself dies of the SIGINT (as it does in a terminal); dsv2 underneath exits cleanly.
    assert stack.ctrl_c() in (0, -signal.SIGINT), "".join(stack.output[-30:])
    output = "".join(stack.output)
    assert "dsv2 stopped" in output
    assert "Traceback" not in output, output[-3000:]
    assert stack.descendants, "make serve started no processes?"
    deadline = time.monotonic() + 15
    alive = {pid: cmd for pid, cmd in stack.descendants.items() if psutil.pid_exists(pid)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = {
            pid: cmd
            for pid, cmd in alive.items()
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        }
    assert not alive, f"left behind after Ctrl-C: {alive}"
    assert time.monotonic() - started < STOP_TIMEOUT_S
