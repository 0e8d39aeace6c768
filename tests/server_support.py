"""Helpers for the server and UI tests: a small real memory, a live uvicorn server."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np

import visual_memory as vm

TOKEN = "test-token-123"
REAL_PER_CLASS = 4  # real CIFAR images added through the encoder (they get thumbnails)


def build_base_memory(path: Path, cifar_root: Path, cifar_small: dict, encoder) -> Path:
    """200 cached CIFAR-10 embeddings (no thumbnails) + 40 real train images (with thumbnails)."""
    mem = vm.create(path, encoder=encoder)
    mem.add_embeddings(cifar_small["train_x"], list(cifar_small["train_y"]), ids=[f"emb-{i}" for i in range(len(cifar_small["train_x"]))],
                       source="cifar10-train (cached embedding)", encoder=encoder)
    used = {str(p) for p in cifar_small["train_paths"]}
    paths, labels = [], []
    for class_dir in sorted((cifar_root / "train").iterdir()):
        fresh = [p for p in sorted(class_dir.glob("*.jpg")) if str(p) not in used][:REAL_PER_CLASS]
        paths += fresh
        labels += [class_dir.name] * len(fresh)
    mem.add(paths, labels=labels)
    return path


def local_client(app):
    """FastAPI's TestClient speaking to the app as http://127.0.0.1 (the server refuses
    Host names it does not serve, such as TestClient's default "testserver")."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1")


def copy_memory(base: Path, dest: Path, encoder) -> "vm.Memory":
    shutil.copytree(base, dest)
    return vm.open(dest, encoder=encoder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=os.environ.get("VISMEM_TEST_LOG", "warning")))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def val_image(cifar_root: Path, label: str, i: int = 0) -> bytes:
    return (cifar_root / "val" / label / f"{4500 + i}.jpg").read_bytes()


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
