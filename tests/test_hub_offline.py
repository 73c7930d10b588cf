"""The full profile's hub loaders, run offline on tiny models and datasets saved in hub layout.

A tiny CLIP (both towers + tokenizer) and a perturbed ``CLIPVisionModel`` "expert" are written
with ``save_pretrained``; a tiny image dataset is written with ``save_to_disk`` and as parquet
shards (the layout of the hub datasets). Everything then goes through the same functions the
full profile calls with hub ids.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import ClassLabel, Dataset, DatasetDict, Features  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from course_lib.data import vision_hub  # noqa: E402
from course_lib.data.vision_hub import CLIP_MEAN, CLIP_STD, load_hub_task  # noqa: E402
from course_lib.models import hub  # noqa: E402

PROJ = 16
IMAGE = 32


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single characters (no merges): enough to encode prompts."""
    chars = string.ascii_lowercase + string.digits + '.:"'
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def tiny_clip_config() -> CLIPConfig:
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    # vision projection_dim left at its default (512) on purpose: CLIPModel uses the top level
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=8,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJ)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hub") / "clip"
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config()).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip(base_dir):
    model, tokenizer = hub.load_clip(str(base_dir))
    return model, tokenizer


@pytest.fixture(scope="module")
def base_state(clip):
    return hub.image_encoder_state(clip[0])


@pytest.fixture(scope="module")
def expert(tmp_path_factory, clip, base_state):
    """A saved expert (vision tower only) and the perturbation that made it, by encoder key."""
    g = torch.Generator().manual_seed(1)
    model = CLIPVisionModel(clip[0].config.vision_config)
    tower = {k: v for k, v in base_state.items() if k != hub.PROJECTION_KEY}
    delta = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in tower.items()}
    model.load_state_dict({k.removeprefix("vision_model."): tower[k] + delta[k] for k in tower})
    path = tmp_path_factory.mktemp("hub") / "expert"
    model.save_pretrained(path)
    return path, delta


# --- models -------------------------------------------------------------------------------


def test_offline_and_pins():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pin = hub.REVISIONS[hub.FULL_MODEL]
    assert len(pin) == 40 and all(c in "0123456789abcdef" for c in pin)
    assert hub.expert_id("Cars") == "tanganke/clip-vit-base-patch32_stanford-cars"
    assert hub.expert_id("gtsrb") == "tanganke/clip-vit-base-patch32_gtsrb"
    assert all(hub.expert_id(name) in hub.REVISIONS for name in vision_hub.FULL_TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        hub.expert_id("ImageNet")


def test_load_clip_model_and_tokenizer(clip):
    model, tokenizer = clip
    assert isinstance(model, CLIPModel) and not model.training
    batch = tokenizer(["a photo of a 7.", 'a photo of the number: "3".'], padding=True)
    ids = torch.tensor(batch["input_ids"])
    assert ids[0, 0].item() == 0 and 1 in ids[0].tolist()  # <|startoftext|> ... <|endoftext|>
    with torch.no_grad():
        text = model.get_text_features(
            input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"])
        )
    text = getattr(text, "pooler_output", text)
    assert text.shape == (2, PROJ)


def test_image_encoder_state_has_the_encoder_layout(clip, base_state):
    model = clip[0]
    reference = CLIPVisionModelWithProjection(hub.encoder_config(model)).state_dict()
    assert set(base_state) == set(reference)
    assert all(base_state[k].shape == reference[k].shape for k in reference)
    assert all(k.startswith("vision_model.") for k in base_state if k != hub.PROJECTION_KEY)
    assert torch.equal(base_state[hub.PROJECTION_KEY], model.visual_projection.weight)
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(base_state[key], model.vision_model.encoder.layers[0].mlp.fc1.weight)
    assert (
        base_state[key].data_ptr() != model.vision_model.encoder.layers[0].mlp.fc1.weight.data_ptr()
    )


def test_built_encoder_computes_the_clip_image_features(clip, base_state):
    model = clip[0]
    encoder = hub.build_image_encoder(hub.encoder_config(model), base_state)
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = encoder(pixel_values=pixels).image_embeds
        theirs = model.get_image_features(pixel_values=pixels)
    theirs = getattr(theirs, "pooler_output", theirs)
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="missing"):
        hub.build_image_encoder(hub.encoder_config(model), {hub.PROJECTION_KEY: torch.zeros(1)})


