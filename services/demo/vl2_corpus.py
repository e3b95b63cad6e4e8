"""The VL2 demo corpus: arithmetic asked in many phrasings, small talk, and questions about
pictures (how many shapes, which number, a whole sum), with held-out evaluation sets.

Training draws from the training side of every split (operand pairs, phrasing frames, fonts,
colours, layouts, sizes); the held-out sets draw only from the other side. A user message with
a picture is `<image>\\n{question}`, as DeepSeek-VL2's README places images.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from services.demo import phrasing, pictures
from services.demo.arithmetic import (
    OPS,
    Op,
    Problem,
    restated_answer,
    sample_small_problem,
    sample_split,
    sample_wide_problem,
)
from services.demo.corpus import SYSTEM_PROMPTS, WORD_PROBLEMS

Lang = Literal["en", "zh"]
Split = Literal["train", "held_out"]
Message = dict[str, str]
IMAGE = "<image>"

IDENTITY: dict[Lang, str] = {
    "en": (
        "I am a small demo model with the DeepSeek-VL2 architecture. I do arithmetic in "
        "English and Chinese, count shapes in a picture and read the number in a picture."
    ),
    "zh": "我是一个 DeepSeek-VL2 架构的小型演示模型，会用中文和英文做算术，还会数图里的图形、认图里的数字。",
}
CAN_DO: dict[Lang, str] = {
    "en": (
        "I can add and subtract numbers up to 9999, multiply a number up to 99 by a "
        "1-digit number, count the shapes in a picture and read a number from 0 to 99 in a "
        "picture. Try: What is 48 × 7?"
    ),
    "zh": (
        "我会做 9999 以内的加法和减法、两位数乘一位数，还会数图里的图形、认出图里 0 到 99 "
        "的数字。试试：48 × 7 等于多少？"
    ),
}

SMALL_TALK: dict[Lang, tuple[tuple[tuple[str, ...], str], ...]] = {
    "en": (
        (
            ("Hello", "Hello!", "Hi", "Hi!", "Hi there", "Hey", "Good morning", "hello"),
            "Hello! Ask me an arithmetic question, like 25 + 17, or send me a picture.",
        ),
        (("Who are you?", "What are you?", "Introduce yourself.", "who are you"), IDENTITY["en"]),
        (("What can you do?", "How can you help me?", "What do you know?"), CAN_DO["en"]),
        (("Thank you!", "Thanks", "Thank you", "thanks!"), "You are welcome!"),
        (("Goodbye", "Bye", "See you", "bye!"), "Goodbye!"),
        (("How are you?", "How are you doing?"), "I am fine, thank you! Ready for some math."),
    ),
    "zh": (
        (
            ("你好", "你好！", "您好", "嗨", "早上好", "哈喽"),
            "你好！可以问我算术题，比如 25 + 17，也可以发图片给我。",
        ),
        (("你是谁？", "你是什么？", "介绍一下你自己", "你是谁"), IDENTITY["zh"]),
        (("你能做什么？", "你会什么？", "你能帮我做什么？"), CAN_DO["zh"]),
        (("谢谢", "谢谢你！", "多谢"), "不客气！"),
        (("再见", "拜拜", "再见！"), "再见！"),
        (("你好吗？", "最近怎么样？"), "我很好，谢谢！我们来做算术吧。"),
    ),
}

# Questions about a picture, by kind. The first of each is the issue's wording (the held-out
# evaluation asks in exactly those words).
PICTURE_QUESTIONS: dict[str, dict[Lang, tuple[str, ...]]] = {
    "count": {
        "en": (
            "How many shapes are in this picture?",
            "How many shapes are there?",
            "Count the shapes in this picture.",
            "How many shapes can you see?",
        ),
        "zh": ("图里有几个图形？", "这张图里有多少个图形？", "数一数图里的图形。"),
    },
    "number": {
        "en": (
            "What number is in this picture?",
            "What number is this?",
            "Which number does the picture show?",
            "Read the number in this picture.",
        ),
        "zh": ("图里是什么数字？", "这张图里的数字是多少？", "图中写的是几？"),
    },
    "problem": {
        "en": (
            "Solve the problem in this picture.",
            "What is the answer to the problem in the picture?",
        ),
        "zh": ("算出图里的题。", "图里的算式等于多少？"),
    },
}


def picture_reply(kind: str, answer_text: str, lang: Lang, problem: Problem | None = None) -> str:
    if kind == "count":
        n = int(answer_text)
        if lang == "zh":
            return f"图里有 {n} 个图形。"
        return "There is 1 shape." if n == 1 else f"There are {n} shapes."
    if kind == "number":
        return f"The number is {answer_text}." if lang == "en" else f"图里的数字是 {answer_text}。"
    assert problem is not None
    return restated_answer(problem, lang)


# ---- text ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextItem:
    problem: Problem
    lang: Lang
    question: str
    reply: str


def arithmetic_text(
    rng: random.Random, split: Split, *, held_out_pairs: bool, unknown_share: float = 0.0
) -> TextItem:
    """One arithmetic question: a fifth with both operands 0-10 (often as words), the rest on
    the wide ranges; some word problems (training only: their templates are fixed).
    `unknown_share`: phrasing.filler_question's share of unknown filler words."""
    op: Op = rng.choice(OPS)
    small = rng.random() < 0.25
    sampler = sample_small_problem if small else sample_wide_problem
    problem = sample_split(sampler, rng, op, held_out=held_out_pairs)
    lang: Lang = rng.choice(("en", "zh"))
    reply = restated_answer(problem, lang)
    if split == "train" and rng.random() < 0.12:
        if op == "mul" and problem.a < problem.b:
            problem = Problem("mul", problem.b, problem.a)  # "a boxes of b"
            reply = restated_answer(problem, lang)
        question, closing = rng.choice(WORD_PROBLEMS[lang][op])
        values = {"a": problem.a, "b": problem.b, "c": problem.answer}
        sep = " " if lang == "en" else ""
        return TextItem(
            problem, lang, question.format(**values), reply + sep + closing.format(**values)
        )
    question = phrasing.question_text(
        rng, problem, lang, split, words=small, unknown_share=unknown_share
    )
    return TextItem(problem, lang, question.text, reply)


