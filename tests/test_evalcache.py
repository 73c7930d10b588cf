"""The evaluation cache: the same weights on the same data are evaluated once, and only then.

A stale number must never come back: every input of an accuracy is part of its key.
"""

from __future__ import annotations

import json

import pytest
import torch

from course_lib import config, evalcache
from course_lib.experiments import stopwatch


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    with evalcache.using("on"):
        yield tmp_path / "evals"


class Compute:
    """Counts the real evaluations."""

    def __init__(self, value: float = 87.5):
        self.value, self.calls = value, 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def state(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6.0).reshape(2, 3) * scale, "b": torch.ones(3)}


def test_state_digest_sees_names_values_dtypes_and_shapes():
    d = evalcache.state_digest
    assert d(state()) == d({"b": torch.ones(3), "w": torch.arange(6.0).reshape(2, 3)})  # order
    assert d(state()) != d(state(2.0))
    changed = state()
    changed["w"][1, 2] = torch.nextafter(changed["w"][1, 2], torch.tensor(99.0))  # one ulp
    assert d(changed) != d(state())
    assert d(state()) != d({"w": state()["w"].double(), "b": torch.ones(3)})
    assert d(state()) != d({"w": state()["w"].reshape(3, 2), "b": torch.ones(3)})
    assert d(state()) != d({"v": state()["w"], "b": torch.ones(3)})
    assert d({"x": torch.tensor(1.0, dtype=torch.bfloat16)})  # 0-d and bfloat16 are fine
    assert d({"t": state()["w"].t()}) == d({"t": state()["w"].t().contiguous()})


def test_the_second_evaluation_is_served_and_counts_its_time(cache):
    compute = Compute()
    assert evalcache.Memo("world", state(), "val", 500)("digits", compute) == 87.5
    hits, saved = evalcache.hits(), evalcache.seconds_saved()
    again = Compute(value=-1.0)  # would give another number if it ran
    assert evalcache.Memo("world", state(), "val", 500)("digits", again) == 87.5
    assert (compute.calls, again.calls) == (1, 0)
    assert evalcache.hits() == hits + 1 and evalcache.seconds_saved() >= saved
    [entry] = cache.rglob("*.json")
    assert json.loads(entry.read_text())["value"] == 87.5


@pytest.mark.parametrize(
    "change",
    [
        dict(world="other world"),
        dict(state=state(2.0)),
        dict(split="test"),
        dict(limit=None),
        dict(task="shapes"),
        dict(salt="another head"),
    ],
    ids=lambda c: next(iter(c)),
)
def test_any_other_input_is_evaluated_again(cache, change):
    args = dict(world="world", state=state(), split="val", limit=500, task="digits", salt="h")
    evalcache.Memo(args["world"], args["state"], args["split"], args["limit"])(
        args["task"], Compute(), args["salt"]
    )
    args.update(change)
    compute = Compute(value=12.5)
    memo = evalcache.Memo(args["world"], args["state"], args["split"], args["limit"])
    assert memo(args["task"], compute, args["salt"]) == 12.5 and compute.calls == 1


def test_changed_code_is_evaluated_again(cache, monkeypatch):
    evalcache.Memo("world", state(), "val", 500)("digits", Compute())
    monkeypatch.setattr(evalcache, "_code", lambda: "edited course_lib")
    compute = Compute(value=12.5)
    assert evalcache.Memo("world", state(), "val", 500)("digits", compute) == 12.5


def test_device_and_library_versions_are_part_of_the_key(cache, monkeypatch):
    def memo(value: float) -> float:
        return evalcache.Memo("world", state(), "val", 500)("digits", Compute(value=value))

    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert memo(87.5) == 87.5
    with monkeypatch.context() as m:  # the device is read at every call, not once a process
        m.setenv("COURSE_DEVICE", "cuda")
        assert memo(12.5) == 12.5
    assert memo(-1.0) == 87.5  # back on the CPU: its own value
    monkeypatch.setattr(evalcache, "library_versions", lambda: "torch x, another transformers")
    assert memo(25.0) == 25.0


def test_off_refresh_and_unknown_worlds(cache):
    with evalcache.using("off"):
        evalcache.Memo("world", state(), "val", 500)("digits", Compute())
    assert not cache.exists()  # off: nothing written
    evalcache.Memo("", state(), "val", 500)("digits", Compute())
    assert not cache.exists()  # a zoo made by hand has no world: never cached
    evalcache.Memo("world", state(), "val", 500)("digits", Compute(value=1.0))
    with evalcache.using("refresh"):
        compute = Compute(value=2.0)
        assert evalcache.Memo("world", state(), "val", 500)("digits", compute) == 2.0
    assert evalcache.Memo("world", state(), "val", 500)("digits", Compute(value=3.0)) == 2.0
    with pytest.raises(ValueError, match="mode must be one of"), evalcache.using("sometimes"):
        pass


