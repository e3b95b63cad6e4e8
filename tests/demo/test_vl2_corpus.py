"""The VL2 demo corpus: restated worked answers are right, held-out phrasing frames and operand
pairs never reach training, the issue's phrasings are covered by the training parts, and the
held-out sets are fixed."""

from __future__ import annotations

import random
import re
from itertools import islice
from pathlib import Path

from services.demo import phrasing, vl2_corpus
from services.demo.arithmetic import (
    OPS,
    Problem,
    column_steps,
    is_held_out,
    restated_answer,
    sample_small_problem,
    sample_wide_problem,
)
from services.demo.evaluate import final_number

EQUATION = re.compile(r"(\d+) ([+×-]) (\d+) = (\d+)")
OP_OF = {"+": "add", "-": "sub", "×": "mul"}


def frame_pattern(frame: str) -> re.Pattern[str]:
    """A frame as a regex over whole questions (its slots match anything), spaces optional."""
    parts = re.split(r"\{[eab]\}", frame)
    body = ".+".join(re.escape(p.replace(" ", "")) for p in parts)
    return re.compile(f"^{body}$")


def test_restated_answers_start_with_the_problem_and_end_with_the_result() -> None:
    rng = random.Random(5)
    for _ in range(3000):
        op = rng.choice(OPS)
        problem = (sample_wide_problem if rng.random() < 0.5 else sample_small_problem)(rng, op)
        for lang in ("en", "zh"):
            reply = restated_answer(problem, lang)
            assert reply.startswith(problem.expression), reply
            assert final_number(reply) == problem.answer, reply
        for step in column_steps(problem):
            left, right = step.split("=")
            assert eval(left.replace("×", "*")) == int(right), step
    assert restated_answer(Problem("mul", 3, 22), "zh") == (
        "3 × 22：2×3=6，2×3=6。所以 3 × 22 = 66。"
    )
    assert restated_answer(Problem("mul", 7, 8), "en") == "7 × 8 = 56."
    assert restated_answer(Problem("add", 1234, 5678), "en") == (
        "1234 + 5678: 4+8=12, 3+7+1=11, 2+6+1=9, 1+5=6. So 1234 + 5678 = 6912."
    )


def test_ranges_cover_four_digit_sums_and_one_digit_products() -> None:
    rng = random.Random(1)
    adds = [sample_wide_problem(rng, "add") for _ in range(2000)]
    muls = [sample_wide_problem(rng, "mul") for _ in range(2000)]
    assert any(p.a >= 1000 and p.b >= 1000 for p in adds)
    assert any(p.a < 10 and p.b < 10 for p in muls)
    assert all(min(p.a, p.b) < 10 and max(p.a, p.b) < 100 for p in muls)
    subs = [sample_wide_problem(rng, "sub") for _ in range(2000)]
    assert all(p.answer >= 0 for p in subs)


def test_training_never_uses_a_held_out_frame_or_pair() -> None:
    held = [frame_pattern(f) for f in phrasing.all_frames("held_out")]
    rng = random.Random(0)
    seen = 0
    for _ in range(4000):
        item = vl2_corpus.arithmetic_text(rng, "train", held_out_pairs=False)
        question = item.question.replace(" ", "")
        assert not any(p.match(question) for p in held), item.question
        assert not is_held_out(item.problem)
        match = EQUATION.search(item.reply)
        assert match and Problem(OP_OF[match[2]], int(match[1]), int(match[3])) == item.problem
        seen += 1
    assert seen == 4000


def test_held_out_text_set_uses_only_held_out_frames_and_pairs() -> None:
    items = vl2_corpus.held_out_text_items()
    assert len(items) == 200 and len({i.question for i in items}) == 200
    held = [frame_pattern(f) for f in phrasing.all_frames("held_out")]
    for item in items:
        question = item.question.replace(" ", "")
        assert any(p.match(question) for p in held), item.question
        assert is_held_out(item.problem)
        assert final_number(item.reply) == item.problem.answer
    assert not phrasing.all_frames("held_out") & phrasing.all_frames("train")
    assert {i.lang for i in items} == {"en", "zh"}
    assert {i.problem.op for i in items} == set(OPS)
    text = " ".join(i.question for i in items)
    for word in ("three", "seven", "五", "乘以", "times"):
        assert word in text, word
    assert vl2_corpus.held_out_text_items() == items


def test_issue_phrasings_are_built_from_training_parts() -> None:
    items = vl2_corpus.issue_text_items()
    assert [i.question for i in items[-3:]] == [
        "What is 7 times 8?",
        "What is 1234 + 5678?",
        "三加五等于几？",
    ]
    assert all(re.fullmatch(r"\d+乘以\d+等于多少？", i.question) for i in items[:10])
    train = phrasing.all_frames("train")
    assert {"What is {e}?", "{e}等于多少？", "{e}等于几？"} <= train
    assert "乘以" in phrasing.OPERATORS["zh"]["mul"] and "times" in phrasing.OPERATORS["en"]["mul"]


def test_questions_vary_spacing_operator_words_and_numerals() -> None:
    rng = random.Random(3)
    questions = [
        vl2_corpus.arithmetic_text(rng, "train", held_out_pairs=False).question for _ in range(3000)
    ]
    text = "\n".join(questions)
    for needle in ("乘以", " times ", "×", "*", " x ", "three", "三", "两", "Tom has"):
        assert needle in text, needle
    assert re.search(r"\d乘以\d", text) and re.search(r"\d 乘以 \d", text)


