"""Shared by the re-rank tests: a small real memory with thumbnails, and reranker factories."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import visual_memory as vm
from visual_memory.rerank import OpenAIBackend, VLMReranker

PER_CLASS = 4  # memory images per CIFAR-10 class


def build_memory(path: Path, cifar_small: dict, encoder) -> Path:
    """40 real CIFAR-10 train images (4 per class), added with their cached embeddings: real thumbnails."""
    keep, seen = [], {}
    for i, lab in enumerate(cifar_small["train_y"]):
        if seen.get(lab, 0) < PER_CLASS:
            seen[lab] = seen.get(lab, 0) + 1
            keep.append(i)
    mem = vm.create(path, encoder=encoder)
    mem.add([cifar_small["train_paths"][i] for i in keep], labels=[cifar_small["train_y"][i] for i in keep],
            vectors=cifar_small["train_x"][keep])
    return path


def copy_memory(base: Path, dest: Path, encoder) -> "vm.Memory":
    shutil.copytree(base, dest)
    return vm.open(dest, encoder=encoder)


def openai_reranker(double, *, model: str = "double-vlm", timeout: float = 2.0, cache=False, **kw) -> VLMReranker:
    kw.setdefault("backoff", 0.01)
    return VLMReranker(OpenAIBackend(double.openai_url, model=model, timeout=timeout), cache=cache, **kw)


def queries(cifar_small: dict, n: int, start: int = 0) -> tuple[np.ndarray, list, list]:
    """n validation queries spread over the classes: (vectors, paths, labels)."""
    idx = list(range(start, len(cifar_small["val_y"]), 10))[:n]
    return cifar_small["val_x"][idx], [cifar_small["val_paths"][i] for i in idx], [cifar_small["val_y"][i] for i in idx]
