"""The eight vision tasks of the full profile, loaded from the Hugging Face hub.

The full profile evaluates CLIP ViT-B/32 and its merges on the eight tasks of Ilharco et al.
(SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD) with the datasets and splits
FusionBench uses: the published test split is the test set, and 10% of the train split, drawn
with ``torch.randperm`` under seed 0 as in ``fusion_bench.utils.data.train_validation_split``,
becomes the validation set. The tasks are :class:`~course_lib.data.base.VisionTask` objects like
the mini profile's: they store PIL images and preprocess them the way CLIP does (RGB, shorter side
resized to 224 with bicubic filtering, centre crop, CLIP mean/std normalization).

Class names come from each dataset's ``ClassLabel`` feature (underscores become spaces), except
for EuroSAT and GTSRB, whose label names are codes or numbers: there we use the descriptive names
of the CLIP paper's prompts (as also used by FusionBench and the task_vectors code), in label
order. The prompt templates are the ones FusionBench builds its zero-shot heads from
(``fusion_bench/tasks/clip_classification/<task>.py``, which keep the task_vectors code's lists):
the published experts were fine-tuned against those frozen heads, so a head made from other
prompts is another classifier and lowers every expert's and merge's accuracy.

Every split is served in one fixed random order (:data:`ORDER_SEED`): the hub datasets are
stored sorted by label, and the course often evaluates the first ``limit`` examples of a split,
which would otherwise be the first few classes only.

``load_hub_task(name, data_dir=...)`` reads a local copy instead (a ``save_to_disk`` folder or any
folder ``datasets.load_dataset`` understands), which is how the tests run offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset, load_from_disk
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from course_lib.data.base import VisionTask

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VAL_FRACTION = 0.1  # FusionBench: validation_fraction 0.1, random_seed 0
VAL_SEED = 0
ORDER_SEED = 0  # the one fixed order every split is served in (see the module docstring)

# Descriptive EuroSAT names in label order (AnnualCrop, Forest, HerbaceousVegetation, Highway,
# Industrial, Pasture, PermanentCrop, Residential, River, SeaLake), from the CLIP prompts.
EUROSAT_CLASSNAMES = (
    "annual crop land",
    "forest",
    "brushland or shrubland",
    "highway or road",
    "industrial buildings or commercial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings or homes or apartments",
    "river",
    "lake or sea",
)

# The 43 GTSRB classes (label 0 = 20 km/h limit ... 42), verbatim from the CLIP prompts,
# spelling included, so that zero-shot numbers stay comparable with published ones.
GTSRB_CLASSNAMES = (
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)

# Prompt templates per task, as FusionBench lists them (see the module docstring).
PHOTO = ("a photo of a {}.", "a photo of the {}.")
CAR = PHOTO + (
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)
AERIAL = tuple(
    f"{kind} {view} of {article}{{}}."
    for article in ("", "a ", "the ")
    for kind, view in (
        ("satellite", "imagery"),
        ("aerial", "imagery"),
        ("satellite", "photo"),
        ("aerial", "photo"),
        ("satellite", "view"),
        ("aerial", "view"),
    )
)
SATELLITE = tuple(f"a centered satellite photo of {a}{{}}." for a in ("", "a ", "the "))
NUMBER = ('a photo of the number: "{}".',)
TRAFFIC_SIGN = tuple(
    f'a {view} photo of a "{{}}" traffic sign.' for view in ("zoomed in", "centered", "close up")
)
TEXTURE = tuple(
    f"a photo of {article} {{}} {kind}."
    for article in ("a", "the")
    for kind in ("texture", "pattern", "thing", "object")
)


@dataclass(frozen=True)
class HubTaskSpec:
    """Where one full-profile task lives on the hub and how to read it."""

    dataset: str  # hub dataset id
    expert: str  # suffix of the FusionBench expert: tanganke/clip-vit-base-patch32_<expert>
    templates: tuple[str, ...]
    config: str | None = None  # dataset configuration name
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    classnames: tuple[str, ...] | None = None  # None: from the ClassLabel feature


FULL_TASKS: dict[str, HubTaskSpec] = {
    "SUN397": HubTaskSpec("tanganke/sun397", "sun397", PHOTO),
    "Cars": HubTaskSpec("tanganke/stanford_cars", "stanford-cars", CAR),
    "RESISC45": HubTaskSpec("tanganke/resisc45", "resisc45", AERIAL),
    "EuroSAT": HubTaskSpec("tanganke/eurosat", "eurosat", SATELLITE, classnames=EUROSAT_CLASSNAMES),
    "SVHN": HubTaskSpec("ufldl-stanford/svhn", "svhn", NUMBER, config="cropped_digits"),
    "GTSRB": HubTaskSpec("tanganke/gtsrb", "gtsrb", TRAFFIC_SIGN, classnames=GTSRB_CLASSNAMES),
    "MNIST": HubTaskSpec("ylecun/mnist", "mnist", NUMBER),
    "DTD": HubTaskSpec("tanganke/dtd", "dtd", TEXTURE),
}


def clip_transform(image_size: int = 224) -> v2.Compose:
    """CLIP's preprocessing of one PIL image: resize, centre crop, scale to [0, 1], normalize."""
    return v2.Compose(
        [
            v2.Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise TypeError(f"expected PIL images or uint8 arrays, got {type(image).__name__}")


@dataclass
class HubVisionTask(VisionTask):
    """A hub task: splits hold PIL images, preprocessed on the fly as CLIP does."""

    image_size: int = 224

    def __post_init__(self) -> None:
        self._transform = clip_transform(self.image_size)

    def to_pixels(self, images) -> Tensor:
        """PIL images (any mode, any size) -> float32 ``[B, 3, image_size, image_size]``."""
        return torch.stack([self._transform(_as_pil(im).convert("RGB")) for im in images])


def data_digest(task: VisionTask) -> str:
    """What a task's accuracies depend on besides the weights and the head: the data served.

    The datasets' revisions are not pinned (``hub.REVISIONS``), so the evaluation cache must not
    serve an accuracy measured on other data. The digest covers each split's source files (the
    ``datasets`` cache path carries the dataset's commit), its size and its features."""
    parts = []
    for split, ds in sorted(task.splits.items()):
        files = sorted(Path(f["filename"]).as_posix() for f in ds.cache_files)
        parts.append([split, ds.num_rows, files, repr(ds.features)])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def validation_indices(n: int, seed: int = VAL_SEED, fraction: float = VAL_FRACTION) -> np.ndarray:
    """Indices of the validation examples carved out of a train split of ``n`` examples.

    Same examples as FusionBench's ``train_validation_split`` (``torch.utils.data.random_split``
    with a generator seeded by ``seed``: the last ``int(n * fraction)`` of ``randperm(n)``),
    returned sorted.
    """
    n_val = int(n * fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(perm[n - n_val :])


def carve_validation(train: Dataset, seed: int = VAL_SEED) -> tuple[Dataset, Dataset]:
    """Split a hub train split into (train, val), both in dataset order."""
    val_idx = validation_indices(len(train), seed)
    keep = np.ones(len(train), dtype=bool)
    keep[val_idx] = False
    return train.select(np.flatnonzero(keep)), train.select(val_idx)


def subsample(ds: Dataset, size: int | None, seed: int = 0) -> Dataset:
    """A deterministic random subset of ``size`` examples (in dataset order); all if None."""
    if size is None or size >= len(ds):
        return ds
    idx = np.random.default_rng(seed).permutation(len(ds))[:size]
    return ds.select(np.sort(idx))


def fixed_order(ds: Dataset, seed: int = ORDER_SEED) -> Dataset:
    """``ds`` in one fixed random order, so that its first ``n`` examples are a uniform sample.

    The hub's image datasets are stored class by class; without this, ``batches(..., limit=n)``
    (the first ``n`` examples) would see only the first classes of a task."""
    return ds.select(np.random.default_rng(seed).permutation(len(ds)))


def _read(spec: HubTaskSpec, revision: str | None, data_dir: str | os.PathLike | None):
    """The raw DatasetDict: a local copy when ``data_dir`` is given, else the hub dataset."""
    if data_dir is None:
        return load_dataset(spec.dataset, spec.config, revision=revision)
    path = Path(data_dir)
    if (path / "dataset_dict.json").exists():
        return load_from_disk(str(path))
    return load_dataset(str(path), spec.config)


def _classnames(spec: HubTaskSpec, name: str, label_feature) -> list[str]:
    """Class names in label order, checked against the dataset's ClassLabel when there is one."""
    found = label_feature.names if isinstance(label_feature, ClassLabel) else None
    if spec.classnames is not None:
        if found is not None and len(found) != len(spec.classnames):
            raise ValueError(
                f"{name}: the dataset has {len(found)} classes, the course lists "
                f"{len(spec.classnames)}"
            )
        return list(spec.classnames)
    if found is None:
        raise ValueError(f"{name}: column {spec.label_column!r} is not a ClassLabel; no names")
    return [c.replace("_", " ").strip() for c in found]


def _tidy(ds: Dataset, spec: HubTaskSpec) -> Dataset:
    """Keep the image and label columns; the label column is called ``label``."""
    ds = ds.select_columns([spec.image_column, spec.label_column])
    if spec.label_column != "label":
        ds = ds.rename_column(spec.label_column, "label")
    return ds


def load_hub_task(
    name: str,
    *,
    seed: int = 0,
    sizes: int | Mapping[str, int] | None = None,
    revision: str | None = None,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 224,
) -> HubVisionTask:
    """One full-profile task with train/val/test splits.

    ``sizes`` keeps at most that many examples per split (an int for all splits, or a mapping
    such as ``{"train": 2000, "test": 500}``) for quick runs, drawn with ``seed``. Each split is
    then served in a fixed random order (:func:`fixed_order`), the same whatever ``seed``. The
    validation examples are always FusionBench's (seed 0) whatever ``seed`` is. ``revision``
    pins the hub dataset; ``data_dir`` reads a local copy; ``image_size`` should be the
    model's ``vision_config.image_size``.
    """
    if name not in FULL_TASKS:
        raise ValueError(f"unknown task {name!r}; the full profile has {list(FULL_TASKS)}")
    spec = FULL_TASKS[name]
    raw = _read(spec, revision, data_dir)
    if not isinstance(raw, DatasetDict) or "train" not in raw or spec.test_split not in raw:
        found = list(raw) if isinstance(raw, DatasetDict) else type(raw).__name__
        raise ValueError(f"{name}: need 'train' and {spec.test_split!r} splits, found {found}")
    train, val = carve_validation(raw["train"])
    splits = {"train": train, "val": val, "test": raw[spec.test_split]}
    if sizes is not None:
        per_split = sizes if isinstance(sizes, Mapping) else dict.fromkeys(splits, sizes)
        splits = {s: subsample(ds, per_split.get(s), seed) for s, ds in splits.items()}
    splits = {s: fixed_order(ds) for s, ds in splits.items()}
    return HubVisionTask(
        name=name,
        classnames=_classnames(spec, name, raw["train"].features[spec.label_column]),
        templates=list(spec.templates),
        splits={s: _tidy(ds, spec) for s, ds in splits.items()},
        image_column=spec.image_column,
        image_size=image_size,
    )
