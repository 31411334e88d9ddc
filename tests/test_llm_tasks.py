"""The task suite's programs on hand-written completions (no LLM): success, canonical answers, and
the step verifier's partial credit (1 exactly on correct finished completions)."""

from __future__ import annotations

import pytest

from app.tasks import (
    FAMILIES,
    acrostic,
    closed_set,
    get_tasks,
    letter_words,
    number_list,
    parse_items,
    wilson_interval,
)

# Completions are what the model writes after the task's response prefix "1.".
CASES = {
    "letter_words": (letter_words("B", 2), [
        " Bomber\n2. Bombs",
        " Bat\n2. Bear\n\nThese are two words that start with B.",
        ' "bisp"\n2. "bemba"',
        " **Banana** - a fruit\n2. Butter (dairy)",
    ], [
        " Bomber",                      # too few
        " Bat\n2. Bear\n3. Bee",        # too many
        " Beneath\n2. Beneath",         # not distinct
        " Bat\n2. Tiger",               # wrong letter
        " B-52\n2. Bear",               # not a word
        " The words are bat and bear",  # not a list of words
    ]),
    "number_list": (number_list("greater", 50, None, 3), [
        " 100\n2. 110\n3. 120",
        " 51\n2. 60\n3. 1000\n\nAll of them are greater than 50.",
    ], [
        " 100\n2. 110",                 # too few
        " 100\n2. 100\n3. 120",         # not distinct
        " 50\n2. 60\n3. 70",            # 50 is not greater than 50
        " 100.5\n2. 110\n3. 120",       # not an integer
        " 100 and more\n2. 110\n3. 120",
    ]),
    "closed_set": (closed_set("oceans", 3), [
        " Pacific\n2. Atlantic\n3. Indian",
        " The Pacific Ocean\n2. Arctic Ocean - the coldest\n3. Southern",
        " Pacific, Atlantic and Arctic",   # one comma-separated line (after the prefix "1.")
    ], [
        " Pacific\n2. Atlantic",           # too few
        " Pacific\n2. Pacific Ocean\n3. Indian",  # the same ocean twice
        " Pacific\n2. Atlantic\n3. Mediterranean",  # a sea
        " Southern\n2. Antarctic\n3. Indian",       # aliases of one ocean
    ]),
    "acrostic": (acrostic("CAT"), [
        " Cloud\n2. Apple\n3. Tiger",
        " Cat\n2. Ant\n3. Tan",
    ], [
        " Apple\n2. Cloud\n3. Tiger",   # wrong order
        " Cloud\n2. Apple",             # too few
        " C\n2. A\n3. T",               # single letters are not words
    ]),
}


def test_every_family_is_covered_and_large_enough():
    assert set(CASES) == set(FAMILIES)
    sizes = {f: len(get_tasks(f)) for f in FAMILIES}
    assert len(sizes) >= 3 and sum(sizes.values()) >= 50, sizes
    for f in FAMILIES:
        prompts = [t.prompt for t in get_tasks(f)]
        assert len(set(prompts)) == len(prompts), f"duplicate prompts in {f}"


@pytest.mark.parametrize("family", sorted(CASES))
def test_success_program(family):
    task, good, bad = CASES[family]
    for text in good + bad:
        assert task.answer_is_correct(task.answer(text)) == task.is_correct(text), (family, text)
    for text in good:
        assert task.is_correct(text), (family, text)
        assert task.final_score(text) == 1.0
        assert task.step_score(text, True) == 1.0
    for text in bad:
        assert not task.is_correct(text), (family, text)
        assert task.final_score(text) == 0.0
        assert task.step_score(text, True) < 1.0, (family, text)


@pytest.mark.parametrize("family", sorted(CASES))
def test_step_score_is_partial_credit_in_unit_interval(family):
    task, good, bad = CASES[family]
    for text in good + bad:
        for cut in range(len(text) + 1):
            for fin in (False, True):
                s = task.step_score(text[:cut], fin)
                assert 0.0 <= s <= 1.0
    # every prefix of a correct completion violates nothing yet
    text = good[0]
    for cut in range(len(text) + 1):
        assert task.step_score(text[:cut], False) == 1.0, repr(text[:cut])


def test_step_score_counts_violations():
    t = letter_words("B", 2)
    assert t.step_score("", False) == 1.0
    assert t.step_score(" Tiger\n", False) == pytest.approx(2 / 3)   # slot 1 violated
    assert t.step_score(" Tiger\n2. Lion\n", False) == pytest.approx(1 / 3)
    assert t.step_score(" Bat\n2. Bee\n3. Bug\n", False) == pytest.approx(2 / 3)  # count violated
    assert t.step_score(" Bat", True) == pytest.approx(1 / 3)       # empty slot + count at the end
    # the in-progress line is not judged until it ends
    assert t.step_score(" Tig", False) == 1.0


def test_canonical_answer():
    t = letter_words("B", 2)
    assert t.answer(" Bat\n2. Bear") == t.answer(" bear\n2. BAT\n\nbye") == "bat|bear"
    assert t.answer("") == ""
    a = acrostic("CAT")  # ordered
    assert a.answer(" Cat\n2. Ant\n3. Tan") != a.answer(" Tan\n2. Ant\n3. Cat")


def test_parse_items_formats():
    assert parse_items("Here are two words:\n\n- Bat\n- Bear\n\nmore") == ["Bat", "Bear"]
    assert parse_items("Bat, Bear and Bee.") == ["Bat", "Bear", "Bee"]
    assert parse_items("1) Bat\n2) Bear") == ["Bat", "Bear"]
    assert parse_items("1. Bat\n2. Be", finished=False) == ["Bat"]
    assert parse_items("1. Bat\n2. Bear\n", finished=False) == ["Bat", "Bear"]


def test_prompt_rendering_and_errors():
    class Tok:
        def apply_chat_template(self, messages):
            return "<user>" + messages[0]["content"] + "<assistant>"

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    t = get_tasks("closed_set")[0]
    assert t.prompt_text(Tok()).endswith("<assistant>1.")
    assert len(t.prompt_ids(Tok())) == len(t.prompt_text(Tok()))
    with pytest.raises(ValueError, match="unknown task family"):
        get_tasks("arithmetic")
    with pytest.raises(ValueError, match="has 20 prompts"):
        get_tasks("letter_words", 99)
    with pytest.raises(ValueError, match="positive integer"):
        get_tasks("letter_words", 0)


def test_wilson_interval():
    lo, hi = wilson_interval(21, 60)
    assert lo < 21 / 60 < hi and 0.2 < lo and hi < 0.5
    assert wilson_interval(0, 10)[0] == 0.0