def test_expert_delta_is_the_perturbation(expert, base_state):
    path, delta = expert
    state = hub.load_expert("EuroSAT", base_state, model_id=str(path))
    assert set(state) == set(base_state)
    for k, d in delta.items():
        torch.testing.assert_close(state[k] - base_state[k], d, rtol=0, atol=1e-6)
    assert torch.equal(state[hub.PROJECTION_KEY], base_state[hub.PROJECTION_KEY])
    assert state[hub.PROJECTION_KEY].data_ptr() != base_state[hub.PROJECTION_KEY].data_ptr()


def test_expert_saved_by_transformers_4_loads_the_same(expert, base_state, tmp_path):
    """Hub experts predate transformers 5: their keys carry a ``vision_model.`` prefix."""
    path, _ = expert
    old = tmp_path / "expert_v4"
    old.mkdir()
    (old / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    assert not any(k.startswith("vision_model.") for k in tensors)  # transformers 5 layout
    save_file({"vision_model." + k: v for k, v in tensors.items()}, old / "model.safetensors")
    new_state = hub.load_expert("EuroSAT", base_state, model_id=str(path))
    old_state = hub.load_expert("EuroSAT", base_state, model_id=str(old))
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)


def test_expert_with_a_missing_tensor_is_refused(expert, base_state, tmp_path):
    path, _ = expert
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    del tensors["encoder.layers.1.mlp.fc2.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing_keys \[encoder\.layers\.1\.mlp\.fc2\.weight\]"):
        hub.load_expert("EuroSAT", base_state, model_id=str(broken))


def test_expert_must_match_the_base_state(expert, base_state):
    path, _ = expert
    key = "vision_model.post_layernorm.weight"
    wrong_shape = {**base_state, key: torch.zeros(5)}
    with pytest.raises(ValueError, match="wrong shape.*post_layernorm"):
        hub.load_expert("EuroSAT", wrong_shape, model_id=str(path))
    missing = {k: v for k, v in base_state.items() if k != key}
    with pytest.raises(ValueError, match="unexpected.*post_layernorm.weight"):
        hub.load_expert("EuroSAT", missing, model_id=str(path))
    wrong_dtype = {**base_state, key: base_state[key].double()}
    with pytest.raises(ValueError, match="dtype.*post_layernorm"):
        hub.load_expert("EuroSAT", wrong_dtype, model_id=str(path))
    with pytest.raises(ValueError, match="visual_projection"):
        hub.load_expert("EuroSAT", {key: base_state[key]}, model_id=str(path))


# --- data ---------------------------------------------------------------------------------

N_TRAIN, N_TEST = 40, 12
NAMES = ["banded", "bubbly_dots", "zigzagged"]


def colour(i: int) -> tuple[int, int, int]:
    return (i, 255 - i, (7 * i) % 256)


def tiny_split(offset: int, n: int) -> Dataset:
    """Solid-colour images of assorted sizes; the red channel identifies the example.

    Example 100 (the first test image) is stored grayscale: it must come out with 3 channels.
    """
    images = []
    for i in range(offset, offset + n):
        image = Image.new("RGB", (40 + i % 5 * 7, 30 + i % 3 * 11), colour(i))
        images.append(image.convert("L") if i == 100 else image)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=NAMES)})
    labels = [i % len(NAMES) for i in range(offset, offset + n)]
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    ds = DatasetDict({"train": tiny_split(0, N_TRAIN), "test": tiny_split(100, N_TEST)})
    ds.save_to_disk(root / "saved")
    for split, part in ds.items():  # the parquet layout of the hub datasets
        (root / "parquet" / "data").mkdir(parents=True, exist_ok=True)
        part.to_parquet(root / "parquet" / "data" / f"{split}-00000-of-00001.parquet")
    return {"saved": root / "saved", "parquet": root / "parquet"}


def permutation(n: int) -> list[int]:
    """The fixed order the hub loader serves a split of ``n`` examples in."""
    return np.random.default_rng(vision_hub.ORDER_SEED).permutation(n).tolist()


def ids(task, split: str) -> list[int]:
    return [im.convert("RGB").getpixel((0, 0))[0] for im in task.splits[split]["image"]]


