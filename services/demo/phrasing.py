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
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
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


# The share of training questions asked in filler frames (the rest in the training frames).
FILLER_SHARE = 0.4
FILLER_FRAME = "<filler>"


def question_text(
    rng: random.Random,
    problem: Problem,
    lang: Lang,
    split: Split,
    *,
    words: bool,
    unknown_share: float = 0.0,
) -> Question:
    """A question about `problem` in a frame of `split` (op-specific frames a fifth of the time).
    Chinese questions lose or keep their spaces as a whole, as people type them.
    `unknown_share`: of a filler frame's words, the share no training text has."""
    op_frames = OP_FRAMES[lang][split][problem.op]
    if split == "train" and rng.random() < FILLER_SHARE:
        frame = FILLER_FRAME
        text = filler_question(rng, problem, lang, words=words, unknown_share=unknown_share)
    elif rng.random() < 0.2:
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


# ---- filler frames ----------------------------------------------------------------------------
# A model that has seen 30 frames learns those 30 sentences; one that has also seen the
# arithmetic inside sentences of random words learns that only the numbers and the operator
# words matter, which is what a phrasing it has never seen needs. The filler vocabulary is
# everyday words and characters with every word of a held-out frame taken out (and every
# numeral and operator word), so a held-out frame's words stay unseen in training.
_FILLER_EN = (
    "a an the this that these my your our it is are was be been am do does did have has had "
    "i we they he she him her them us who which where when why how not no yes ok okay well so "
    "just really very quite now then here there today tomorrow again also too still maybe "
    "please kindly hey hi hello dear friend teacher student mom dad sir madam class homework "
    "math maths number numbers problem question quick easy hard simple little big small "
    "give show write say check let know think guess try learn find figure solve calculate "
    "compute result value total count sum quickly exactly right correct "
    "want would like should shall must might may will can able about around with without on "
    "in at of for from into onto over under after before if because while since until "
    "thanks thank sorry excuse hmm um oh ah wow cool nice great good bad fun test exam "
    "paper book page line step steps way idea help remember forget"
)
_FILLER_ZH = (
    "请问这道题个人我们他她它们哪里怎么样为什么还有就都也很真太非常好吧啦哦嗯呢啊"
    "老师同学朋友妈爸今天明天昨天现在刚才马上一起快慢大小多少少些点儿作业数学题目问题答案"
    "告诉说看想要能会可以应该帮忙谢谢不客气对错没关系试写读做学习考试练习课本上下午晚早"
    "这个那个一下子看看想想写写帮帮计算得"
)
_NOT_FILLER_ZH = set("零一二三四五六七八九十两百千万加减乘除以上去和与积差相")


def _held_out_words() -> tuple[set[str], set[str]]:
    """The English words and the Chinese characters of every held-out frame."""
    words, chars = set(), set()
    for frame in all_frames("held_out"):
        text = frame.replace("{e}", " ").replace("{a}", " ").replace("{b}", " ")
        words.update(w.strip(".,?!:;").lower() for w in text.split() if w.isascii())
        chars.update(c for c in text if "\u4e00" <= c <= "\u9fff")
    return words, chars


def _filler_vocabulary() -> dict[Lang, tuple[str, ...]]:
    held_words, held_chars = _held_out_words()
    operator_words = {w for ops in OPERATORS["en"].values() for op in ops for w in op.split()}
    banned = held_words | operator_words | set(NUMBER_WORDS["en"]) | {"x"}
    english = sorted(set(_FILLER_EN.split()) - banned)
    chinese = sorted(set(_FILLER_ZH) - held_chars - _NOT_FILLER_ZH)
    return {"en": tuple(english), "zh": tuple(chinese)}


FILLER: dict[Lang, tuple[str, ...]] = _filler_vocabulary()

# The operation said in words, as the training op frames say it, for filler frames.
OP_CORES: dict[Lang, dict[Op, tuple[str, ...]]] = {
    "en": {
        "add": ("add {a} and {b}", "the sum of {a} and {b}"),
        "sub": ("subtract {b} from {a}", "{a} take away {b}"),
        "mul": ("multiply {a} by {b}", "the product of {a} and {b}"),
    },
    "zh": {
        "add": ("{a}和{b}的和", "{a}与{b}相加"),
        "sub": ("{a}和{b}的差", "从{a}里减去{b}"),
        "mul": ("{a}和{b}的积", "{a}与{b}相乘"),
    },
}


