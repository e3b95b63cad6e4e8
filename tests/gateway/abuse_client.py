"""An unfriendly client for tests/gateway/test_abuse.py, run as a process of its own (as an
abuser on another machine would be): loops on the largest request the input caps allow, over
HTTP without a key (anonymous) or over gRPC with a free-tier key (gRPC has no anonymous
access), until killed or for --seconds, then prints what it got as one JSON line."""

from __future__ import annotations

import argparse
import collections
import json
import time

import grpc
import httpx

from services.gateway.settings import Settings
from services.rpc.dsv2.v1 import chat_pb2 as cpb
from services.rpc.dsv2.v1 import chat_pb2_grpc


def maximal_contents() -> list[str]:
    """Messages exactly at the default caps: each at max_message_bytes, max_request_bytes in
    all."""
    limits = Settings().limits
    n = limits.max_request_bytes // limits.max_message_bytes
    return ["1 " * (limits.max_message_bytes // 2)] * n


def run_http(url: str, model: str, seconds: float) -> collections.Counter:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": c} for c in maximal_contents()]}
    ).encode()
    seen: collections.Counter = collections.Counter()
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as c:  # keeps its cookie: one identity
        while time.monotonic() < deadline:
            r = c.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            seen[str(r.status_code)] += 1
    return seen


def run_grpc(target: str, key: str, seconds: float) -> collections.Counter:
    req = cpb.ChatRequest(
        messages=[cpb.Message(role="user", content=c) for c in maximal_contents()]
    )
    md = (("authorization", f"Bearer {key}"),)
    seen: collections.Counter = collections.Counter()
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(target) as ch:
        stub = chat_pb2_grpc.ChatStub(ch)
        while time.monotonic() < deadline:
            try:
                for _ in stub.Chat(req, metadata=md, timeout=30):
                    pass
                seen["OK"] += 1
            except grpc.RpcError as e:
                seen[e.code().name] += 1
    return seen


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--http")
    p.add_argument("--model", default="")
    p.add_argument("--grpc")
    p.add_argument("--key", default="")
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args()
    if a.http:
        seen = run_http(a.http, a.model, a.seconds)
    else:
        seen = run_grpc(a.grpc, a.key, a.seconds)
    print(json.dumps(dict(seen)), flush=True)


if __name__ == "__main__":
    main()