def test_picture_samples_pair_the_question_with_the_right_reply() -> None:
    rng = random.Random(2)
    mix = vl2_corpus.Mix(picture_share=1.0, count=1, number=1, problem=1)
    for sample in islice(iter(lambda: vl2_corpus.sample(rng, mix), None), 60):
        assert len(sample.images) == 1
        user, reply = sample.messages[0]["content"], sample.messages[1]["content"]
        assert user.startswith("<image>\n")
        assert final_number(reply) is not None


def test_held_out_picture_sets_are_fixed_and_ask_in_the_issue_words() -> None:
    for kind, first in (
        ("count", ("How many shapes are in this picture?", "图里有几个图形？")),
        ("number", ("What number is in this picture?", "图里是什么数字？")),
    ):
        items = vl2_corpus.held_out_picture_items(kind, 10)
        assert [i.question.split("\n")[1] for i in items[:2]] == list(first)
        again = vl2_corpus.held_out_picture_items(kind, 10)
        assert [i.image.tobytes() for i in items] == [i.image.tobytes() for i in again]
        assert all(final_number(i.reply) == i.answer for i in items)


def test_filler_frames_keep_every_held_out_word_unseen() -> None:
    """Filler frames teach that only the numbers and the operator words matter; their words
    must not include any word of a held-out frame (or a numeral or operator word), or the
    held-out evaluation would no longer measure unseen phrasings."""
    held_words, held_chars = phrasing._held_out_words()
    assert {"work", "evaluate", "tell", "equals", "need"} <= held_words
    assert not set(phrasing.FILLER["en"]) & held_words
    assert not set("".join(phrasing.FILLER["zh"])) & held_chars
    numerals = set(phrasing.NUMBER_WORDS["en"]) | {"x"}
    assert not set(phrasing.FILLER["en"]) & numerals
    assert not set("".join(phrasing.FILLER["zh"])) & (
        set("零一二三四五六七八九十两") | {"乘", "加", "减"}
    )
    rng = random.Random(7)
    questions = [
        phrasing.filler_question(rng, Problem("mul", 3, 22), lang, words=False)
        for lang in ("en", "zh")
        for _ in range(200)
    ]
    assert all("3" in q and "22" in q for q in questions)
    assert len(set(questions)) > 350
    # training asks a share of its questions this way, evaluation never
    rng = random.Random(8)
    for split, low, high in (("train", 0.3, 0.5), ("held_out", 0.0, 0.0)):
        frames = [
            phrasing.question_text(rng, Problem("add", 5, 7), "en", split, words=False).frame  # type: ignore[arg-type]
            for _ in range(1000)
        ]
        share = frames.count(phrasing.FILLER_FRAME) / len(frames)
        assert low <= share <= high, (split, share)


def test_filler_frames_hold_words_the_tokenizer_never_saw(demo_checkpoint: Path) -> None:
    """A quarter of the filler words are unknown ones (random letters, CJK characters no corpus
    text has), so the model learns that byte pieces carry no arithmetic. None of them is a
    held-out frame's character or word, the tokenizer's own texts have none of them (so they
    stay byte pieces), and held-out questions never get them."""
    from tokenizers import Tokenizer

    unknown_zh = phrasing._unknown_zh()
    known = set(unknown_zh)
    _, held_chars = phrasing._held_out_words()
    assert len(unknown_zh) > 20000 and not set(unknown_zh) & held_chars
    assert not set(unknown_zh) & set("".join(phrasing.FILLER["zh"]))
    tokenizer = Tokenizer.from_file(str(demo_checkpoint / "tokenizer.json"))
    pieces = [len(e.ids) for e in tokenizer.encode_batch(list(unknown_zh))]
    assert min(pieces) >= 2, "an unknown character is a whole token of the demo's tokenizer"

    rng = random.Random(11)
    zh = [
        phrasing.filler_question(rng, Problem("add", 44, 51), "zh", words=False, unknown_share=0.25)
        for _ in range(400)
    ]
    unknown_share = sum(c in known for q in zh for c in q) / sum(
        c not in "4451？。！，：" and not c.isascii() for q in zh for c in q
    )
    assert 0.2 < unknown_share < 0.5, unknown_share  # 1-2 characters per unknown word
    assert all("44" in q and "51" in q for q in zh)
    unknown_en = {phrasing.unknown_word(rng, "en") for _ in range(2000)}
    assert len(unknown_en) > 1500 and not unknown_en & phrasing._held_out_words()[0]
    assert not unknown_en & set(phrasing.FILLER["en"])

    # the training stream has them, the tokenizer's stream and the held-out sets do not
    def han(samples) -> set[str]:
        return {c for s in samples for m in s.messages for c in m["content"]}

    mix = vl2_corpus.Mix(picture_share=0.0)
    assert han(islice(vl2_corpus.stream(3, mix), 2000)) & known
    tokenizer_mix = vl2_corpus.Mix(picture_share=0.0, unknown_words=0.0)
    assert not han(islice(vl2_corpus.stream(3, tokenizer_mix), 2000)) & known
    held_out = "".join(item.question for item in vl2_corpus.held_out_text_items(200))
    assert not set(held_out) & known