def text_turn(rng: random.Random, unknown_share: float = 0.0) -> tuple[str, str]:
    if rng.random() < 0.1:
        lang: Lang = rng.choice(("en", "zh"))
        users, reply = rng.choice(SMALL_TALK[lang])
        return rng.choice(users), reply
    item = arithmetic_text(rng, "train", held_out_pairs=False, unknown_share=unknown_share)
    return item.question, item.reply


# ---- pictures -----------------------------------------------------------------------------


@dataclass
class PictureItem:
    image: Image.Image
    kind: Literal["count", "number", "problem"]
    lang: Lang
    question: str  # with the "<image>\n" placeholder
    reply: str
    answer: int
    text: str  # what the picture shows, as the reply restates it ("42", "12 + 7", "3")
    ink: pictures.Ink  # where it shows it (the pictures stage's per-token reading targets)


def picture_item(
    rng: random.Random,
    kind: str,
    split: Split,
    *,
    max_number: int = pictures.MAX_NUMBER,
    lang: Lang | None = None,
    question: str | None = None,
) -> PictureItem:
    lang = lang or rng.choice(("en", "zh"))
    problem = None
    if kind == "count":
        n = rng.randint(1, pictures.MAX_SHAPES)
        (image, ink), text, answer = pictures.shapes_picture_with_ink(rng, n, split), str(n), n
    elif kind == "number":
        n = rng.randint(0, max_number)
        (image, ink), text, answer = pictures.number_picture_with_ink(rng, n, split), str(n), n
    else:
        op: Op = rng.choice(("add", "sub"))
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        problem = Problem(op, *((b, a) if op == "sub" and a < b else (a, b)))
        text, answer = problem.expression, problem.answer
        image, ink = pictures.text_picture_with_ink(rng, text, split)
    question = question or rng.choice(PICTURE_QUESTIONS[kind][lang])
    reply = picture_reply(kind, text, lang, problem)
    return PictureItem(image, kind, lang, f"{IMAGE}\n{question}", reply, answer, text, ink)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Mix:
    """What a training stage draws: the share of picture turns, by kind, and the largest
    number drawn (the reading curriculum starts with single glyphs)."""

    picture_share: float = 0.0
    count: float = 0.4
    number: float = 0.5
    problem: float = 0.1
    max_number: int = pictures.MAX_NUMBER
    easy_share: float = 0.0  # pictures drawn dark on white, large and centred (curriculum)
    # of filler frames' words, the share no training text has (phrasing.unknown_word); the
    # tokenizer's texts are drawn with 0, so those words stay byte pieces
    unknown_words: float = phrasing.UNKNOWN_SHARE


