"""Shared fixtures: real CIFAR-10 subsets, the real encoder, cached embeddings.

Real-image tests use small per-class subsets; embeddings go through the
content-addressed cache (visual_memory.cache), so a second run re-embeds
nothing. Data comes from $VISMEM_DATA or ../shared/data beside the repo.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("VISMEM_PROGRESS", "0")
# scikit-learn's estimator checks include an array-API check that runs only when SciPy's
# array-API support is on; SciPy reads this once, at import, so it is set before anything imports it.
os.environ.setdefault("SCIPY_ARRAY_API", "1")


def data_root() -> Path:
    root = Path(os.environ.get("VISMEM_DATA", REPO.parent / "shared" / "data"))
    if not (root / "cifar10" / "train").is_dir():
        pytest.fail(f"CIFAR-10 not found under {root}; set VISMEM_DATA to the folder holding cifar10/")
    return root


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    return data_root() / "cifar10"


@pytest.fixture(scope="session")
def encoder():
    from visual_memory.encoders import create_encoder

    return create_encoder("efficientnet-lite0")


@pytest.fixture(scope="session")
def cifar_small(cifar_root, encoder):
    """20 train + 10 val images per CIFAR-10 class, embedded (cached).

    Returns a dict with train_x (200, 1280), train_y, train_paths, val_x, val_y, val_paths.
    """
    from visual_memory.cache import embed_folder

    tx, ty, tp = embed_folder(encoder, cifar_root / "train", per_class=20)
    vx, vy, vp = embed_folder(encoder, cifar_root / "val", per_class=10)
    return {"train_x": tx, "train_y": ty, "train_paths": tp, "val_x": vx, "val_y": vy, "val_paths": vp}


@pytest.fixture
def memory_dir(tmp_path) -> Path:
    return tmp_path / "mem"


@pytest.fixture
def unit_vectors():
    """f(n, d, seed) -> (n, d) float32 unit vectors."""

    def make(n: int, d: int, seed: int = 0) -> np.ndarray:
        x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return make
