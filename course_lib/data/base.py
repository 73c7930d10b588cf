"""What every image-classification task of the course looks like, in both profiles.

A task is a name, its class names, CLIP-style prompt templates and three splits. Models never
see a ``datasets.Dataset`` directly: they iterate :meth:`VisionTask.batches`, which yields
``(pixel_values float32 [B, 3, H, W], labels int64 [B])`` ready for the image encoder. The mini
profile stores 32x32 uint8 pixels; the full profile stores PIL images and preprocesses them the
way CLIP does (resize, centre crop, normalize). Subclasses only override :meth:`to_pixels`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from course_lib.state import check_count

SPLITS = ("train", "val", "test")


@dataclass
class VisionTask:
    """One classification task: ``splits[s]`` are ``datasets.Dataset`` with a ``label`` column."""

    name: str
    classnames: list[str]
    templates: list[str]  # each contains one "{}" for the class name
    splits: dict = field(repr=False)  # split name -> datasets.Dataset
    image_column: str = "pixels"

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def num_examples(self, split: str) -> int:
        return len(self._split(split))

    def prompts(self, classname: str) -> list[str]:
        """All templated prompts for one class, e.g. ``"a photo of a circle."``."""
        return [t.format(classname) for t in self.templates]

    def labels(self, split: str) -> Tensor:
        """All labels of a split as int64."""
        return torch.as_tensor(np.asarray(self._split(split)["label"]), dtype=torch.long)

    def to_pixels(self, images) -> Tensor:  # pragma: no cover - overridden
        """Turn a list/array of stored images into a float32 ``[B, 3, H, W]`` model input."""
        raise NotImplementedError

    def batches(
        self,
        split: str,
        batch_size: int = 256,
        *,
        shuffle: bool = False,
        seed: int = 0,
        limit: int | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(pixel_values, labels)`` batches; ``limit`` keeps the first n examples."""
        ds = self._split(split)
        if limit is not None:  # 0 would evaluate nothing, a negative one a surprise
            check_count("limit", limit)
        n = len(ds) if limit is None else min(limit, len(ds))
        order = np.arange(n)
        if shuffle:
            order = np.random.default_rng(seed).permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            rows = ds[idx.tolist()] if shuffle else ds[int(idx[0]) : int(idx[-1]) + 1]
            labels = torch.as_tensor(np.asarray(rows["label"]), dtype=torch.long)
            yield self.to_pixels(rows[self.image_column]), labels

    def _split(self, split: str):
        if split not in self.splits:
            raise ValueError(
                f"task {self.name!r} has no split {split!r}; it has {sorted(self.splits)}"
            )
        return self.splits[split]
