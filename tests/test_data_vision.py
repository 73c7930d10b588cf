"""The mini world's data: deterministic, well-typed, balanced, leak-free and nameable."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib.data import vision  # noqa: E402
from course_lib.data.base import SPLITS  # noqa: E402

SMALL = {"train": 60, "val": 20, "test": 40}
PROCEDURAL = ("shapes", "glyphs", "textures", "colors", "positions", "street_digits")


@pytest.fixture(scope="module")
def tasks():
    return vision.load_tasks("mini", seed=0, sizes=SMALL)


def pixels(task, split="train"):
    return task.splits[split][:]["pixels"]


def test_all_eight_tasks_in_stable_order(tasks):
    assert len(vision.TASKS) == 8
    assert list(tasks) == list(vision.TASKS)


@pytest.mark.parametrize("name", vision.TASKS)
def test_shapes_dtypes_and_names(tasks, name):
    task = tasks[name]
    assert isinstance(task, vision.MiniVisionTask)
    assert 6 <= task.num_classes <= 10
    assert all(c == c.lower() for c in task.classnames)
    assert 2 <= len(task.templates) <= 4 and all(t.count("{}") == 1 for t in task.templates)
    for split in SPLITS:
        stored = task.splits[split]
        assert len(stored) == SMALL[split]
        batch = stored[0:5]
        assert batch["pixels"].dtype == np.uint8
        assert batch["pixels"].shape == (5, 3, vision.IMAGE_SIZE, vision.IMAGE_SIZE)
        assert batch["label"].dtype == np.int64
        assert stored[[3, 1]]["pixels"].dtype == np.uint8  # the random-access path too
        assert task.labels(split).dtype == torch.int64
    x, y = next(task.batches("test", batch_size=7))
    assert x.dtype == torch.float32 and x.shape == (7, 3, 32, 32)
    assert y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0


@pytest.mark.parametrize("name", vision.TASKS)
def test_classes_roughly_balanced(tasks, name):
    task = tasks[name]
    counts = np.bincount(task.labels("train").numpy(), minlength=task.num_classes)
    assert counts.min() >= SMALL["train"] // task.num_classes - 1
    assert counts.max() <= SMALL["train"] // task.num_classes + 1


@pytest.mark.parametrize("name", ["shapes", "digits", "fashion", "street_digits"])
def test_deterministic_from_seed(tasks, name):
    again = vision.load_task(name, "mini", seed=0, sizes=SMALL)
    other = vision.load_task(name, "mini", seed=1, sizes=SMALL)
    for split in SPLITS:
        assert np.array_equal(pixels(again, split), pixels(tasks[name], split))
    assert not np.array_equal(pixels(other), pixels(tasks[name]))


def test_splits_differ(tasks):
    task = tasks["glyphs"]
    assert not np.array_equal(pixels(task, "train")[:20], pixels(task, "val")[:20])


@pytest.mark.parametrize("name", ["digits", "fashion"])
def test_real_tasks_share_no_source_between_splits(name):
    task = vision.load_task(name, "mini", sizes={"train": 400, "val": 100, "test": 200})
    sources = {s: set(task.splits[s]["source"][:].tolist()) for s in SPLITS}
    assert not sources["train"] & sources["test"]
    assert not sources["train"] & sources["val"]
    assert not sources["val"] & sources["test"]


def test_vocabulary_covers_procedural_classes_and_prompts_not_fashion():
    vocab = set(vision.corpus_vocabulary())
    assert all(w == w.lower() for w in vocab)
    for name in PROCEDURAL:
        for cname in vision._CLASSNAMES[name]:
            assert set(vision.words(cname)) <= vocab, cname
    for name in vision.TASKS:
        task_words = {w for t in vision._TEMPLATES[name] for w in vision.words(t.format("x"))}
        assert task_words - {"x"} <= vocab


def test_corpus_deterministic_typed_and_uses_vocabulary():
    images, captions = vision.caption_corpus(300, seed=3)
    assert images.shape == (300, 3, 32, 32) and images.dtype == np.uint8
    assert len(captions) == 300 and all(captions)
    again, captions_again = vision.caption_corpus(300, seed=3)
    assert np.array_equal(images, again) and captions == captions_again
    other, _ = vision.caption_corpus(300, seed=4)
    assert not np.array_equal(images, other)
    vocab = set(vision.corpus_vocabulary())
    used = {w for c in captions for w in vision.words(c)}
    assert used <= vocab
    assert not {"sneaker", "trouser", "pullover", "dress"} & used
    assert {"red", "star", "letter", "number"} & used


def test_corpus_complete_blocks_do_not_depend_on_n(monkeypatch):
    monkeypatch.setattr(vision, "_CORPUS_BLOCK", 32)
    short, caps_short = vision.caption_corpus(64, seed=0)
    long, caps_long = vision.caption_corpus(100, seed=0)
    assert np.array_equal(short, long[:64]) and caps_short == caps_long[:64]


def test_batches_shuffle_and_limit(tasks):
    task = tasks["shapes"]
    plain = torch.cat([y for _, y in task.batches("train", batch_size=16)])
    assert torch.equal(plain, task.labels("train"))
    limited = [y for _, y in task.batches("train", batch_size=16, limit=40)]
    assert [len(y) for y in limited] == [16, 16, 8]
    shuffled = torch.cat([y for _, y in task.batches("train", batch_size=16, shuffle=True, seed=5)])
    assert not torch.equal(shuffled, plain)
    assert torch.equal(shuffled.sort().values, plain.sort().values)
    again = torch.cat([y for _, y in task.batches("train", batch_size=16, shuffle=True, seed=5)])
    assert torch.equal(again, shuffled)
    for bad in (0, -5, 2.5):  # 0 evaluated nothing (then a bare torch.cat error)
        with pytest.raises(ValueError, match="limit must be an integer >= 1"):
            next(task.batches("train", limit=bad))


def test_to_pixels_normalizes(tasks):
    task = tasks["colors"]
    raw = np.array([[[[0, 255]] * 2] * 3], dtype=np.uint8)
    out = task.to_pixels(raw)
    assert out.dtype == torch.float32
    assert out.min() == -1.0 and out.max() == 1.0


def test_preview_grid(tasks):
    task = tasks["textures"]
    fig = vision.preview_grid(task, per_class=3)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) == task.num_classes * 3
    assert fig.axes[0].get_ylabel() == task.classnames[0]
    plt.close(fig)


def test_unknown_task_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError, match="cifar") as err:
        vision.load_task("cifar", "mini")
    assert "street_digits" in str(err.value)


def test_uint8_survives_save_and_load(tasks, tmp_path):
    from datasets import load_from_disk

    task = tasks["positions"]
    task.splits["val"].save_to_disk(str(tmp_path / "val"))
    reloaded = load_from_disk(str(tmp_path / "val")).with_format("torch")  # the trap
    rebuilt = vision.MiniVisionTask(task.name, task.classnames, task.templates, {"val": reloaded})
    assert rebuilt.splits["val"][0:4]["pixels"].dtype == np.uint8
    x, _ = next(rebuilt.batches("val", batch_size=4))
    assert torch.equal(x, next(task.batches("val", batch_size=4))[0])


def test_full_profile_delegates_to_the_hub_module(monkeypatch):
    import sys
    import types

    import course_lib.data

    calls = []
    fake = types.ModuleType("course_lib.data.vision_hub")  # the real one imports transformers
    fake.FULL_TASKS = {n: None for n in vision.FULL_ANALOGUES.values()}
    fake.load_hub_task = lambda name, **kw: calls.append((name, kw))
    monkeypatch.setitem(sys.modules, "course_lib.data.vision_hub", fake)
    monkeypatch.setattr(course_lib.data, "vision_hub", fake, raising=False)
    vision.load_task("street_digits", "full", seed=3, sizes={"train": 5})
    vision.load_task("DTD", "full")
    assert calls == [
        ("SVHN", {"seed": 3, "sizes": {"train": 5}}),
        ("DTD", {"seed": 0, "sizes": None}),
    ]
    assert list(vision.load_tasks("full")) == [vision.FULL_ANALOGUES[n] for n in vision.TASKS]
    with pytest.raises(ValueError, match="cifar"):
        vision.load_task("cifar", "full")
