"""Arithmetic problems of the demo corpus: operand pairs, the held-out split, worked answers.

The answers show column arithmetic (units first, with carries and borrows) before the result,
so each generated token needs only a one-digit fact and a copy: a model of a few million
parameters learns that in minutes on a CPU, where the bare result would need far more training.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

Op = Literal["add", "sub", "mul"]
OPS: tuple[Op, ...] = ("add", "sub", "mul")
SYMBOL: dict[Op, str] = {"add": "+", "sub": "-", "mul": "×"}
# How a × column with a carry is written: "split" as two one-step facts ("4×7=28, 28+5=33"),
# "fused" as one ("4×7+5=33"; the first two training stages' format). The fused step asks
# for a product and a 2-digit addition in one token, and was where most held-out misses were.
MulFormat = Literal["split", "fused"]
MUL_FORMATS: tuple[MulFormat, ...] = ("split", "fused")

# One pair in HELD_OUT_BUCKETS is kept out of training and used only for evaluation.
HELD_OUT_BUCKETS = 10


@dataclass(frozen=True)
class Problem:
    op: Op
    a: int
    b: int

    @property
    def answer(self) -> int:
        if self.op == "add":
            return self.a + self.b
        if self.op == "sub":
            return self.a - self.b
        return self.a * self.b

    @property
    def expression(self) -> str:
        return f"{self.a} {SYMBOL[self.op]} {self.b}"


def pair_key(problem: Problem) -> str:
    """The identity of an operand pair for the split: order does not matter for + and ×
    (so "3 + 5" and "5 + 3" fall on the same side), it does for -."""
    a, b = problem.a, problem.b
    if problem.op != "sub":
        a, b = min(a, b), max(a, b)
    return f"{problem.op}:{a}:{b}"


def is_held_out(problem: Problem) -> bool:
    """Deterministic across runs and machines (no Python hash randomisation)."""
    digest = hashlib.blake2b(pair_key(problem).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_BUCKETS == 0


def _number_with_digits(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_problem(rng: random.Random, op: Op) -> Problem:
    """Operand lengths are drawn uniformly (1-3 digits) so short numbers are not swamped by the
    810 000 pairs of 3-digit numbers; × is a 2-digit by a 1-digit number."""
    if op == "mul":
        return Problem("mul", rng.randint(10, 99), rng.randint(2, 9))
    a = _number_with_digits(rng, rng.randint(1, 3))
    b = _number_with_digits(rng, rng.randint(1, 3))
    if op == "sub" and a < b:
        a, b = b, a  # the demo subtracts the smaller number from the larger
    return Problem(op, a, b)


def sample_split_problem(rng: random.Random, op: Op, *, held_out: bool) -> Problem:
    """Rejection-sample a problem from one side of the split."""
    while True:
        problem = sample_problem(rng, op)
        if is_held_out(problem) == held_out:
            return problem


def _digits_low_first(n: int, width: int) -> list[int]:
    return [(n // 10**i) % 10 for i in range(width)]


def column_steps(problem: Problem, mul_format: MulFormat = "split") -> list[str]:
    """Short equations column by column, units first, e.g. 345 + 278 ->
    ["5+8=13", "4+7+1=12", "3+2+1=6"]; 47 × 8 -> ["7×8=56", "4×8=32", "32+5=37"]
    (a × column with a carry takes two steps unless mul_format is "fused"). Reading the
    last result whole and each column's last result's last digit backwards gives the answer."""
    a, b, op = problem.a, problem.b, problem.op
    steps: list[str] = []
    if op == "mul":
        # The 2-digit operand goes column by column whatever order the question used.
        big, small = (a, b) if a >= b else (b, a)
        carry = 0
        for digit in _digits_low_first(big, len(str(big))):
            product = digit * small
            value = product + carry
            if carry and mul_format == "split":
                steps += [f"{digit}×{small}={product}", f"{product}+{carry}={value}"]
            else:
                steps.append(f"{digit}×{small}" + (f"+{carry}" if carry else "") + f"={value}")
            carry = value // 10
        return steps
    width = max(len(str(a)), len(str(b)))
    carry = 0
    for x, y in zip(_digits_low_first(a, width), _digits_low_first(b, width), strict=True):
        if op == "add":
            value = x + y + carry
            steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={value}")
            carry = value // 10
        else:
            borrow_out = x - carry - y < 0
            top = x + 10 if borrow_out else x
            value = top - carry - y
            steps.append(f"{top}" + ("-1" if carry else "") + f"-{y}={value}")
            carry = int(borrow_out)
    return steps


def worked_answer(
    problem: Problem, lang: Literal["en", "zh"], mul_format: MulFormat = "split"
) -> str:
    """The assistant's answer to a bare question: the columns, then the equation."""
    steps = column_steps(problem, mul_format)
    result = f"{problem.expression} = {problem.answer}"
    if len(steps) == 1:  # one column: the equation says it all
        return result + ("." if lang == "en" else "。")
    if lang == "en":
        return ", ".join(steps) + f". So {result}."
    return "，".join(steps) + f"。所以 {result}。"


# ---- the VL2 demo's ranges and answer format ------------------------------------------------
# + and - on numbers of up to 4 digits; × one digit by one digit or 2 digits by 1 digit.
WIDE_MAX_DIGITS = 4


def sample_wide_problem(rng: random.Random, op: Op) -> Problem:
    """Operand lengths uniform over 1-4 digits (+, -); × is 1 digit by 1 digit a third of the
    time, otherwise a 2-digit by a 1-digit number, in either order."""
    if op == "mul":
        big = rng.randint(0, 9) if rng.random() < 1 / 3 else rng.randint(10, 99)
        a, b = big, rng.randint(0, 9)
        return Problem("mul", *((b, a) if rng.random() < 0.3 else (a, b)))
    a = _number_with_digits(rng, rng.randint(1, WIDE_MAX_DIGITS))
    b = _number_with_digits(rng, rng.randint(1, WIDE_MAX_DIGITS))
    if op == "sub" and a < b:
        a, b = b, a
    return Problem(op, a, b)


def sample_small_problem(rng: random.Random, op: Op) -> Problem:
    """Both operands 0-10, the range asked with words ("three plus five", "三加五"); × keeps
    one operand to a single digit."""
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    if op == "mul" and a == 10 and b == 10:
        b = rng.randint(0, 9)
    if op == "sub" and a < b:
        a, b = b, a
    return Problem(op, a, b)


def sample_split(sampler, rng: random.Random, op: Op, *, held_out: bool) -> Problem:
    """Rejection-sample from one side of the operand split with any sampler."""
    while True:
        problem = sampler(rng, op)
        if is_held_out(problem) == held_out:
            return problem


def restated_answer(problem: Problem, lang: Literal["en", "zh"]) -> str:
    """The problem restated in canonical digits first, then the columns, then the equation:
    `3 × 22: 2×3=6, 2×3=6. So 3 × 22 = 66.` However the question was phrased ("three times
    22", "3乘以22"), the rest of the answer only reads the restatement."""
    steps = column_steps(problem, "split")
    result = f"{problem.expression} = {problem.answer}"
    if len(steps) == 1:  # one column: the equation is the restatement and the answer
        return result + ("." if lang == "en" else "。")
    if lang == "en":
        return f"{problem.expression}: " + ", ".join(steps) + f". So {result}."
    return f"{problem.expression}：" + "，".join(steps) + f"。所以 {result}。"
