"""The LLM track's generative tasks: deterministic, correct by construction, disjoint splits."""

import datetime
import re

import pytest

from course_lib.data.text import (
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
        word = re.search(r"'(\w+)'", ex.prompt).group(1)
        assert ex.answer == word[::-1]
    for ex in load_text_task("dates", {"test": 50}).examples("test"):
        iso = re.search(r"\d{4}-\d{2}-\d{2}", ex.prompt).group(0)
        assert ex.answer == datetime.date.fromisoformat(iso).strftime("%d/%m/%Y")


def test_capitals_splits_ask_about_different_countries():
    task = load_text_task("capitals", {"train": 64, "val": 32, "test": 48})
    countries = {s: {e.prompt for e in task.examples(s)} for s in ("train", "val", "test")}
    assert not countries["train"] & countries["test"]
    assert not countries["train"] & countries["val"]
    assert not countries["val"] & countries["test"]


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
