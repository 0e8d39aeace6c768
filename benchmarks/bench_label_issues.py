"""Which score finds flipped labels best? Precision at the number of flips, by memory size and noise rate.

Memory: the first N/10 CIFAR-10 train images of each class (N = 300 ... 45,000),
efficientnet-lite0 embeddings through the embedding cache. A fraction (10%,
30%) of the labels is flipped to a random *other* class, exactly as the
paper-evaluation report does (`visual_memory.evaluate.experiments`: one
generator per seed, the 10% flips drawn first, then the 30% flips; seed 0 is
the report's draw). Every record is scored from its exact self-neighbours
(self-match removed; computed once per size, since neighbours do not depend
on labels) and the records are ranked by score, ties by how often the record
misleads its neighbours (``wrong`` over the top 10). Precision = share of
flipped records among the top n_flipped; the table averages over seeds.

Candidates (k = self-neighbours that vote; "share" = the vote share of the
record's own label among them):

- ``rank@k``      1 - rank-vote share (1/(2+r)); the score before this benchmark, k=10
- ``plurality@k`` 1 - share of the k neighbours carrying the label (Deep k-NN, Bahri et al. 2020)
- ``softmax@k``   1 - softmax-vote share, exp(s/tau), tau 0.07: cleanlab's self-confidence
                  with the kNN vote as the predicted probabilities
- ``margin@k``    cleanlab's normalized margin: best other label's softmax share - own share
- ``classnorm@k`` confident-learning style: the class's mean softmax self-confidence (its
                  threshold t_j, Northcutt et al. 2021) minus the record's own
- ``softmax@k/tau=t``  the same at other temperatures
- ``wrong@10``    the paper's pruning count alone: how often the record is a wrong neighbour

    VISMEM_DATA=../shared/data python benchmarks/bench_label_issues.py            # all sizes, 3 seeds
    VISMEM_DATA=../shared/data python benchmarks/bench_label_issues.py --sizes 300,3000 --seeds 1

Prints the CPU, a table, the best candidate per setting, and writes
benchmarks/results/label_issues.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VISMEM_PROGRESS", "0")

from visual_memory import vote as voting  # noqa: E402
from visual_memory.cache import embed_folder  # noqa: E402
from visual_memory.encoders import create_encoder  # noqa: E402
from visual_memory.prune import exact_self_neighbors, neighbor_counts  # noqa: E402
from visual_memory import cpu  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "label_issues.json"
KS = (5, 10, 20, 50, 100, 200)
TAU = 0.07
TAU_SWEEP = (0.02, 0.04, 0.1, 0.2)


def flip_labels(y: np.ndarray, rng: np.random.Generator, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Flip round(p * n) labels to a random other class (the report's protocol). Returns (noisy, is_flipped)."""
    present = np.unique(y)
    n = len(y)
    n_flip = int(round(p * n))
    flip = rng.choice(n, n_flip, replace=False)
    noisy = y.copy()
    pos = np.searchsorted(present, y[flip])
    noisy[flip] = present[(pos + rng.integers(1, len(present), n_flip)) % len(present)]
    is_flip = np.zeros(n, bool)
    is_flip[flip] = True
    return noisy, is_flip


def shares(codes: np.ndarray, nbrs: np.ndarray, sims: np.ndarray, n_labels: int, vote: str, k: int, **params) -> np.ndarray:
    """Vote share of every label among each record's first k self-neighbours: (n, n_labels)."""
    nb, s = nbrs[:, :k], sims[:, :k]
    ncodes = np.where(nb >= 0, codes[np.maximum(nb, 0)], -1)
    w = voting.contributions(np.where(nb >= 0, s, -np.inf), vote, **params)
    totals = voting.tally(ncodes, w, n_labels).totals
    tot = totals.sum(axis=1, keepdims=True)
    return totals / np.where(tot > 0, tot, 1.0)


def candidate_scores(codes, nbrs, sims, n_labels) -> dict[str, np.ndarray]:
    """Every candidate's score (higher = more likely mislabelled), keyed by name."""
    n = len(codes)
    own = np.arange(n), codes
    out = {}
    for k in KS:
        if k > nbrs.shape[1]:
            continue
        out[f"rank@{k}"] = 1.0 - shares(codes, nbrs, sims, n_labels, "rank", k)[own]
        out[f"plurality@{k}"] = 1.0 - shares(codes, nbrs, sims, n_labels, "plurality", k)[own]
        p = shares(codes, nbrs, sims, n_labels, "softmax", k, tau=TAU)
        p_own = p[own]
        out[f"softmax@{k}"] = 1.0 - p_own
        other = p.copy()
        other[own] = -np.inf
        out[f"margin@{k}"] = other.max(axis=1) - p_own
        thresh = np.bincount(codes, weights=p_own, minlength=n_labels) / np.maximum(np.bincount(codes, minlength=n_labels), 1)
        out[f"classnorm@{k}"] = thresh[codes] - p_own
    for k in (50, 100):  # the temperature, where large k makes it matter
        for tau in TAU_SWEEP:
            if k <= nbrs.shape[1]:
                out[f"softmax@{k}/tau={tau:g}"] = 1.0 - shares(codes, nbrs, sims, n_labels, "softmax", k, tau=tau)[own]
    out["wrong@10"] = neighbor_counts(codes, nbrs, 10)[0].astype(np.float64)
    return out


