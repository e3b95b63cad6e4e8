"""How the VL2 demo corpus asks arithmetic: numerals, operator words, spacing and sentence frames,
with the frames split into a training set and a held-out set.

A question is composed from independent parts: a frame ("What is {e}?", "{e}等于多少？",
"Multiply {a} by {b}."), an operator word (`times`, `x`, `*`, `×`, `乘`, `乘以`, ...), each
operand as digits or, from 0 to 10, as a word (`five`, `三`), and spacing around the operator
(`3乘以22`, `3 乘以 22`). Training draws every combination of the training frames; the held-out
frames never appear in training, so the evaluation measures phrasings the model has not seen,
not only operands. The held-out frames say the operation with words training has (`add`,
`subtract`, `加`, `减去`, ...): a word for an operation that no training sentence uses
("difference", "比...多多少") is beyond what a model that has seen only this corpus can
infer, so such frames would measure vocabulary, not phrasing. The answer always restates the problem in canonical digits first
(`3 × 22: ...`), so an unseen phrasing only has to be mapped onto a known form.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from services.demo.arithmetic import Op, Problem

Lang = Literal["en", "zh"]
Split = Literal["train", "held_out"]

NUMBER_WORDS: dict[Lang, tuple[str, ...]] = {
    "en": (
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
    ),
    "zh": ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九", "十"),
}
# 两 is the everyday Chinese "two" before a measure or in speech ("两加三").
ZH_TWO_ALT = "两"
MAX_WORD_NUMBER = 10

# Operator words of an expression "{a} OP {b}". Words need spaces in English; symbols do not.
OPERATORS: dict[Lang, dict[Op, tuple[str, ...]]] = {
    "en": {
        "add": ("+", "plus"),
        "sub": ("-", "minus"),
        "mul": ("×", "x", "X", "*", "times", "multiplied by"),
    },
    "zh": {
        "add": ("+", "加", "加上"),
        "sub": ("-", "减", "减去"),
        "mul": ("×", "x", "*", "乘", "乘以"),
    },
}

# Frames around a whole expression {e}; op-specific frames name the operands {a}, {b} instead.
GENERIC_FRAMES: dict[Lang, dict[Split, tuple[str, ...]]] = {
    "en": {
        "train": (
            "What is {e}?",
            "what is {e}",
            "What's {e}?",
            "{e} = ?",
            "{e}=?",
            "{e}",
            "{e}?",
            "{e} =",
            "Calculate {e}.",
            "Compute {e}.",
            "How much is {e}?",
            "Please calculate {e}.",
            "Solve {e}.",
            "What does {e} equal?",
            "Find {e}.",
            "Can you tell me what {e} is?",
            "Quick question: what is {e}?",
            "Hey, what's {e}?",
            "What do you get for {e}?",
            "Do you know what {e} is?",
            "I want to know {e}.",
            "Help me with {e}.",
            "Answer this: {e}",
            "Question: {e}",
            "{e}, please.",
            "So what is {e}?",
            "Can you do {e}?",
            "Please solve {e}.",
        ),
        "held_out": (
            "Work out {e}.",
            "Evaluate {e}, please.",
            "Tell me {e}.",
            "{e} equals what?",
            "Could you compute {e} for me?",
            "I need the answer to {e}.",
        ),
    },
    "zh": {
        "train": (
            "{e}等于多少？",
            "{e}等于几？",
            "{e}是多少？",
            "计算{e}",
            "计算：{e}",
            "{e}=？",
            "请算一下{e}。",
            "{e}得多少？",
            "请问{e}等于多少？",
            "{e}等于？",
            "帮我算算{e}",
            "{e}的结果是多少？",
            "请帮我算{e}",
            "问一下，{e}是几？",
            "{e}得几？",
            "你能算{e}吗？",
            "我想知道{e}等于多少。",
            "快算{e}",
        ),
        "held_out": (
            "{e}等于多少呀？",
            "算一算{e}。",
            "求{e}的值。",
            "你知道{e}等于几吗？",
            "{e}，结果是？",
            "麻烦算下{e}",
        ),
    },
}

OP_FRAMES: dict[Lang, dict[Split, dict[Op, tuple[str, ...]]]] = {
    "en": {
        "train": {
            "add": ("Add {a} and {b}.", "What is the sum of {a} and {b}?"),
            "sub": ("Subtract {b} from {a}.", "What is {a} take away {b}?"),
            "mul": ("Multiply {a} by {b}.", "What is the product of {a} and {b}?"),
        },
        "held_out": {
            "add": ("What do you get when you add {a} and {b}?",),
            "sub": ("What do you get when you subtract {b} from {a}?",),
            "mul": ("What do you get when you multiply {a} by {b}?",),
        },
    },
    "zh": {
        "train": {
            "add": ("{a}和{b}的和是多少？", "{a}与{b}相加等于多少？"),
            "sub": ("{a}和{b}的差是多少？", "从{a}里减去{b}等于多少？"),
            "mul": ("{a}和{b}的积是多少？", "{a}与{b}相乘等于多少？"),
        },
        "held_out": {
            "add": ("把{a}和{b}加起来是多少？",),
            "sub": ("从{a}中减去{b}，还剩多少？",),
            "mul": ("{a}和{b}相乘得几？",),
        },
    },
}


def number_text(rng: random.Random, n: int, lang: Lang, words: bool) -> str:
    """n as digits, or (0-10, when words) as an English or Chinese word."""
    if not words or n > MAX_WORD_NUMBER:
        return str(n)
    if lang == "zh" and n == 2 and rng.random() < 0.3:
        return ZH_TWO_ALT
    return NUMBER_WORDS[lang][n]


def expression_text(rng: random.Random, problem: Problem, lang: Lang, words: bool) -> str:
    """'{a} OP {b}' with a random operator word and spacing ('3乘以22', 'seven times 8')."""
    a = number_text(rng, problem.a, lang, words and rng.random() < 0.8)
    b = number_text(rng, problem.b, lang, words and rng.random() < 0.8)
    op = rng.choice(OPERATORS[lang][problem.op])
    # English words must stay apart from their neighbours; anything else may touch.
    needs_space = lang == "en" and (op[0].isalpha() or a[-1].isalpha() or b[0].isalpha())
    space = " " if needs_space or rng.random() < 0.5 else ""
    return f"{a}{space}{op}{space}{b}"


@dataclass(frozen=True)
class Question:
    text: str
    frame: str  # the frame it was built from, for the split's checks


def question_text(
    rng: random.Random, problem: Problem, lang: Lang, split: Split, *, words: bool
) -> Question:
    """A question about `problem` in a frame of `split` (op-specific frames a fifth of the time).
    Chinese questions lose or keep their spaces as a whole, as people type them."""
    op_frames = OP_FRAMES[lang][split][problem.op]
    if rng.random() < 0.2:
        frame = rng.choice(op_frames)
        a = number_text(rng, problem.a, lang, words and rng.random() < 0.8)
        b = number_text(rng, problem.b, lang, words and rng.random() < 0.8)
        text = frame.format(a=a, b=b)
    else:
        frame = rng.choice(GENERIC_FRAMES[lang][split])
        text = frame.format(e=expression_text(rng, problem, lang, words))
    if lang == "zh" and rng.random() < 0.5:
        text = text.replace(" ", "")
    return Question(text, frame)


def all_frames(split: Split) -> set[str]:
    frames: set[str] = set()
    for lang in ("en", "zh"):
        frames.update(GENERIC_FRAMES[lang][split])
        for per_op in OP_FRAMES[lang][split].values():
            frames.update(per_op)
    return frames
