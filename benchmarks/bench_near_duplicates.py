"""How similar is an image to its copies, and to its nearest *other* image? (The default for `forget(near=T)`.)

For N CIFAR-10 train images (every class equally), embedded with the default
encoder (efficientnet-lite0): the cosine similarity of each image to

- its copies: JPEG-recompressed (quality 90, 75 and 50), resized (up to
  64x64, down to 24x24), cropped to 90% of each side (centre, and top-left
  corner), and cropped then recompressed;
- its nearest distinct image among all 45,000 CIFAR-10 train images (itself
  excluded). CIFAR-10 holds a few real duplicates (the same photo twice);
  those count as "distinct" here, so the top of that column is an upper bound.

Then, for a sweep of thresholds T, the share of copies found (sim >= T) and
the share of images whose nearest distinct image would also be taken (a false
copy). Three thresholds are derived: the largest T that finds >= 99% of every
*light* copy (JPEG q90/q75, resized, 90% crops: `LIGHT`); the equal-error T,
where the share of light copies missed equals the false-copy rate; and the
smallest T whose false-copy rate is at most 1% (`forget` erases for good, so
the documented default keeps false copies rare and relies on the dry run). On
32x32 images a q50 re-encode or a crop plus re-encode is a heavy change; they
are measured, not targeted. Embeddings go through the embedding cache (a
rerun embeds nothing).

    python benchmarks/bench_near_duplicates.py            # N = 500
    python benchmarks/bench_near_duplicates.py --n 2000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VISMEM_PROGRESS", "0")

from PIL import Image  # noqa: E402

from visual_memory import cpu  # noqa: E402
from visual_memory.cache import embed_cached, embed_paths  # noqa: E402
from visual_memory.encoders import create_encoder  # noqa: E402
from visual_memory.images import scan_folder  # noqa: E402
from visual_memory.index import exact_knn  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "near_duplicates.json"
DATA = Path(os.environ.get("VISMEM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "cifar10"
LIGHT = ("jpeg q90", "jpeg q75", "resized to 64x64", "resized to 24x24", "90% crop, centre", "90% crop, corner")
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless: only the named change applies
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image, frac: float, where: str) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * frac), round(h * frac)
    x0, y0 = ((w - cw) // 2, (h - ch) // 2) if where == "centre" else (0, 0)
    return img.crop((x0, y0, x0 + cw, y0 + ch))


COPIES = {
    "jpeg q90": lambda im: _jpeg(im, 90),
    "jpeg q75": lambda im: _jpeg(im, 75),
    "jpeg q50": lambda im: _jpeg(im, 50),
    "resized to 64x64": lambda im: _png(im.resize((64, 64), Image.Resampling.BICUBIC)),
    "resized to 24x24": lambda im: _png(im.resize((24, 24), Image.Resampling.BICUBIC)),
    "90% crop, centre": lambda im: _png(_crop(im, 0.9, "centre")),
    "90% crop, corner": lambda im: _png(_crop(im, 0.9, "corner")),
    "90% crop + jpeg q75": lambda im: _jpeg(_crop(im, 0.9, "centre"), 75),
}


def pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="images whose copies are made (equal per class)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    print(f"CPU: {cpu.summary()}")
    t0 = time.perf_counter()
    encoder = create_encoder("efficientnet-lite0")
    paths, labels = scan_folder(DATA / "train")
    ref = embed_paths(encoder, paths, progress="reference (cached)")  # (45000, 1280), unit rows
    rng = np.random.default_rng(args.seed)
    classes = sorted(set(labels))
    per = max(1, args.n // len(classes))
    lab = np.array(labels)
    pick = np.concatenate([rng.choice(np.flatnonzero(lab == c), per, replace=False) for c in classes])
    orig = ref[pick]

    copies = {}
    for name, make in COPIES.items():
        items = []
        for i in pick.tolist():
            with Image.open(paths[i]) as im:
                items.append(make(im.convert("RGB")))
        vecs = embed_cached(encoder, items, [hashlib.sha256(b).hexdigest() for b in items], progress=name)
        copies[name] = np.einsum("ij,ij->i", vecs, orig).astype(np.float64)

    sims, idx = exact_knn(ref, orig, 2)
    own = idx == pick[:, None]
    nearest = np.where(own[:, 0], sims[:, 1], sims[:, 0]).astype(np.float64)
    nearest_same_class = (lab[np.where(own[:, 0], idx[:, 1], idx[:, 0])] == lab[pick]).mean()

    rows = [{"kind": name, "n": len(v), "min": float(v.min()), "p1": pct(v, 1), "p5": pct(v, 5), "median": pct(v, 50),
             "max": float(v.max())} for name, v in copies.items()]
    nd = {"kind": "nearest distinct image", "n": len(nearest), "min": float(nearest.min()), "p1": pct(nearest, 1),
          "p5": pct(nearest, 5), "median": pct(nearest, 50), "p95": pct(nearest, 95), "p99": pct(nearest, 99),
          "max": float(nearest.max()), "same_class": float(nearest_same_class)}
    sweep = []
    for t in THRESHOLDS:
        sweep.append({"threshold": t, "false_copy_rate": float((nearest >= t).mean()),
                      "found": {name: float((v >= t).mean()) for name, v in copies.items()}})
    fine = np.round(np.arange(0.70, 1.0, 0.005), 3)
    light = np.concatenate([copies[n] for n in LIGHT])
    ok = [t for t in fine if all((copies[n] >= t).mean() >= 0.99 for n in LIGHT)]
    recall99 = float(max(ok)) if ok else None
    gap = [abs((light < t).mean() - (nearest >= t).mean()) for t in fine]
    eer = float(fine[int(np.argmin(gap))])
    fcr1 = float(min(t for t in fine if (nearest >= t).mean() <= 0.01))
    out = {
        "benchmark": "near_duplicates", "encoder": encoder.spec.name, "n_images": int(len(pick)),
        "reference": int(len(ref)), "cpu": cpu.summary(), "copies": rows, "nearest_distinct": nd, "sweep": sweep,
        "light_copies": list(LIGHT),
        "threshold_99pct_light_copies": recall99,
        "false_copy_rate_at_99pct": float((nearest >= recall99).mean()) if recall99 is not None else None,
        "threshold_equal_error": eer,
        "light_missed_at_equal_error": float((light < eer).mean()),
        "false_copy_rate_at_equal_error": float((nearest >= eer).mean()),
        "threshold_false_copy_1pct": fcr1,
        "false_copy_rate_at_1pct": float((nearest >= fcr1).mean()),
        "light_found_at_1pct": {n: float((copies[n] >= fcr1).mean()) for n in LIGHT},
        "seconds": round(time.perf_counter() - t0, 1), "command": "python benchmarks/bench_near_duplicates.py " + " ".join(argv or sys.argv[1:]),
    }

    print(f"\n{len(pick)} CIFAR-10 train images vs their copies and vs their nearest distinct image among {len(ref)} "
          f"(encoder {encoder.spec.name}); cosine similarity\n")
    print(f"| {'compared with':<24} | {'min':>6} | {'p1':>6} | {'p5':>6} | {'median':>6} | {'p95':>6} | {'p99':>6} | {'max':>6} |")
    print(f"|{'-' * 26}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    for r in rows:
        print(f"| {r['kind']:<24} | {r['min']:6.3f} | {r['p1']:6.3f} | {r['p5']:6.3f} | {r['median']:6.3f} | {'':>6} | {'':>6} | {r['max']:6.3f} |")
    print(f"| {nd['kind']:<24} | {nd['min']:6.3f} | {nd['p1']:6.3f} | {nd['p5']:6.3f} | {nd['median']:6.3f} | {nd['p95']:6.3f} | "
          f"{nd['p99']:6.3f} | {nd['max']:6.3f} |")
    print(f"\n(the nearest distinct image has the same class for {100 * nearest_same_class:.1f}% of the images)\n")
    names = list(COPIES)
    print("| T | " + " | ".join(names) + " | nearest distinct >= T |")
    print("|---|" + "---|" * (len(names) + 1))
    for s in sweep:
        print(f"| {s['threshold']:.2f} | " + " | ".join(f"{100 * s['found'][n]:.1f}%" for n in names)
              + f" | {100 * s['false_copy_rate']:.2f}% |")
    if recall99 is not None:
        print(f"\nlargest T finding >= 99% of every light copy ({', '.join(LIGHT)}): {recall99:.3f} "
              f"(a distinct image also >= T for {100 * out['false_copy_rate_at_99pct']:.2f}% of images)")
    print(f"equal-error T: {eer:.3f} ({100 * out['light_missed_at_equal_error']:.2f}% of light copies missed, "
          f"a distinct image >= T for {100 * out['false_copy_rate_at_equal_error']:.2f}% of images)")
    print(f"smallest T with a distinct image >= T for at most 1% of images: {fcr1:.3f} "
          f"({100 * out['false_copy_rate_at_1pct']:.2f}%; light copies found: "
          + ", ".join(f"{n} {100 * v:.1f}%" for n, v in out["light_found_at_1pct"].items()) + ")")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['seconds']} s)")
    return out


if __name__ == "__main__":
    main()