# ---- words no training text has ----------------------------------------------------------------
# A user's sentence holds words the corpus never had. The byte-level tokenizer breaks an unknown
# Chinese character into byte pieces whose embeddings training never moved, and a text model
# that has met none of them miscopies the number beside them (`把44和51加起来是多少？` →
# `5144 + 51`). So a share of the filler words are unknown ones: random letter strings, and CJK
# characters that no phrasing text and no held-out frame has. The tokenizer is built from the
# corpus without them (`Mix.unknown_words` 0), so in training they are byte pieces, as unknown
# characters are in serving. What this teaches is that byte pieces carry no arithmetic, not
# any held-out sentence: every held-out frame's characters and words are kept out of the pool.
UNKNOWN_SHARE = 0.25


def _strings(value: object) -> Iterator[str]:
    """Every string held in `value` (nested dicts, tuples, lists, sets)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, tuple | list | set | frozenset):
        for item in value:
            yield from _strings(item)


@cache
def _unknown_zh() -> tuple[str, ...]:
    """CJK Unified Ideographs (U+4E00-U+9FA5) that no text of the corpus modules has (their
    sentences, replies, filler, frames of both splits); imported here, not at the top, because
    the corpus modules import this one."""
    from services.demo import arithmetic, corpus, vl2_corpus

    known: set[str] = set(ZH_TWO_ALT)
    for op in ("add", "sub", "mul"):  # the replies' words ("所以") live in a function
        known.update(arithmetic.restated_answer(Problem(op, 47, 8), "zh"))
    for names in (vars(arithmetic), vars(corpus), vars(vl2_corpus), globals()):
        for name, value in names.items():
            if not name.startswith("__"):
                known.update("".join(_strings(value)))
    return tuple(c for c in map(chr, range(0x4E00, 0x9FA6)) if c not in known)


# English words a random letter string must not be: held-out frames' words, filler, numerals.
_NOT_UNKNOWN_EN: frozenset[str] = frozenset(
    _held_out_words()[0] | set(FILLER["en"]) | set(NUMBER_WORDS["en"]) | {"x"}
)


def unknown_word(rng: random.Random, lang: Lang) -> str:
    """A word no training text has: 2-7 random letters, or 1-2 unknown CJK characters."""
    if lang == "zh":
        return "".join(rng.choice(_unknown_zh()) for _ in range(rng.randint(1, 2)))
    while True:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
        if word not in _NOT_UNKNOWN_EN:
            return word


def _filler(rng: random.Random, lang: Lang, most: int, unknown_share: float = 0.0) -> str:
    n = rng.randint(0, most)
    words = [
        unknown_word(rng, lang)
        if unknown_share and rng.random() < unknown_share
        else rng.choice(FILLER[lang])
        for _ in range(n)
    ]
    return (" " if lang == "en" else "").join(words)


def filler_question(
    rng: random.Random, problem: Problem, lang: Lang, *, words: bool, unknown_share: float = 0.0
) -> str:
    """The arithmetic (an expression, or the operation in words) between random filler words:
    `hey so 3 x 22 now please?`, `老师快3乘以22好吧`; `unknown_share` of the filler words are
    ones no training text has (`unknown_word`). Training only."""
    if rng.random() < 0.25:
        core = rng.choice(OP_CORES[lang][problem.op]).format(
            a=number_text(rng, problem.a, lang, words and rng.random() < 0.8),
            b=number_text(rng, problem.b, lang, words and rng.random() < 0.8),
        )
    else:
        core = expression_text(rng, problem, lang, words)
    before = _filler(rng, lang, 5, unknown_share)
    after = _filler(rng, lang, 3, unknown_share)
    if lang == "en":
        joiner = rng.choice((" ", " ", ": ", ", "))
        text = (before + joiner if before else "") + core + (" " + after if after else "")
        if rng.random() < 0.5:
            text = text[0].upper() + text[1:]
        return text + rng.choice(("?", "?", ".", "", "!"))
    joiner = rng.choice(("", "", "：", "，"))
    return (before + joiner if before else "") + core + after + rng.choice(("？", "。", "", "！"))
