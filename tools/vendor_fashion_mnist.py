"""Reproduce the small Fashion-MNIST subset vendored in ``data/fashion_mnist/``.

The original IDX files come from the Debian package ``dataset-fashion-mnist`` (MIT, Zalando SE):

    apt-get download dataset-fashion-mnist
    dpkg-deb -x dataset-fashion-mnist_*_all.deb /tmp/fm
    python tools/vendor_fashion_mnist.py /tmp/fm/usr/share/datasets/fashion-mnist

The subset is class-balanced and drawn with a fixed seed: ``TRAIN_PER_CLASS`` images per class
from the original training set (the course splits them into train and val) and
``TEST_PER_CLASS`` per class from the original test set. Images stay 28x28 uint8.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 100
SEED = 0
OUT = Path(__file__).resolve().parent.parent / "data" / "fashion_mnist" / "fashion_mnist_subset.npz"


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST container format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random examples of every class, sorted."""
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(picks))


def main(src: str) -> None:
    root = Path(src)
    rng = np.random.default_rng(SEED)
    x_tr = read_idx(root / "train-images-idx3-ubyte.gz")
    y_tr = read_idx(root / "train-labels-idx1-ubyte.gz")
    x_te = read_idx(root / "t10k-images-idx3-ubyte.gz")
    y_te = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    i_tr = balanced_subset(y_tr, TRAIN_PER_CLASS, rng)
    i_te = balanced_subset(y_te, TEST_PER_CLASS, rng)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        train_images=x_tr[i_tr],
        train_labels=y_tr[i_tr],
        train_index=i_tr.astype(np.int32),
        test_images=x_te[i_te],
        test_labels=y_te[i_te],
        test_index=i_te.astype(np.int32),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB): {len(i_tr)} train, {len(i_te)} test")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
