"""Embedding throughput: end to end (JPEG -> vector) vs the raw forward pass, ONNX Runtime vs torch.

For each model and backend, on the same CIFAR-10 JPEGs and batch size:

- ``raw``: the network alone on ready (already preprocessed) float32 tensors;
- ``e2e``: `Encoder.embed(paths)`: read, decode, preprocess (thread pool) and forward.

The machine is shared, so every measurement is repeated ``--rounds`` times
with all variants interleaved in each round; the table reports the best round
(least disturbed, as ``timeit`` does) and the median. Models: the real
efficientnet-lite0 and a random-weight dinov2-small (full-size ViT-S/14 built
from its config; the speed does not depend on the weights values).

    python benchmarks/bench_embed.py [--n 256] [--batch 64] [--rounds 3] [--models efficientnet-lite0,dinov2-small] [--out F]

Writes benchmarks/results/embed.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VISMEM_PROGRESS", "0")

import numpy as np  # noqa: E402

from visual_memory.cache import select_per_class  # noqa: E402
from visual_memory.encoders import create_encoder  # noqa: E402
from visual_memory.encoders.runtime import OnnxForward  # noqa: E402
from visual_memory.images import load_image, scan_folder  # noqa: E402


def tiny_free_dinov2_small(root: Path) -> Path:
    """A full-size DINOv2 ViT-S/14 with random weights, saved like the hub's."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                                    patch_size=14, image_size=518)
    transformers.Dinov2Model(cfg).save_pretrained(root / "dinov2-small")
    return root / "dinov2-small"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="images per measurement")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="efficientnet-lite0,dinov2-small")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "embed.json"))
    ap.add_argument("--data", default=os.environ.get("VISMEM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    args = ap.parse_args()

    paths, _ = select_per_class(*scan_folder(Path(args.data) / "cifar10" / "val"), (args.n + 9) // 10)
    paths = paths[: args.n]
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    rows = []
    for model in args.models.split(","):
        kwargs = {"weights": tiny_free_dinov2_small(tmp)} if model == "dinov2-small" else {}
        if model == "dinov2-small":
            from visual_memory.encoders.onnx_file import export_encoder

            onnx = create_encoder(f"onnx:{export_encoder(model, tmp / 'dinov2-small.onnx', **kwargs)}")
        else:
            onnx = create_encoder(model, backend="onnx")
        torch_enc = create_encoder(model, backend="torch", **kwargs)
        ready = np.stack([torch_enc.preprocess(load_image(p).image) for p in paths])
        batches = [ready[i : i + args.batch] for i in range(0, len(ready), args.batch)]
        # ONNX Runtime with its intra-op threads spinning (its default) and not (ours).
        # Each runtime is measured in its own phase (raw and e2e interleaved round by
        # round), and the spinning session exists only during its phase: spinning ORT
        # threads, or torch's OpenMP threads, left over from another variant would
        # steal the cores from the one being timed.
        nospin = OnnxForward(onnx._forward.path, spin=False)
        times = {}
        for label, enc, make_fwd in (
            ("onnx", onnx, lambda: nospin),
            ("onnx-spin", onnx, lambda: OnnxForward(onnx._forward.path, spin=True)),
            ("torch", torch_enc, lambda: None),
        ):
            fwd = make_fwd()
            if fwd is not None:
                enc._forward = fwd
            enc.forward(batches[0])  # warm-up: allocators, thread pools, first-run graph work

            def raw(enc=enc):
                for b in batches:
                    enc.forward(b)

            def e2e(enc=enc):
                enc.embed(paths, batch_size=args.batch)

            phase = {f"{label} raw": raw, f"{label} e2e": e2e}
            for k in phase:
                times[k] = []
            for r in range(args.rounds):
                for k, fn in phase.items():
                    times[k].append(timed(fn))
                print(f"{model} {label} round {r + 1}/{args.rounds}: "
                      + ", ".join(f"{k} {len(paths) / times[k][-1]:.1f}" for k in phase), flush=True)
            del fwd
        onnx._forward = nospin
        for k, ts in times.items():
            rows.append({"model": model, "variant": k, "best_img_s": len(paths) / min(ts),
                         "median_img_s": len(paths) / statistics.median(ts), "rounds": [len(paths) / t for t in ts]})

    def get(model, variant, stat="best_img_s"):
        return next(r[stat] for r in rows if r["model"] == model and r["variant"] == variant)

    print(f"\nimages/s on {len(paths)} CIFAR-10 JPEGs, batch {args.batch}, best (median) of {args.rounds} interleaved rounds, "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
    print(f"{'model':20s} {'variant':18s} {'img/s':>16s}")
    for r in rows:
        print(f"{r['model']:20s} {r['variant']:18s} {r['best_img_s']:7.1f} ({r['median_img_s']:5.1f})")
    ratios = {}
    print(f"\n{'model':20s} {'ratio':40s} {'best':>6s} {'median':>7s}")
    for model in args.models.split(","):
        for name, (a, b) in {
            "onnx e2e / onnx raw": ("onnx e2e", "onnx raw"),
            "onnx-spin e2e / onnx-spin raw": ("onnx-spin e2e", "onnx-spin raw"),
            "onnx e2e / onnx-spin raw": ("onnx e2e", "onnx-spin raw"),
            "torch e2e / torch raw": ("torch e2e", "torch raw"),
            "onnx raw / torch raw": ("onnx raw", "torch raw"),
            "onnx e2e / torch e2e": ("onnx e2e", "torch e2e"),
        }.items():
            best, med = get(model, a) / get(model, b), get(model, a, "median_img_s") / get(model, b, "median_img_s")
            ratios[f"{model}: {name}"] = {"best": best, "median": med}
            print(f"{model:20s} {name:40s} {best:6.2f} {med:7.2f}")
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"n": len(paths), "batch": args.batch, "rounds": args.rounds, "cpu_count": os.cpu_count(),
                               "rows": rows, "ratios": ratios}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
