"""tools/expert_recipes.py: retrain the mini world's experts with another recipe, on a tiny zoo."""

import dataclasses

import pytest
import torch
from conftest import load_tool
from safetensors.torch import load_file
from test_zoo import TINY

from course_lib.models.linearized import Linearized
from course_lib.models.zoo import build_zoo, load_zoo


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    build_zoo(TINY, root, progress=False, log=lambda s: None, workers=1)
    return root


def _run(tool, root, out, *extra):
    return tool.main(["--out", str(out), "--root", str(root), "--workers", "1", "--limit", "8",
                      *extra])  # fmt: skip


@pytest.fixture
def tool():
    return load_tool("expert_recipes")


def test_parse_overrides_types_and_errors(tool):
    got = tool.parse_overrides(["lr=1e-3", "batch_size=32", "threads=none", "epochs=3"])
    assert got == {"lr": 0.001, "batch_size": 32, "threads": None, "epochs": 3}
    assert isinstance(got["batch_size"], int) and isinstance(got["lr"], float)
    with pytest.raises(ValueError, match="'learning_rate=1'"):
        tool.parse_overrides(["learning_rate=1"])
    with pytest.raises(ValueError, match="key=value"):
        tool.parse_overrides(["lr"])
    with pytest.raises(ValueError, match="'epochs=2.5': epochs takes int values"):
        tool.parse_overrides(["epochs=2.5"])


def test_the_zoo_recipe_gives_the_zoo_experts_bit_for_bit(tool, tiny_zoo, tmp_path):
    result = _run(tool, tiny_zoo, tmp_path)
    zoo = load_zoo("mini", cfg=TINY, root=tiny_zoo, build=False, progress=False)
    for name in TINY.tasks:
        trial = load_file(str(tmp_path / f"expert_{name}.safetensors"))
        for key, value in zoo.experts[name].items():
            assert torch.equal(trial[key], value), (name, key)
    assert set(result) >= {"zero-shot", "experts", "weight averaging", "task arithmetic"}
    assert list(result["per expert"]) == list(TINY.tasks)
    assert result["tau/theta0"] > 0
    assert set(result["task arithmetic"]) == set(tool.LAMBDAS_TA)
    xi = result["xi(1, 1) over pairs"]
    assert 0 <= xi["min"] <= xi["mean"] <= xi["max"] <= 2


def test_a_changed_recipe_and_frozen_parameters(tool, tiny_zoo, tmp_path):
    _run(tool, tiny_zoo, tmp_path, "lr=1e-2", "--freeze", r"embeddings\.", "--head-scale", "50")
    zoo = load_zoo("mini", cfg=TINY, root=tiny_zoo, build=False, progress=False)
    trial = load_file(str(tmp_path / "expert_digits.safetensors"))
    frozen = [k for k in trial if "embeddings." in k]
    assert frozen, "the tiny encoder has embedding parameters"
    for key in frozen:
        assert torch.equal(trial[key], zoo.pretrained[key]), key
    moved = [k for k in trial if not torch.equal(trial[k], zoo.experts["digits"][k])]
    assert moved, "another learning rate must give another expert"


def test_the_recipe_starts_from_the_zoo_manifest(tool, tiny_zoo, tmp_path):
    cfg = tool.zoo_config(tiny_zoo)
    assert cfg.digest() == TINY.digest()
    assert cfg.finetune == TINY.finetune  # epochs=1: TINY's recipe, not the default
    with pytest.raises(FileNotFoundError, match="make zoo"):
        tool.zoo_config(tmp_path)


def test_bad_recipes_and_a_reused_folder_are_refused(tool, tiny_zoo, tmp_path):
    with pytest.raises(ValueError, match="head_scale must be > 0"):
        tool.Recipe(head_scale=0.0)
    with pytest.raises(ValueError, match="'no_such_layer' matches no encoder parameter"):
        _run(tool, tiny_zoo, tmp_path / "a", "--freeze", "no_such_layer")
    _run(tool, tiny_zoo, tmp_path / "b", "epochs=1")
    saved = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b").glob("expert_*")}
    _run(tool, tiny_zoo, tmp_path / "b", "epochs=1")  # the same recipe resumes: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b").glob("expert_*")} == saved
    with pytest.raises(ValueError, match="another recipe or zoo"):
        _run(tool, tiny_zoo, tmp_path / "b", "lr=1e-2")


def test_linearized_experts_and_the_linearized_zoo(tool, tiny_zoo, tmp_path):
    """--linearized trains f(x; theta_0) + J(x) (theta - theta_0): its experts are stored with the
    encoder's keys, and the zoo's linearized() view evaluates them through the same expansion."""
    result = _run(tool, tiny_zoo, tmp_path, "--linearized")
    zoo = load_zoo("mini", cfg=TINY, root=tiny_zoo, build=False, progress=False)
    lin = zoo.linearized()
    assert lin.linear and not zoo.linear and lin.linearized() is lin
    assert lin.world != zoo.world  # remembered apart: the two encoders answer differently
    assert isinstance(lin.classifier("digits").encoder, Linearized)
    expert = load_file(str(tmp_path / "expert_digits.safetensors"))
    assert list(expert) == list(zoo.experts["digits"])
    assert any(not torch.equal(expert[k], v) for k, v in zoo.experts["digits"].items())
    x, _ = next(zoo.tasks["digits"].batches("val", 8))
    with torch.no_grad():
        plain = zoo.encoder()(pixel_values=x).image_embeds
        torch.testing.assert_close(lin.encoder()(pixel_values=x).image_embeds, plain,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip  # at theta_0: the same
        moved = lin.encoder(expert)(pixel_values=x).image_embeds
        assert not torch.allclose(moved, zoo.encoder(expert)(pixel_values=x).image_embeds)
    trial = dataclasses.replace(lin, experts={"digits": expert})
    assert (
        trial.evaluate(expert, "val", ["digits"], limit=8)["digits"]
        == (result["per expert"]["digits"])
    )
