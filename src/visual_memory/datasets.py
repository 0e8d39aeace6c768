"""Real datasets available offline: CIFAR-10 (an ImageFolder) and Fashion-MNIST (Debian).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (MIT), which
installs the original IDX files under ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import VisualMemoryError

FASHION_MNIST_DIRS = (
    os.environ.get("VISMEM_FASHION_MNIST", ""),
    "/usr/share/datasets/fashion-mnist",
)
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dir() -> Optional[Path]:
    for d in FASHION_MNIST_DIRS:
        if d and (Path(d) / "train-images-idx3-ubyte.gz").is_file():
            return Path(d)
    return None


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, list[str]]:
    """Fashion-MNIST images and labels.

    Parameters
    ----------
    split : {"train", "test"}

    Returns
    -------
    images : uint8 array of shape (n, 28, 28)
    labels : list of str (class names, e.g. "sneaker")

    Raises
    ------
    VisualMemoryError
        If the dataset is not installed (says how to install it).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    root = fashion_mnist_dir()
    if root is None:
        raise VisualMemoryError(
            "Fashion-MNIST not found: install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) "
            "or point VISMEM_FASHION_MNIST at a folder with the IDX .gz files"
        )
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return images, [FASHION_MNIST_CLASSES[i] for i in labels]


def write_image_folder(images: np.ndarray, labels: list[str], root: str | os.PathLike, *, per_class: Optional[int] = None, offset: int = 0) -> Path:
    """Write uint8 images as PNGs into ``root/<label>/<index>.png`` (an ImageFolder).

    Takes the first ``per_class`` images of each label (all if None); ``offset``
    numbers the files, so train and held-out images never share a name.
    """
    from PIL import Image

    root = Path(root)
    counts: dict[str, int] = {}
    for i, (img, lab) in enumerate(zip(images, labels)):
        if per_class is not None and counts.get(lab, 0) >= per_class:
            continue
        counts[lab] = counts.get(lab, 0) + 1
        d = root / lab
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{offset + i:05d}.png"
        if not path.exists():
            Image.fromarray(img).save(path)
    return root


def embed_arrays(encoder, images: np.ndarray, *, progress: bool | str = False) -> np.ndarray:
    """Embed uint8 image arrays through the content-addressed embedding cache.

    The cache key is the SHA-256 of each array's bytes (the id `Memory.add`
    gives an array), so a second call embeds nothing.

    Parameters
    ----------
    encoder : Encoder
    images : uint8 array of shape (n, H, W) or (n, H, W, 3)

    Returns
    -------
    float32 array of shape (n, encoder.dim), rows L2-normalised.
    """
    import hashlib

    from .cache import embed_cached

    images = np.asarray(images)
    keys = [hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() for img in images]
    return embed_cached(encoder, images, keys, progress=progress)


def fashion_mnist_subset(classes, *, split: str = "train", per_class: int = 100) -> tuple[np.ndarray, list[str]]:
    """The first ``per_class`` Fashion-MNIST images of each of ``classes`` (file order kept).

    Raises
    ------
    ValueError
        Naming any class that Fashion-MNIST does not have (and listing those it has).
    """
    unknown = [c for c in classes if c not in FASHION_MNIST_CLASSES]
    if unknown:
        raise ValueError(f"unknown Fashion-MNIST class(es) {unknown}; choose from {', '.join(FASHION_MNIST_CLASSES)}")
    images, labels = load_fashion_mnist(split)
    counts: dict[str, int] = {}
    keep = []
    for i, lab in enumerate(labels):
        if lab in classes and counts.get(lab, 0) < per_class:
            counts[lab] = counts.get(lab, 0) + 1
            keep.append(i)
    return images[keep], [labels[i] for i in keep]