@pytest.mark.parametrize("layout", ["saved", "parquet"])
def test_hub_task_splits_and_validation(image_dirs, layout):
    task = load_hub_task("DTD", data_dir=image_dirs[layout], image_size=IMAGE)
    assert isinstance(task, vision_hub.HubVisionTask)
    assert {s: task.num_examples(s) for s in ("train", "val", "test")} == {
        "train": 36,
        "val": 4,
        "test": N_TEST,
    }
    # the same examples as FusionBench's train_validation_split(fraction 0.1, seed 0)
    g = torch.Generator().manual_seed(0)
    _, fb_val = torch.utils.data.random_split(range(N_TRAIN), [36, 4], generator=g)
    assert sorted(ids(task, "val")) == sorted(fb_val.indices)
    # ... served in one fixed random order, whatever the layout
    assert ids(task, "val") == [sorted(fb_val.indices)[i] for i in permutation(4)]
    assert sorted(ids(task, "train") + ids(task, "val")) == list(range(N_TRAIN))
    assert task.classnames == ["banded", "bubbly dots", "zigzagged"]
    assert task.templates == list(vision_hub.FULL_TASKS["DTD"].templates)
    assert task.prompts("banded")[0] == "a photo of a banded texture."
    assert task.labels("val").dtype == torch.int64


def test_hub_task_batches_are_clip_preprocessed(image_dirs):
    task = load_hub_task("DTD", data_dir=image_dirs["saved"], image_size=IMAGE)
    pixels, labels = next(task.batches("test", batch_size=N_TEST))
    assert pixels.shape == (N_TEST, 3, IMAGE, IMAGE) and pixels.dtype == torch.float32
    assert labels.dtype == torch.int64
    served = [100 + int(i) for i in permutation(N_TEST)]  # the examples, in the served order
    assert labels.tolist() == [i % 3 for i in served]
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    for j, i in enumerate(served):
        if i == 100:  # stored as a grayscale ("L") image: three equal channels
            grey = pixels[j] * std + mean
            torch.testing.assert_close(grey[0], grey[1])
            torch.testing.assert_close(grey[1], grey[2])
            continue
        # solid colours survive resize + crop
        expected = (torch.tensor(colour(i), dtype=torch.float32)[:, None, None] / 255 - mean) / std
        torch.testing.assert_close(pixels[j], expected.expand(3, IMAGE, IMAGE))


def test_hub_task_limit_sees_every_class(tmp_path):
    """The hub stores images class by class; the first ``limit`` served must not be one class."""
    n = 30
    images = [Image.new("RGB", (16, 16), colour(i)) for i in range(n)]
    labels = [i * len(NAMES) // n for i in range(n)]  # 0 x 10, 1 x 10, 2 x 10: sorted by class
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=NAMES)})
    split = Dataset.from_dict({"image": images, "label": labels}, features=features)
    DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "sorted")
    task = load_hub_task("DTD", data_dir=tmp_path / "sorted", image_size=IMAGE)
    _, first = next(task.batches("test", batch_size=9, limit=9))
    assert set(first.tolist()) == {0, 1, 2}  # in dataset order: nine 0s
    assert sorted(task.labels("test").tolist()) == labels  # the same examples, reordered
    assert task.labels("test").tolist() == [labels[i] for i in permutation(n)]


def test_hub_task_subsets_are_deterministic(image_dirs):
    def load(seed):
        return load_hub_task(
            "DTD", data_dir=image_dirs["saved"], sizes={"train": 10, "test": 5}, seed=seed
        )

    a, b, c = load(1), load(1), load(2)
    assert (a.num_examples("train"), a.num_examples("val"), a.num_examples("test")) == (10, 4, 5)
    assert ids(a, "train") == ids(b, "train") and ids(a, "test") == ids(b, "test")
    assert ids(a, "train") != ids(c, "train")
    assert ids(a, "val") == ids(c, "val")  # validation examples never depend on the seed
    assert load_hub_task("DTD", data_dir=image_dirs["saved"], sizes=3).num_examples("val") == 3


def test_hub_task_errors(image_dirs):
    with pytest.raises(ValueError, match="unknown task"):
        load_hub_task("ImageNet", data_dir=image_dirs["saved"])
    with pytest.raises(ValueError, match="3 classes.*10"):  # EuroSAT lists its own 10 names
        load_hub_task("EuroSAT", data_dir=image_dirs["saved"])


