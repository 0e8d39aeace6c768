"""The paper's headline evaluation on real CIFAR-10: train (45,000) in memory, val (5,000) as queries.

    python benchmarks/cifar10_eval.py [MEMORY_DIR]   # then: vismem eval MEMORY_DIR ../shared/data/cifar10/val --json ...

Embeddings go through the content-addressed cache (visual_memory.cache), so the
memory holds exactly the vectors `vismem add` would compute for these files
(same encoder, same preprocessing), without embedding twice. Records get the
same ids `add` gives (SHA-256 of the file bytes) and their paths as source.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import visual_memory as vm
from visual_memory.cache import embed_folder, file_sha256
from visual_memory.encoders import create_encoder


def main() -> None:
    data = Path(os.environ.get("VISMEM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "cifar10"
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cifar10.vm")
    if out.exists():
        shutil.rmtree(out)
    enc = create_encoder("efficientnet-lite0")
    t = time.perf_counter()
    x, y, paths = embed_folder(enc, data / "train", progress="embedding cifar10/train")
    print(f"train embeddings: {x.shape} in {time.perf_counter() - t:.0f}s")
    mem = vm.create(out, encoder=enc)
    t = time.perf_counter()
    mem.add_embeddings(x, y, ids=[file_sha256(p) for p in paths], source="cifar10/train")
    print(f"memory: {len(mem)} records at {out} in {time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
    main()