def test_a_damaged_entry_is_evaluated_again_and_rewritten(cache):
    memo = evalcache.Memo("world", state(), "val", 500)
    memo("digits", Compute())
    [entry] = cache.rglob("*.json")
    for damage in ("{not json", json.dumps({"value": "87.5", "seconds": 1.0}), "{}"):
        entry.write_text(damage)
        compute = Compute(value=50.0)
        assert memo("digits", compute) == 50.0 and compute.calls == 1
    assert json.loads(entry.read_text())["value"] == 50.0


def test_a_bad_mode_in_the_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("COURSE_EVAL_CACHE", "yes")
    with evalcache.using("on"):
        assert evalcache.mode() == "on"  # an explicit mode wins
    monkeypatch.setattr(evalcache, "_override", None)
    with pytest.raises(ValueError, match="COURSE_EVAL_CACHE must be one of .* got 'yes'"):
        evalcache.mode()


def test_stopwatch_counts_served_evaluations_at_their_measured_time(cache):
    path = evalcache.Memo("world", state(), "val", 500).path("digits")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"value": 90.0, "seconds": 42.0}))
    seconds = {}
    with stopwatch(seconds, "TA"):
        assert evalcache.Memo("world", state(), "val", 500)("digits", Compute()) == 90.0
    assert 42.0 <= seconds["TA"] < 43.0


def test_the_head_is_digested_only_when_the_cache_is_used(cache):
    salts = []

    def salt() -> str:
        salts.append(1)
        return "head"

    with evalcache.using("off"):
        evalcache.Memo("world", state(), "val", 500)("digits", Compute(), salt)
    evalcache.Memo("", state(), "val", 500)("digits", Compute(), salt)
    assert salts == []
    evalcache.Memo("world", state(), "val", 500)("digits", Compute(), salt)
    assert salts == [1]


def test_answers_and_tensors_are_remembered_by_kind(cache):
    answers = Compute(value=["16", "blue"])
    assert evalcache.remember("world", ["w", "prompts"], answers, kind="answers") == ["16", "blue"]
    assert evalcache.remember("world", ["w", "prompts"], answers, kind="answers") == ["16", "blue"]
    features = Compute(value=torch.arange(6.0).reshape(2, 3))
    first = evalcache.remember("world", ["w", "prompts"], features, kind="tensor")
    again = evalcache.remember("world", ["w", "prompts"], features, kind="tensor")
    assert torch.equal(first, again) and again.dtype == torch.float32
    assert (answers.calls, features.calls) == (1, 1)  # same parts, another kind: its own entry
    other = Compute(value=["17", "blue"])
    assert evalcache.remember("world", ["w", "other prompts"], other, kind="answers")[0] == "17"
    assert other.calls == 1


def test_damaged_answers_and_tensors_are_computed_again(cache):
    evalcache.remember("world", ["p"], Compute(value=["a"]), kind="answers")
    evalcache.remember("world", ["p"], Compute(value=torch.ones(2)), kind="tensor")
    [answers] = cache.rglob("*.json")
    [tensor] = cache.rglob("*.safetensors")
    answers.write_text(json.dumps({"value": [1, 2], "seconds": 1.0}))  # not strings
    tensor.write_bytes(tensor.read_bytes()[:20])  # truncated
    fresh = Compute(value=["b"])
    assert evalcache.remember("world", ["p"], fresh, kind="answers") == ["b"] and fresh.calls == 1
    zeros = Compute(value=torch.zeros(2))
    assert torch.equal(evalcache.remember("world", ["p"], zeros, kind="tensor"), torch.zeros(2))
    assert zeros.calls == 1
    again = Compute(value=torch.ones(2))  # the rewritten entry is whole again
    assert torch.equal(evalcache.remember("world", ["p"], again, kind="tensor"), torch.zeros(2))
    assert again.calls == 0


def test_an_unwritable_cache_costs_speed_never_a_result(tmp_path, monkeypatch):
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(config, "CACHE_DIR", blocked)  # <file>/evals cannot be created
    with evalcache.using("on"):
        assert evalcache.Memo("world", state(), "val", 500)("digits", Compute()) == 87.5
        features = Compute(value=torch.ones(3))
        assert torch.equal(evalcache.remember("w", ["p"], features, kind="tensor"), torch.ones(3))
        assert evalcache.remember("w", ["p"], features, kind="tensor") is not None
        assert features.calls == 2  # nothing could be stored: computed each time
