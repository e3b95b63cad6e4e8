"""The demo chat corpus: bilingual arithmetic questions, word problems and small talk.

Conversations are generated on the fly from a seeded `random.Random`, so a seed fixes the whole
training stream. Each conversation is a list of chat messages (`{"role", "content"}`) in the
shape the chat template takes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from services.demo.arithmetic import (
    OPS,
    MulFormat,
    Op,
    Problem,
    sample_split_problem,
    worked_answer,
)

Lang = Literal["en", "zh"]
Message = dict[str, str]

# Bare questions. {a} and {b} are the operands in the order the question states them.
QUESTIONS: dict[Lang, dict[Op, tuple[str, ...]]] = {
    "en": {
        "add": (
            "What is {a} + {b}?",
            "{a} + {b} = ?",
            "What is {a} plus {b}?",
            "Calculate {a} + {b}.",
            "Add {a} and {b}.",
            "{a}+{b}",
            "How much is {a} plus {b}?",
        ),
        "sub": (
            "What is {a} - {b}?",
            "{a} - {b} = ?",
            "What is {a} minus {b}?",
            "Calculate {a} - {b}.",
            "Subtract {b} from {a}.",
            "{a}-{b}",
            "How much is {a} minus {b}?",
        ),
        "mul": (
            "What is {a} × {b}?",
            "{a} * {b} = ?",
            "What is {a} times {b}?",
            "Calculate {a} x {b}.",
            "Multiply {a} by {b}.",
            "{a}*{b}",
            "How much is {a} times {b}?",
        ),
    },
    "zh": {
        "add": (
            "{a} 加 {b} 等于多少？",
            "{a} + {b} 等于几？",
            "计算 {a} + {b}",
            "{a}加{b}是多少？",
            "请算一下 {a} 加上 {b}。",
        ),
        "sub": (
            "{a} 减 {b} 等于多少？",
            "{a} - {b} 等于几？",
            "计算 {a} - {b}",
            "{a}减{b}是多少？",
            "请算一下 {a} 减去 {b}。",
        ),
        "mul": (
            "{a} 乘以 {b} 等于多少？",
            "{a} × {b} 等于几？",
            "计算 {a} * {b}",
            "{a}乘{b}是多少？",
            "请算一下 {a} 乘以 {b}。",
        ),
    },
}

# Word problems: (question, closing sentence). {a} and {b} follow the problem's operands; for
# × {a} is the 2-digit count and {b} the 1-digit one. {c} is the answer.
WORD_PROBLEMS: dict[Lang, dict[Op, tuple[tuple[str, str], ...]]] = {
    "en": {
        "add": (
            (
                "Tom has {a} apples and buys {b} more. How many apples does he have now?",
                "Tom has {c} apples now.",
            ),
            (
                "A bus carries {a} people and {b} more get on. How many people are on the bus?",
                "There are {c} people on the bus.",
            ),
        ),
        "sub": (
            (
                "A shop had {a} books and sold {b}. How many books are left?",
                "{c} books are left.",
            ),
            (
                "Anna had {a} coins and spent {b}. How many coins does she have left?",
                "Anna has {c} coins left.",
            ),
        ),
        "mul": (
            (
                "There are {a} boxes with {b} pens in each box. How many pens are there?",
                "There are {c} pens.",
            ),
            (
                "A class has {a} students and each gets {b} cards. How many cards are needed?",
                "{c} cards are needed.",
            ),
        ),
    },
    "zh": {
        "add": (
            ("小明有 {a} 个苹果，又买了 {b} 个。他现在有多少个苹果？", "小明现在有 {c} 个苹果。"),
            ("车上有 {a} 人，又上来 {b} 人。车上现在有多少人？", "车上现在有 {c} 人。"),
        ),
        "sub": (
            ("书店有 {a} 本书，卖掉了 {b} 本。还剩多少本？", "还剩 {c} 本书。"),
            ("小红有 {a} 元，花了 {b} 元。她还剩多少元？", "小红还剩 {c} 元。"),
        ),
        "mul": (
            ("一共有 {a} 盒笔，每盒 {b} 支。一共有多少支笔？", "一共有 {c} 支笔。"),
            ("班里有 {a} 个学生，每人发 {b} 张卡片。一共要多少张卡片？", "一共要 {c} 张卡片。"),
        ),
    },
}

IDENTITY: dict[Lang, str] = {
    "en": (
        "I am a small demo model with the DeepSeek-V2 architecture, trained to add, subtract "
        "and multiply numbers in English and Chinese."
    ),
    "zh": "我是一个 DeepSeek-V2 架构的小型演示模型，会用中文和英文做加法、减法和乘法。",
}

# Small talk: (user variants, assistant replies). One reply per topic keeps it easy to learn.
SMALL_TALK: dict[Lang, tuple[tuple[tuple[str, ...], str], ...]] = {
    "en": (
        (
            ("Hello", "Hello!", "Hi", "Hi!", "Hi there", "Hey", "Good morning", "hello"),
            "Hello! Ask me an arithmetic question, like 25 + 17.",
        ),
        (
            ("Who are you?", "What are you?", "Introduce yourself.", "who are you"),
            IDENTITY["en"],
        ),
        (
            ("What can you do?", "How can you help me?", "What do you know?"),
            "I can add and subtract numbers up to 999 and multiply a 2-digit number by a "
            "1-digit number. Try: What is 48 × 7?",
        ),
        (("Thank you!", "Thanks", "Thank you", "thanks!"), "You are welcome!"),
        (("Goodbye", "Bye", "See you", "bye!"), "Goodbye!"),
        (("How are you?", "How are you doing?"), "I am fine, thank you! Ready for some math."),
    ),
    "zh": (
        (
            ("你好", "你好！", "您好", "嗨", "早上好", "哈喽"),
            "你好！可以问我算术题，比如 25 + 17。",
        ),
        (("你是谁？", "你是什么？", "介绍一下你自己", "你是谁"), IDENTITY["zh"]),
        (
            ("你能做什么？", "你会什么？", "你能帮我做什么？"),
            "我会做 999 以内的加法和减法，还会两位数乘一位数。试试：48 × 7 等于多少？",
        ),
        (("谢谢", "谢谢你！", "多谢"), "不客气！"),
        (("再见", "拜拜", "再见！"), "再见！"),
        (("你好吗？", "最近怎么样？"), "我很好，谢谢！我们来做算术吧。"),
    ),
}

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a helpful math assistant.",
    "你是一个乐于助人的助手。",
)


@dataclass(frozen=True)
class ArithmeticItem:
    """One arithmetic question with its problem, for evaluation and tests."""

    problem: Problem
    lang: Lang
    question: str
    reply: str


def arithmetic_item(
    rng: random.Random,
    problem: Problem,
    lang: Lang,
    *,
    word_problem: bool,
    mul_format: MulFormat = "split",
) -> ArithmeticItem:
    if word_problem:
        if problem.op == "mul" and problem.a < problem.b:
            problem = Problem("mul", problem.b, problem.a)  # counts read "a boxes of b"
        question, closing = rng.choice(WORD_PROBLEMS[lang][problem.op])
        values = {"a": problem.a, "b": problem.b, "c": problem.answer}
        reply = worked_answer(problem, lang, mul_format) + (" " if lang == "en" else "")
        return ArithmeticItem(
            problem, lang, question.format(**values), reply + closing.format(**values)
        )
    question = rng.choice(QUESTIONS[lang][problem.op]).format(a=problem.a, b=problem.b)
    return ArithmeticItem(problem, lang, question, worked_answer(problem, lang, mul_format))


def sample_arithmetic(
    rng: random.Random, *, held_out: bool, mul_format: MulFormat = "split"
) -> ArithmeticItem:
    op: Op = rng.choice(OPS)
    problem = sample_split_problem(rng, op, held_out=held_out)
    if op == "mul" and rng.random() < 0.3:
        problem = Problem("mul", problem.b, problem.a)  # "7 × 48" as well as "48 × 7"
    lang: Lang = rng.choice(("en", "zh"))
    return arithmetic_item(
        rng, problem, lang, word_problem=rng.random() < 0.2, mul_format=mul_format
    )


def sample_small_talk(rng: random.Random) -> tuple[str, str]:
    lang: Lang = rng.choice(("en", "zh"))
    users, reply = rng.choice(SMALL_TALK[lang])
    return rng.choice(users), reply


def sample_turn(rng: random.Random, mul_format: MulFormat = "split") -> tuple[str, str]:
    """One (user, assistant) exchange from the training side of the split."""
    if rng.random() < 0.12:
        return sample_small_talk(rng)
    item = sample_arithmetic(rng, held_out=False, mul_format=mul_format)
    return item.question, item.reply


def sample_conversation(rng: random.Random, mul_format: MulFormat = "split") -> list[Message]:
    """Mostly one turn; some with a system prompt or an earlier turn, as the chat page sends
    whole sessions."""
    messages: list[Message] = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = 2 if rng.random() < 0.12 else 1
    for _ in range(turns):
        user, reply = sample_turn(rng, mul_format)
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": reply})
    return messages


def conversations(seed: int, mul_format: MulFormat = "split") -> Iterator[list[Message]]:
    """The endless, seed-determined training stream (the format changes only the text of ×
    answers, never which problems are drawn)."""
    rng = random.Random(seed)
    while True:
        yield sample_conversation(rng, mul_format)


def held_out_items(count: int = 200, seed: int = 1234) -> list[ArithmeticItem]:
    """The evaluation set: `count` distinct questions on held-out operand pairs, balanced over
    the three operations and the two languages, some as word problems."""
    rng = random.Random(seed)
    items: list[ArithmeticItem] = []
    seen: set[str] = set()
    while len(items) < count:
        index = len(items)
        op = OPS[index % len(OPS)]
        lang: Lang = ("en", "zh")[(index // len(OPS)) % 2]
        problem = sample_split_problem(rng, op, held_out=True)
        if op == "mul" and rng.random() < 0.3:
            problem = Problem("mul", problem.b, problem.a)
        item = arithmetic_item(rng, problem, lang, word_problem=index % 5 == 4)
        if item.question in seen:
            continue
        seen.add(item.question)
        items.append(item)
    return items
