"""Held-out arithmetic accuracy of a chat backend.

The set is 200 questions (English and Chinese, bare and word problems) on operand pairs kept out
of training. Any backend that turns chat messages into a greedy assistant reply can be measured:
the model's full causal pass in-process (`CausalLMBackend`), the engine (`EngineBackend`), or
the gateway's OpenAI-compatible HTTP API (`OpenAIHTTPBackend`), so the same set checks every
layer of the stack.

    python -m services.demo.evaluate       # the shipped DeepSeek-VL2 demo (any VL2 checkpoint:
        # held-out phrasings, the issue's phrasings, held-out pictures, the arithmetic pictures)
    python -m services.demo.evaluate --backend engine    # this set through the serving engine
    python -m services.demo.evaluate --backend http --url http://127.0.0.1:8000
    python -m services.demo.evaluate --checkpoint /tmp/demo   # a text-only (--recipe text) model
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from services.demo.corpus import ArithmeticItem, Message, held_out_items

if TYPE_CHECKING:
    import torch

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoint"
# The longest worked answer (3 columns plus a word problem's closing sentence) is ~60 tokens.
MAX_NEW_TOKENS = 96

_INTEGER = re.compile(r"-?\d+")


class ChatBackend(Protocol):
    def replies(self, conversations: Sequence[list[Message]]) -> list[str]:
        """Greedy assistant reply to each conversation."""
        ...


def final_number(reply: str) -> int | None:
    """The reply's answer: its last integer (the worked answer ends with the result, a word
    problem's closing sentence repeats it)."""
    numbers = _INTEGER.findall(reply)
    return int(numbers[-1]) if numbers else None


@dataclass
class EvalReport:
    total: int
    correct: int
    failures: list[tuple[ArithmeticItem, str]] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        return f"held-out arithmetic: {self.correct}/{self.total} correct ({self.accuracy:.1%})"


def evaluate(backend: ChatBackend, items: Sequence[ArithmeticItem] | None = None) -> EvalReport:
    items = list(held_out_items() if items is None else items)
    replies = backend.replies([[{"role": "user", "content": item.question}] for item in items])
    report = EvalReport(total=len(items), correct=0, replies=replies)
    for item, reply in zip(items, replies, strict=True):
        if final_number(reply) == item.problem.answer:
            report.correct += 1
        else:
            report.failures.append((item, reply))
    return report


class CausalLMBackend:
    """Greedy decoding with the model's full causal pass and no KV cache: each step reruns
    the whole (short) sequence. Rows are right-padded, which a causal pass never sees, and
    leave the batch as soon as they end."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = MAX_NEW_TOKENS, batch_size=50):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def replies(self, conversations: Sequence[list[Message]]) -> list[str]:
        prompts = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
            for messages in conversations
        ]
        # Batch prompts of similar length together (less padding), answer in the given order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, ids in zip(batch, self.greedy([prompts[i] for i in batch]), strict=True):
                out[i] = self.tokenizer.decode(ids)
        return out

    def greedy(self, prompts: list[list[int]]) -> list[list[int]]:
        import torch

        eos = self.tokenizer.eos_token_id
        width = max(map(len, prompts)) + self.max_new_tokens
        tokens = torch.full((len(prompts), width), eos, dtype=torch.long)
        for row, ids in enumerate(prompts):
            tokens[row, : len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(ids) for ids in prompts])
        generated: list[list[int]] = [[] for _ in prompts]
        active = torch.arange(len(prompts))  # rows still generating
        with torch.inference_mode():
            for _ in range(self.max_new_tokens):
                rows, ends = tokens[active], lengths[active]
                logits = self._logits(rows[:, : int(ends.max())])  # [B, T, V]
                next_ids = logits[torch.arange(len(active)), ends - 1].argmax(-1)  # [B]
                keep = []
                for i, (row, token) in enumerate(
                    zip(active.tolist(), next_ids.tolist(), strict=True)
                ):
                    if token == eos:
                        continue
                    generated[row].append(token)
                    tokens[row, lengths[row]] = token
                    lengths[row] += 1
                    keep.append(i)
                if not keep:
                    break
                active = active[keep]
        return generated

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids)
        return out[0] if isinstance(out, tuple) else out


class EngineBackend:
    """The serving engine (paged cache, continuous batching), greedy."""

    def __init__(self, engine, tokenizer, *, max_new_tokens: int = MAX_NEW_TOKENS):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    def replies(self, conversations: Sequence[list[Message]]) -> list[str]:
        from services.engine import SamplingParams

        prompts = [self.tokenizer.apply_chat_template(messages) for messages in conversations]
        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)
        return [output.text for output in self.engine.generate(prompts, params)]


class OpenAIHTTPBackend:
    """The gateway's `POST /v1/chat/completions`, temperature 0, a few requests at a time."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str = "dsv2",
        max_new_tokens: int = MAX_NEW_TOKENS,
        concurrency: int = 8,
        timeout_s: float = 120.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        self.timeout_s = timeout_s

    def replies(self, conversations: Sequence[list[Message]]) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout_s) as c:

            def ask(messages: list[Message]) -> str:
                response = c.post(
                    "/v1/chat/completions",
                    json={
                        "model": self.model,
                        "messages": messages,
                        "temperature": 0,
                        "max_tokens": self.max_new_tokens,
                    },
                )
                response.raise_for_status()
                return response.json()["choices"][0]["message"]["content"]

            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(ask, conversations))


