"""The demo model's tokenizer: byte-level BPE trained on the demo corpus with the `tokenizers`
library, in the shape of DeepSeek-V2's (digits split one by one, byte-level fallback so any text
round-trips, `<｜begin▁of▁sentence｜>` / `<｜end▁of▁sentence｜>` specials) and the DeepSeek-V2-Chat
chat template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import jinja2
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from model.tokenizer import DEEPSEEK_V2_CHAT_TEMPLATE
from services.demo import corpus
from services.demo.arithmetic import MulFormat

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2

# DeepSeek-V2-Chat's format (bos, an optional system text, "User: ...\n\n", "Assistant: ...<eos>",
# a generation prompt ending in "Assistant:"): the template the model package serves with.
CHAT_TEMPLATE = DEEPSEEK_V2_CHAT_TEMPLATE

VOCAB_SIZE = 1024


def _texts(seed: int, conversations: int, mul_format: MulFormat) -> Iterator[str]:
    """Everything the model will read: the training stream plus every fixed phrase, so each
    word and Chinese character of the corpus gets its own token."""
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    for messages in islice(corpus.conversations(seed, mul_format), conversations):
        yield template.render(messages=messages, bos_token="", eos_token="\n")
    for lang in ("en", "zh"):
        for users, reply in corpus.SMALL_TALK[lang]:
            yield from users
            yield reply
        for templates in corpus.WORD_PROBLEMS[lang].values():
            for question, closing in templates:
                yield question + closing
        for templates in corpus.QUESTIONS[lang].values():
            yield from templates
    yield from corpus.SYSTEM_PROMPTS


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = VOCAB_SIZE,
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Each Chinese character stands alone, so merges make whole characters, never
            # pieces spanning two of them.
            pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenizer_config(model_max_length: int, chat_template: str = CHAT_TEMPLATE) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,  # the chat template writes bos itself
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }


def write_tokenizer(
    out_dir: Path,
    *,
    seed: int,
    model_max_length: int,
    conversations: int = 20000,
    mul_format: MulFormat = "split",
) -> Tokenizer:
    """Train on the corpus of `seed` and write tokenizer.json + tokenizer_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(_texts(seed, conversations, mul_format))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(model_max_length)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return tokenizer


# ---- the VL2 demo model's tokenizer -----------------------------------------------------------
IMAGE_TOKEN = "<image>"
USER_TAG, ASSISTANT_TAG = "<|User|>", "<|Assistant|>"
# DeepSeek-VL2's added tokens: the image placeholder, the role tags, and the grounding tags
# (unused by the demo, kept so prompts written for VL2 tokenize the same way).
VL2_SPECIAL_TOKENS = (
    *SPECIAL_TOKENS,
    IMAGE_TOKEN,
    USER_TAG,
    ASSISTANT_TAG,
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
)
# DeepSeek-VL2's conversation format: <bos>{system}\n\n<|User|>: {u}\n\n<|Assistant|>: {a}<eos>
# and the generation prompt ends with "<|Assistant|>:" (no trailing space).
VL2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|User|>: ' + message['content'] | trim + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|Assistant|>: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|>:' }}{% endif %}"
)
VL2_VOCAB_SIZE = 1280


def _vl2_texts(seed: int, conversations: int) -> Iterator[str]:
    from services.demo import phrasing, vl2_corpus

    env = jinja2.Environment()
    template = env.from_string(VL2_CHAT_TEMPLATE)
    samples = vl2_corpus.stream(seed, vl2_corpus.Mix(picture_share=0.0, unknown_words=0.0))
    for sample in islice(samples, conversations):
        yield template.render(messages=sample.messages, bos_token="", eos_token="\n")
    for kinds in vl2_corpus.PICTURE_QUESTIONS.values():
        for questions in kinds.values():
            yield from questions
    for lang in ("en", "zh"):
        for users, reply in vl2_corpus.SMALL_TALK[lang]:
            yield from users
            yield reply
        for templates in corpus.WORD_PROBLEMS[lang].values():
            for question, closing in templates:
                yield question + closing
        yield from phrasing.GENERIC_FRAMES[lang]["train"]
        yield from phrasing.NUMBER_WORDS[lang]
    yield from corpus.SYSTEM_PROMPTS
    # picture replies' fixed words
    yield "There is 1 shape. There are 3 shapes. The number is 42. 图里有 3 个图形。图里的数字是 42。"


def write_vl2_tokenizer(
    out_dir: Path, *, seed: int, model_max_length: int, conversations: int = 20000
) -> Tokenizer:
    """The VL2 demo's tokenizer, trained on the training side of the VL2 corpus only (held-out
    phrasings fall back to smaller pieces, as they would for any unseen text)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(
        _vl2_texts(seed, conversations), VL2_VOCAB_SIZE, special_tokens=VL2_SPECIAL_TOKENS
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(model_max_length, VL2_CHAT_TEMPLATE)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return tokenizer
