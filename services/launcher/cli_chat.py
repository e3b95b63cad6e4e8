"""`dsv2 chat`: a terminal client of the gateway's sessions API (the same calls as the page).

Each run opens a new session (or continues --session ID) and streams replies as they come.
Without --api-key it is an anonymous free-tier user identified by the gateway's cookie.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--api-key", default=os.environ.get("DSV2_API_KEY"), help="Bearer key")
    parser.add_argument("--session", help="continue this session id")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("message", nargs="*", help="send one message and exit")


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text or response.reason_phrase


def _send(client: httpx.Client, session_id: str, text: str, args: argparse.Namespace) -> bool:
    body = {"content": text, "max_tokens": args.max_tokens, "temperature": args.temperature}
    with client.stream("POST", f"/v1/sessions/{session_id}/messages", json=body) as response:
        if response.status_code != 200:
            response.read()
            wait = response.headers.get("retry-after")
            hint = f" (retry in {wait}s)" if wait else ""
            print(f"error {response.status_code}: {_error_text(response)}{hint}", file=sys.stderr)
            return False
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event.get("type") == "delta":
                print(event.get("text", ""), end="", flush=True)
            elif event.get("type") == "done":
                print()
                if event.get("finish_reason") == "error":
                    print(f"error: {event.get('error', 'generation failed')}", file=sys.stderr)
                    return False
    return True


def run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=120) as client:
        try:
            session_id = args.session
            if session_id is None:
                created = client.post("/v1/sessions", json={})
                if created.status_code != 201:
                    print(f"error {created.status_code}: {_error_text(created)}", file=sys.stderr)
                    return 1
                session_id = created.json()["id"]
            if args.message:
                return 0 if _send(client, session_id, " ".join(args.message), args) else 1
            print(f"session {session_id}; empty line or Ctrl-D to quit")
            while True:
                try:
                    text = input("you> ").strip()
                except EOFError:
                    break
                if not text:
                    break
                print("bot> ", end="", flush=True)
                _send(client, session_id, text, args)
        except httpx.HTTPError as exc:
            print(f"error: cannot reach the gateway at {args.url}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print()
    return 0