class VL2Backend:
    """Greedy decoding of a DeepSeek-VL2 checkpoint with the model's full causal pass (no KV
    cache), pictures spliced in as the engine does: each `<image>` in the user text becomes the
    image's rows from `embed_images`. Prompts are in DeepSeek-VL2's conversation format."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = MAX_NEW_TOKENS, batch_size=50):
        from services.demo.vl2_trainer import VL2ChatEncoder

        self.model = model
        self.encoder = VL2ChatEncoder(tokenizer)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def replies(
        self, conversations: Sequence[list[Message]], images: Sequence[list] | None = None
    ) -> list[str]:
        from model.image_processing import process_image

        pre = self.model.vl2_config.preprocess
        images = images or [[] for _ in conversations]
        processed = [
            [process_image(im, pre, cropping=len(ims) <= 2) for im in ims] for ims in images
        ]
        prompts = [
            self.encoder.prompt(messages, [p.num_tokens for p in ps])
            for messages, ps in zip(conversations, processed, strict=True)
        ]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            generated = self.greedy(
                [prompts[i] for i in batch], [im for i in batch for im in processed[i]]
            )
            for i, ids in zip(batch, generated, strict=True):
                out[i] = self.tokenizer.decode(ids)
        return out

    def greedy(self, prompts: list[list[int]], images: list) -> list[list[int]]:
        import torch

        from services.demo.vl2_trainer import input_embeddings

        device = self.model.image_newline.device
        eos = self.encoder.eos
        width = max(map(len, prompts)) + self.max_new_tokens
        tokens = torch.full((len(prompts), width), eos, dtype=torch.long, device=device)
        for row, ids in enumerate(prompts):
            tokens[row, : len(ids)] = torch.tensor(ids, device=device)
        lengths = [len(ids) for ids in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        with torch.inference_mode():
            for _ in range(self.max_new_tokens):
                end = max(lengths)
                embeds = input_embeddings(self.model, tokens[:, :end], images)
                logits = self.model(inputs_embeds=embeds)  # [B, T, V]
                last = torch.tensor([n - 1 for n in lengths], device=device)
                next_ids = logits[torch.arange(len(prompts), device=device), last].argmax(-1)
                for row, token in enumerate(next_ids.tolist()):
                    if done[row]:
                        continue
                    if token == eos:
                        done[row] = True
                        continue
                    generated[row].append(token)
                    tokens[row, lengths[row]] = token
                    lengths[row] += 1
                if all(done):
                    break
        return generated


@dataclass
class PictureReport:
    kind: str
    total: int
    correct: int
    restated: int  # replies that restate what the picture shows first (the problems' reading)
    failures: list[tuple[object, str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        line = f"held-out pictures ({self.kind}): {self.correct}/{self.total} ({self.accuracy:.1%})"
        if self.kind == "problem":
            line += f", read correctly {self.restated}/{self.total}"
        return line


def evaluate_pictures(backend: VL2Backend, items: Sequence) -> PictureReport:
    """Each item (vl2_corpus.PictureItem) asked alone; right when the reply's last number is
    the answer."""
    conversations = [[{"role": "user", "content": item.question}] for item in items]
    replies = backend.replies(conversations, [[item.image] for item in items])
    report = PictureReport(items[0].kind if items else "", len(items), 0, 0)
    for item, reply in zip(items, replies, strict=True):
        if reply.strip().startswith(item.text):
            report.restated += 1
        if final_number(reply) == item.answer:
            report.correct += 1
        else:
            report.failures.append((item, reply))
    return report


def load_vl2_backend(checkpoint: Path, device: str = "cpu") -> VL2Backend:
    import torch
    from tokenizers import Tokenizer as HFTokenizer

    from model import load_pretrained

    model = load_pretrained(checkpoint, dtype=torch.float32, device=device).eval()
    return VL2Backend(model, HFTokenizer.from_file(str(Path(checkpoint) / "tokenizer.json")))


def evaluate_vl2(backend: VL2Backend, *, pictures: int = 100, text: int = 200) -> list[str]:
    """The VL2 demo's must-show: held-out text phrasings, the issue's phrasings, held-out
    pictures (counts, numbers) and the arithmetic-picture stretch. Returns summary lines."""
    from services.demo import vl2_corpus

    lines = []
    report = evaluate(backend, vl2_corpus.held_out_text_items(text))
    lines.append(f"held-out phrasings: {report.correct}/{report.total} ({report.accuracy:.1%})")
    issue = evaluate(backend, vl2_corpus.issue_text_items())
    lines.append(f"issue 16 phrasings: {issue.correct}/{issue.total} ({issue.accuracy:.1%})")
    for kind, count in (("count", pictures), ("number", pictures), ("problem", pictures // 2)):
        items = vl2_corpus.held_out_picture_items(kind, count)
        lines.append(evaluate_pictures(backend, items).summary())
    return lines


def _is_vl2(checkpoint: Path) -> bool:
    import json

    config = Path(checkpoint) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == (
        "deepseek_vl_v2"
    )


def load_causal_backend(checkpoint: Path = DEFAULT_CHECKPOINT) -> CausalLMBackend:
    import torch

    from model import load_pretrained
    from model.tokenizer import Tokenizer

    model = load_pretrained(checkpoint, dtype=torch.float32).eval()
    return CausalLMBackend(model, Tokenizer.from_pretrained(checkpoint))


def _build_backend(args: argparse.Namespace) -> ChatBackend:
    if args.backend == "http":
        return OpenAIHTTPBackend(args.url, api_key=args.api_key, model=args.model)
    if args.backend == "engine":
        from model.tokenizer import Tokenizer
        from services.engine import Engine

        return EngineBackend(
            Engine.from_pretrained(args.checkpoint), Tokenizer.from_pretrained(args.checkpoint)
        )
    return load_causal_backend(args.checkpoint)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("causal", "engine", "http"), default="causal")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default="dsv2", help="model name sent to the HTTP API")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (small batches: 1 is fastest)"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--show-failures", action="store_true")
    args = parser.parse_args(argv)
    if args.backend != "http":
        import torch

        torch.set_num_threads(args.threads)
    if args.backend == "causal" and _is_vl2(args.checkpoint):
        lines = evaluate_vl2(load_vl2_backend(args.checkpoint))
        print("\n".join(lines))
        return 0
    report = evaluate(_build_backend(args), held_out_items()[: args.limit])
    print(report.summary())
    if args.show_failures:
        for item, reply in report.failures:
            print(f"  {item.question!r} -> {reply!r} (expected {item.problem.answer})")
    return 0 if report.accuracy >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
