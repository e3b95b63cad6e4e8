"""The generated corpus: worked answers are right, the held-out split is stable and kept out of
the training stream, and the evaluation set is what the issue asks for."""

from __future__ import annotations

import random
import re
from itertools import islice

from services.demo.arithmetic import (
    MUL_FORMATS,
    OPS,
    Problem,
    column_steps,
    is_held_out,
    sample_problem,
    worked_answer,
)
from services.demo.corpus import conversations, held_out_items
from services.demo.evaluate import final_number

# The final equation of every worked answer: "So 345 + 278 = 623." / "所以 345 + 278 = 623。"
EQUATION = re.compile(r"(\d+) ([+×-]) (\d+) = (-?\d+)")
OP_OF = {"+": "add", "-": "sub", "×": "mul"}


def test_worked_answers_are_correct_and_end_with_the_result() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        problem = sample_problem(rng, rng.choice(OPS))
        for mul_format in MUL_FORMATS:
            for lang in ("en", "zh"):
                reply = worked_answer(problem, lang, mul_format)
                assert final_number(reply) == problem.answer, reply
            for step in column_steps(problem, mul_format):
                left, right = step.split("=")
                assert eval(left.replace("×", "*")) == int(right), step  # each step adds up


def test_column_steps_show_carries_and_borrows() -> None:
    assert column_steps(Problem("add", 345, 278)) == ["5+8=13", "4+7+1=12", "3+2+1=6"]
    assert column_steps(Problem("sub", 523, 278)) == ["13-8=5", "12-1-7=4", "5-1-2=2"]
    # A × column with a carry is two one-step facts: the product, then the carry added.
    assert column_steps(Problem("mul", 47, 8)) == ["7×8=56", "4×8=32", "32+5=37"]
    assert column_steps(Problem("mul", 41, 2)) == ["1×2=2", "4×2=8"]  # no carry, one step
    assert column_steps(Problem("mul", 47, 8), "fused") == ["7×8=56", "4×8+5=37"]
    assert worked_answer(Problem("mul", 7, 48), "zh") == (
        "8×7=56，4×7=28，28+5=33。所以 7 × 48 = 336。"
    )
    assert worked_answer(Problem("sub", 105, 98), "en") == (
        "15-8=7, 10-1-9=0, 1-1-0=0. So 105 - 98 = 7."
    )
    assert worked_answer(Problem("add", 9, 3), "zh") == "9 + 3 = 12。"


def test_a_tenth_of_the_pairs_is_held_out_and_order_does_not_matter() -> None:
    held = sum(is_held_out(Problem("add", a, b)) for a in range(300) for b in range(300))
    assert 0.09 < held / 300**2 < 0.11
    for a, b in [(12, 345), (7, 99), (48, 7)]:
        assert is_held_out(Problem("add", a, b)) == is_held_out(Problem("add", b, a))
        assert is_held_out(Problem("mul", a, b)) == is_held_out(Problem("mul", b, a))


def test_training_stream_never_shows_a_held_out_pair() -> None:
    seen = 0
    for messages in islice(conversations(seed=0), 3000):
        for message in messages:
            if message["role"] != "assistant":
                continue
            match = EQUATION.search(message["content"])
            if match:
                a, op, b, c = match.groups()
                problem = Problem(OP_OF[op], int(a), int(b))
                assert not is_held_out(problem), message["content"]
                assert problem.answer == int(c)
                seen += 1
    assert seen > 2000  # mostly arithmetic, the rest small talk


def test_training_stream_is_fixed_by_the_seed() -> None:
    first = list(islice(conversations(seed=3), 50))
    assert first == list(islice(conversations(seed=3), 50))
    assert first != list(islice(conversations(seed=4), 50))


def test_the_mul_format_changes_only_the_text_of_multiplication_answers() -> None:
    # Earlier recipe stages trained on the fused format; they must still draw the same stream.
    split = list(islice(conversations(seed=3, mul_format="split"), 300))
    fused = list(islice(conversations(seed=3, mul_format="fused"), 300))
    assert [[m["role"] for m in c] for c in split] == [[m["role"] for m in c] for c in fused]
    differ = [
        (a["content"], b["content"])
        for c, d in zip(split, fused, strict=True)
        for a, b in zip(c, d, strict=True)
        if a["content"] != b["content"]
    ]
    assert differ and all(" × " in a and "+" in b for a, b in differ)


def test_stream_is_bilingual_and_covers_every_kind_of_turn() -> None:
    replies = [
        m["content"]
        for messages in islice(conversations(seed=0), 2000)
        for m in messages
        if m["role"] == "assistant"
    ]
    text = "\n".join(replies)
    for needle in ("So ", "所以", " × ", " - ", " + ", "apples", "苹果", "DeepSeek-V2", "你好"):
        assert needle in text, needle


def test_held_out_set_is_200_distinct_held_out_questions_in_both_languages() -> None:
    items = held_out_items()
    assert len(items) == 200
    assert len({item.question for item in items}) == 200
    assert all(is_held_out(item.problem) for item in items)
    assert {item.lang for item in items} == {"en", "zh"}
    assert {item.problem.op for item in items} == set(OPS)
    assert all(final_number(item.reply) == item.problem.answer for item in items)
    assert held_out_items() == items  # the same set every time