def precision_at_flips(score: np.ndarray, tiebreak: np.ndarray, is_flip: np.ndarray) -> float:
    order = np.lexsort((-tiebreak, -score))[: int(is_flip.sum())]
    return float(is_flip[order].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="300,1000,3000,10000,45000")
    ap.add_argument("--noise", default="0.1,0.3")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = [float(p) for p in args.noise.split(",")]
    root = Path(os.environ.get("VISMEM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "cifar10"
    print("CPU:", cpu.summary())
    enc = create_encoder("efficientnet-lite0")
    t = time.perf_counter()
    x_all, y_all, _ = embed_folder(enc, root / "train", progress="embedding cifar10/train")
    print(f"embeddings {x_all.shape} in {time.perf_counter() - t:.0f}s (cached after the first run)")
    names, y_all = np.unique(np.asarray(y_all), return_inverse=True)
    rows = []
    for size in sizes:
        per_class = size // len(names)
        keep = np.concatenate([np.flatnonzero(y_all == c)[:per_class] for c in range(len(names))])
        keep.sort()
        x, y = x_all[keep], y_all[keep]
        t = time.perf_counter()
        sims, nbrs = exact_self_neighbors(x, max(KS))
        t_nb = time.perf_counter() - t
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            for p in levels:
                noisy, is_flip = flip_labels(y, rng, p)
                t = time.perf_counter()
                scores = candidate_scores(noisy, nbrs, sims, len(names))
                wrong = scores["wrong@10"]
                for name, sc in scores.items():
                    rows.append({"size": len(y), "noise": p, "seed": seed, "score": name,
                                 "precision": precision_at_flips(sc, wrong, is_flip), "n_flipped": int(is_flip.sum())})
                print(f"size {len(y):>6} seed {seed} noise {p:.0%}: {len(scores)} scores in {time.perf_counter() - t:.1f}s "
                      f"(self-neighbours {t_nb:.1f}s)", flush=True)
    table = summarize(rows, sizes, levels)
    args.out.parent.mkdir(exist_ok=True)
    meta = {"cpu": cpu.summary(), "cpu_features": cpu.features(), "encoder": "efficientnet-lite0", "tau": TAU, "ks": KS,
            "seeds": args.seeds, "noise": levels, "summary": table}
    args.out.write_text(dump(meta, rows))
    print(f"wrote {args.out}")


def dump(meta: dict, rows: list[dict]) -> str:
    """JSON: the summary indented, one line per measured row."""
    head = json.dumps(meta, indent=1)[:-2]
    return head + ',\n "rows": [\n  ' + ',\n  '.join(json.dumps(r) for r in rows) + '\n ]\n}\n'


def summarize(rows: list[dict], sizes: list[int], levels: list[float]) -> dict:
    settings = sorted({(r["size"], r["noise"]) for r in rows})
    names = list(dict.fromkeys(r["score"] for r in rows))
    mean = {(s, p, n): float(np.mean([r["precision"] for r in rows if (r["size"], r["noise"], r["score"]) == (s, p, n)]))
            for s, p in settings for n in names}
    head = "".join(f"{f'{s}/{p:.0%}':>11s}" for s, p in settings)
    print(f"\nprecision at n_flipped (mean over seeds); columns: memory size / flipped\n{'score':22s}{head}{'mean':>9s}")
    avg = {n: float(np.mean([mean[(s, p, n)] for s, p in settings])) for n in names}
    for n in sorted(names, key=lambda n: -avg[n]):
        print(f"{n:22s}" + "".join(f"{100 * mean[(s, p, n)]:11.1f}" for s, p in settings) + f"{100 * avg[n]:9.1f}")
    best = {f"{s}/{p}": max(names, key=lambda n: mean[(s, p, n)]) for s, p in settings}
    print("\nbest per setting: " + ", ".join(f"{k}: {v}" for k, v in best.items()))
    return {"mean_precision": {n: {f"{s}/{p}": mean[(s, p, n)] for s, p in settings} for n in names},
            "mean_over_settings": avg, "best_per_setting": best}


if __name__ == "__main__":
    main()