@dataclass
class Sample:
    messages: list[Message]
    images: list[Image.Image]
    inks: list[pictures.Ink] = field(default_factory=list)  # one per image


def sample(rng: random.Random, mix: Mix) -> Sample:
    if rng.random() < mix.picture_share:
        kind = rng.choices(
            ("count", "number", "problem"), weights=(mix.count, mix.number, mix.problem)
        )[0]
        item = picture_item(rng, kind, "train", max_number=mix.max_number)
        messages = [
            {"role": "user", "content": item.question},
            {"role": "assistant", "content": item.reply},
        ]
        return Sample(messages, [item.image], [item.ink])
    messages = []
    if rng.random() < 0.08:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < 0.1 else 1):
        user, reply = text_turn(rng, mix.unknown_words)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return Sample(messages, [])


def stream(seed: int, mix: Mix) -> Iterator[Sample]:
    rng = random.Random(seed)
    while True:
        yield sample(rng, mix)


# ---- held-out sets --------------------------------------------------------------------------


def held_out_text_items(count: int = 200, seed: int = 4321) -> list[TextItem]:
    """Questions in held-out frames on held-out operand pairs, both languages, all three
    operations, a quarter with small operands (often written as words)."""
    rng = random.Random(seed)
    items: list[TextItem] = []
    seen: set[str] = set()
    while len(items) < count:
        item = arithmetic_text(rng, "held_out", held_out_pairs=True)
        if item.question not in seen:
            seen.add(item.question)
            items.append(item)
    return items


def issue_text_items() -> list[TextItem]:
    """The phrasings issue 16 reported the old demo model failing, verbatim in form:
    `{a}乘以{b}等于多少？` without spaces (10), `What is 7 times 8?`, `What is 1234 + 5678?`,
    `三加五等于几？`."""
    rng = random.Random(16)
    items = []
    for _ in range(10):
        a, b = rng.randint(2, 9), rng.randint(10, 99)
        if rng.random() < 0.5:
            a, b = b, a
        p = Problem("mul", a, b)
        items.append(TextItem(p, "zh", f"{a}乘以{b}等于多少？", restated_answer(p, "zh")))
    for p, lang, q in (
        (Problem("mul", 7, 8), "en", "What is 7 times 8?"),
        (Problem("add", 1234, 5678), "en", "What is 1234 + 5678?"),
        (Problem("add", 3, 5), "zh", "三加五等于几？"),
    ):
        items.append(TextItem(p, lang, q, restated_answer(p, lang)))  # type: ignore[arg-type]
    return items


def held_out_picture_items(
    kind: str, count: int = 100, seed: int = 777, split: Split = "held_out"
) -> list[PictureItem]:
    """Pictures with held-out fonts, colours, layouts and sizes, asked in the issue's words
    (English and Chinese alternately)."""
    rng = random.Random(f"{seed}:{kind}")
    items = []
    for i in range(count):
        lang: Lang = ("en", "zh")[i % 2]
        question = PICTURE_QUESTIONS[kind][lang][0]
        items.append(picture_item(rng, kind, split, lang=lang, question=question))
    return items
