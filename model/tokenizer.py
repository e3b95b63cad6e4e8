"""Tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, chat template via jinja2.

Imports no torch, so the gateway and CLIs can tokenize and build prompts cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

# DeepSeek-V2-Chat's template: <bos>{system}\n\nUser: {u}\n\nAssistant: {a}<eos>User: ...
# and the generation prompt ends with "Assistant:" (no trailing space).
DEEPSEEK_V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The chat template refused the messages (e.g. an unsupported role order)."""


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


class Tokenizer:
    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None = None,
        add_bos_token: bool = True,
    ) -> None:
        self._tok = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template or DEEPSEEK_V2_CHAT_TEMPLATE
        # Same environment settings as transformers, so published templates render the same.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the checkpoint's chat_template does not parse: {e}") from e
        self.special_ids = frozenset(
            i for i in (self.bos_token_id, self.eos_token_id) if i is not None
        ) | frozenset(
            tokenizer.token_to_id(t.content)
            for t in tokenizer.get_added_tokens_decoder().values()
            if t.special
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config: dict[str, Any] = {}
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        return cls(
            _HFTokenizer.from_file(str(tokenizer_file)),
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            chat_template=config.get("chat_template"),
            add_bos_token=bool(config.get("add_bos_token", True)),
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token stands for: the longest vocabulary
        entry in its stored form. Stored forms only over-count (a byte-level entry spends 1-2
        UTF-8 bytes per byte it stands for, "<0x41>" six for one), so prompt bytes divided by
        this is a sound lower bound on the prompt's tokens."""
        return max((len(t.encode("utf-8")) for t in self._tok.get_vocab(True)), default=0)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (e.g. the bos token a
        chat template emits) map to their ids. add_special_tokens: prepend bos."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` as one vocabulary entry (an added token such as "<image>"),
        None when the vocabulary has no such entry."""
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ChatTemplateError("each message needs a 'role' and a 'content'")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except (jinja2.TemplateError, TypeError) as e:
            raise ChatTemplateError(f"chat template failed on these messages: {e}") from e
