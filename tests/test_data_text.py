"""The LLM track's generative tasks: deterministic, correct by construction, disjoint splits."""

import datetime
import re

import pytest

from course_lib.data.text import (
    ALL_TEXT_TASKS,
    TEXT_TASKS,
    exact_match,
    load_text_task,
    load_text_tasks,
    normalize_answer,
)


def test_every_task_has_three_deterministic_splits():
    a, b = load_text_tasks(seed=3), load_text_tasks(seed=3)
    for name in TEXT_TASKS:
        for split in ("train", "val", "test"):
            assert a[name].examples(split) == b[name].examples(split)
            assert len(a[name].examples(split)) > 0
    assert load_text_task("arithmetic", seed=4).examples("test") != a["arithmetic"].examples("test")


def test_answers_are_right_by_construction():
    for ex in load_text_task("arithmetic", {"test": 200}).examples("test"):
        x, op, y = re.match(r"What is (\d+) ([+-]) (\d+)\?", ex.prompt).groups()
        assert int(ex.answer) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
    for ex in load_text_task("reverse", {"test": 50}).examples("test"):
        words = ex.prompt.split(": ")[1].split()
        assert len(words) == 3 and ex.answer.split() == words[::-1]
    for ex in load_text_task("qa", {"test": 50}).examples("test"):
        m = re.match(
            r"(\w+) has a (\w+) (\w+) and (\w+) has a (\w+) (\w+)\. What color is (\w+)'s (\w+)\?",
            ex.prompt,
        )
        n1, c1, o1, n2, c2, o2, who, obj = m.groups()
        assert n1 != n2 and c1 != c2 and (who, obj) in ((n1, o1), (n2, o2))
        assert ex.answer == (c1 if (who, obj) == (n1, o1) else c2)
    for ex in load_text_task("dates", {"test": 50}).examples("test"):
        iso = re.search(r"\d{4}-\d{2}-\d{2}", ex.prompt).group(0)
        assert ex.answer == datetime.date.fromisoformat(iso).strftime("%d/%m/%Y")


@pytest.mark.parametrize("name", ALL_TEXT_TASKS)
def test_no_question_is_shared_between_splits(name):
    task = load_text_task(name, {"train": 400, "val": 200, "test": 200})
    asked = {s: {e.prompt for e in task.examples(s)} for s in ("train", "val", "test")}
    assert not asked["train"] & asked["test"]
    assert not asked["train"] & asked["val"]
    assert not asked["val"] & asked["test"]


@pytest.mark.parametrize("name", ALL_TEXT_TASKS)
def test_evaluation_splits_never_repeat_a_question(name):
    task = load_text_task(name)  # the mini sizes: 32 asked, arithmetic's test pool holds 31
    for split in ("val", "test"):
        prompts = [e.prompt for e in task.examples(split)]
        assert len(prompts) == len(set(prompts)), (name, split)
    big = load_text_task(name, {"train": 10_000, "val": 10_000, "test": 10_000})
    test = [e.prompt for e in big.examples("test")]
    assert len(test) == len(set(test)) < 10_000  # cut to the pool, each question once
    assert len(big.examples("train")) == 10_000  # training may repeat items
    if name == "arithmetic":
        assert len(task.examples("test")) == 31 and len(task.examples("val")) == 32


def test_chat_messages_and_training_target():
    task = load_text_task("dates")
    ex = task.examples("train")[0]
    msgs = task.messages(ex)
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"] == ex.prompt
    assert task.messages(ex, with_answer=True)[-1] == {"role": "assistant", "content": ex.answer}


def test_exact_match_normalizes_only_formatting():
    assert normalize_answer('  "Oslo."\nbecause ...') == "oslo"
    assert exact_match(["85", " 85.", "58"], ["85", "85", "85"]) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="predictions"):
        exact_match(["1"], ["1", "2"])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown text task 'poetry'"):
        load_text_task("poetry")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_text_task("dates", {"dev": 3})
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_text_task("dates").examples("dev")
