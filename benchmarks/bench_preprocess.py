"""Which preprocessing suits EfficientNet-Lite0 on small images? kNN accuracy per variant.

Memory = first PER_CLASS CIFAR-10 train images per class, queries = first
QUERIES val images per class; exact search, rank vote (k=10) and 1-NN.

    VISMEM_DATA=../shared/data python benchmarks/bench_preprocess.py [PER_CLASS] [QUERIES]

Prints a table and writes benchmarks/results/preprocess.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from visual_memory import vote as voting
from visual_memory.cache import select_per_class
from visual_memory.encoders import create_encoder
from visual_memory.encoders.efficientnet import PREPROCESS
from visual_memory.images import scan_folder

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
VARIANTS = {
    "shipped: [-1,1], bicubic, upscale to 224 (no crop)": PREPROCESS,
    "ImageNet mean/std instead of [-1,1]": dataclasses.replace(PREPROCESS, **IMAGENET),
    "resize to 256 then centre-crop 224": dataclasses.replace(PREPROCESS, upscale_small=False),
    "bilinear instead of bicubic": dataclasses.replace(PREPROCESS, interpolation="bilinear"),
}


def knn_accuracy(mem_x, mem_y, q_x, q_y, k=10):
    sims = q_x @ mem_x.T
    rows = np.argsort(-sims, axis=1)[:, :k]
    top = np.take_along_axis(sims, rows, axis=1)
    labels = sorted(set(mem_y))
    code = {l: i for i, l in enumerate(labels)}
    codes = np.array([code[l] for l in mem_y])[rows]
    truth = np.array([code[l] for l in q_y])
    w = voting.contributions(top, "rank")
    win = voting.predict_every_k(codes, w, len(labels), ks=[1, k])
    return float((win[:, 0] == truth).mean()), float((win[:, 1] == truth).mean())


def main() -> None:
    per_class = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    queries = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    root = Path(os.environ.get("VISMEM_DATA", "../shared/data")) / "cifar10"
    mp, ml = select_per_class(*scan_folder(root / "train"), per_class)
    qp, ql = select_per_class(*scan_folder(root / "val"), queries)
    enc = create_encoder("efficientnet-lite0")
    rows = []
    for name, pre in VARIANTS.items():
        object.__setattr__(enc.spec, "preprocess", pre)  # same weights, other pixels
        t = time.perf_counter()
        mx = enc.embed(mp, progress=name[:30])
        qx = enc.embed(qp)
        acc1, acck = knn_accuracy(mx, ml, qx, ql)
        rows.append({"variant": name, "1nn": acc1, "rank_k10": acck, "seconds": time.perf_counter() - t})
    print(f"\nCIFAR-10, memory {per_class}/class, queries {queries}/class, efficientnet-lite0")
    print(f"{'variant':55s} {'1-NN':>7s} {'rank@10':>8s}")
    for r in rows:
        print(f"{r['variant']:55s} {r['1nn']:7.3f} {r['rank_k10']:8.3f}")
    out = Path(__file__).parent / "results" / "preprocess.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"per_class": per_class, "queries_per_class": queries, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