def test_full_task_table():
    assert list(vision_hub.FULL_TASKS) == [
        "SUN397",
        "Cars",
        "RESISC45",
        "EuroSAT",
        "SVHN",
        "GTSRB",
        "MNIST",
        "DTD",
    ]
    assert vision_hub.FULL_TASKS["SVHN"].config == "cropped_digits"
    assert len(vision_hub.GTSRB_CLASSNAMES) == 43 and len(vision_hub.EUROSAT_CLASSNAMES) == 10
    for spec in vision_hub.FULL_TASKS.values():
        assert spec.templates and all(t.count("{}") == 1 for t in spec.templates)


def test_full_templates_are_fusionbenchs():
    """The experts were fine-tuned against heads from FusionBench's prompt lists: same lists."""
    counts = {n: len(spec.templates) for n, spec in vision_hub.FULL_TASKS.items()}
    assert counts == {
        "SUN397": 2,
        "Cars": 8,
        "RESISC45": 18,
        "EuroSAT": 3,
        "SVHN": 1,
        "GTSRB": 3,
        "MNIST": 1,
        "DTD": 8,
    }
    prompts = {n: [t.format("x") for t in s.templates] for n, s in vision_hub.FULL_TASKS.items()}
    assert prompts["MNIST"] == prompts["SVHN"] == ['a photo of the number: "x".']
    assert prompts["EuroSAT"][1] == "a centered satellite photo of a x."
    assert prompts["GTSRB"][2] == 'a close up photo of a "x" traffic sign.'
    assert prompts["RESISC45"][0] == "satellite imagery of x."
    assert prompts["RESISC45"][-1] == "aerial view of the x."
    assert prompts["DTD"][3] == "a photo of a x object."
    assert prompts["Cars"][3] == "i love my x!"
    assert all(len(set(p)) == len(p) for p in prompts.values())


def test_full_heads_are_rebuilt_when_their_prompts_change(clip, tmp_path, monkeypatch):
    from course_lib.data.base import VisionTask
    from course_lib.models import zoo

    model, tokenizer = clip
    tasks = {"DTD": VisionTask("DTD", ["banded", "dotted"], ["a {}."], splits={})}
    path = tmp_path / "heads.safetensors"
    built = zoo._full_heads(path, model, tokenizer, tasks)
    assert built["DTD"].shape == (2, PROJ) and path.exists()

    def no_build(*args, **kwargs):
        raise AssertionError("the stored heads should have been read")

    with monkeypatch.context() as m:  # same model, names and templates: read back
        m.setattr(zoo, "zeroshot_head", no_build)
        torch.testing.assert_close(
            zoo._full_heads(path, model, tokenizer, tasks)["DTD"], built["DTD"]
        )
    tasks["DTD"].templates = ["a photo of a {} texture."]  # other prompts: another head
    rebuilt = zoo._full_heads(path, model, tokenizer, tasks)
    assert not torch.allclose(rebuilt["DTD"], built["DTD"])
    torch.testing.assert_close(load_file(str(path))["DTD"], rebuilt["DTD"])


def test_data_digest_names_the_data_served(image_dirs, tmp_path):
    """The full profile's datasets are not pinned: the evaluation cache keys each task by the
    data it serves, so an accuracy is not served for other data."""
    saved = load_hub_task("DTD", data_dir=image_dirs["saved"], image_size=IMAGE)
    again = load_hub_task("DTD", data_dir=image_dirs["saved"], image_size=IMAGE)
    parquet = load_hub_task("DTD", data_dir=image_dirs["parquet"], image_size=IMAGE)
    fewer = load_hub_task("DTD", data_dir=image_dirs["saved"], sizes=5, image_size=IMAGE)
    digest = vision_hub.data_digest
    assert digest(saved) == digest(again)
    assert len({digest(saved), digest(parquet), digest(fewer)}) == 3

    from course_lib.models.zoo import Zoo

    head = torch.zeros(3, PROJ)
    zoo = Zoo("full", {"DTD": saved}, {}, {}, {"DTD": head}, None, data={"DTD": digest(saved)})
    other = Zoo("full", {"DTD": fewer}, {}, {}, {"DTD": head}, None, data={"DTD": digest(fewer)})
    assert zoo.task_salt("DTD") != other.task_salt("DTD")
    assert Zoo("mini", {}, {}, {}, {"DTD": head}, None).task_salt("DTD") in zoo.task_salt("DTD")
