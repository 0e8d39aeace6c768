"""Exact classify at every batch size vs the best raw FAISS kernel (issue 9, item 2).

A vectors-only memory of N random unit vectors (d dims, 100 labels) is built
through `add_embeddings`. For each batch size Q, in the same run and on the
same vectors, interleaved (load from other processes hits all alike):

* FAISS ``IndexFlatIP.search`` with its default BLAS threshold (what users get),
* FAISS forced onto its SIMD scan, and forced onto its blocked GEMM
  (``distance_compute_blas_threshold`` huge / 0): the best of the three is the
  baseline ``best raw``;
* torch's bfloat16 GEMM + top-k over a bf16 copy (a raw kernel, inexact: no
  re-rank), shown for reference where the CPU has native bf16;
* ours: `Memory.classify` (search, rank vote, Prediction objects) with the
  float32 kernels only (``VISMEM_BF16=0``) and with the automatic choice.

Target: ours <= 1.2x the best raw FAISS kernel at every Q.

    python benchmarks/bench_exact.py                       # N=200k d=384 Q=1,16,128,1000 k=50
    python benchmarks/bench_exact.py --n 20000 --repeats 3 # quick

Prints the CPU flags and a table; writes benchmarks/results/exact.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import visual_memory as vm  # noqa: E402
from visual_memory import cpu  # noqa: E402
from visual_memory.index import exact  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--q", type=int, nargs="+", default=[1, 16, 128, 1000])
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "exact.json")
    args = ap.parse_args()

    import faiss
    import torch

    print(f"CPU: {cpu.summary()}; native bf16: {cpu.native_bf16()}")
    print(f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {np.__version__}", flush=True)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.n, args.d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench_exact_")
    mem = vm.create(Path(tmp.name) / "mem", encoder=None, dim=args.d)
    labels = [f"c{c}" for c in rng.integers(0, 100, args.n)]
    for lo in range(0, args.n, 100_000):
        mem.add_embeddings(x[lo : lo + 100_000], labels[lo : lo + 100_000], ids=[f"v{i}" for i in range(lo, min(lo + 100_000, args.n))])
    raw = faiss.IndexFlatIP(args.d)
    raw.add(x)
    xb16 = torch.from_numpy(x).to(torch.bfloat16)
    default_threshold = faiss.cvar.distance_compute_blas_threshold

    def faiss_with(threshold):
        def run(q):
            faiss.cvar.distance_compute_blas_threshold = threshold
            return raw.search(q, args.k)
        return run

    def torch_bf16(q):
        return torch.topk(torch.from_numpy(q).to(torch.bfloat16) @ xb16.T, args.k, dim=1)

    def ours(bf16: str):
        def run(q):
            os.environ["VISMEM_BF16"] = bf16
            try:
                return mem.classify(q, k=args.k, vote="rank")
            finally:
                os.environ.pop("VISMEM_BF16", None)
        return run

    variants = {
        "faiss default": faiss_with(default_threshold),
        "faiss scan": faiss_with(2**31 - 1),
        "faiss gemm": faiss_with(0),
        "torch bf16 (inexact)": torch_bf16,
        "ours fp32": ours("0"),
        "ours auto": ours("1" if cpu.native_bf16() else "0"),
    }
    rows = []
    for q_n in args.q:
        queries = x[rng.integers(0, args.n, q_n)] + 0.1 * rng.standard_normal((q_n, args.d), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        reps = args.repeats if q_n * args.n <= 200_000 * 200 else max(2, args.repeats // 3)
        times: dict[str, list[float]] = {v: [] for v in variants}
        # Two phases, each interleaved: FAISS's and torch's OpenMP pools spin for a while after a
        # call and slow whichever runtime runs next, so float32 kernels are never timed next to torch.
        for phase in (("faiss default", "faiss scan", "faiss gemm", "ours fp32"),
                      ("torch bf16 (inexact)", "ours auto", "faiss gemm")):
            for name in phase:  # warm-up (first bf16 copy, page faults)
                variants[name](queries)
            for rep in range(reps):
                for name in phase[rep % len(phase):] + phase[: rep % len(phase)]:
                    t = timed(lambda: variants[name](queries))
                    if not (name == "faiss gemm" and phase[0] != "faiss default"):
                        times[name].append(t)
        faiss.cvar.distance_compute_blas_threshold = default_threshold
        med = {name: statistics.median(t) for name, t in times.items()}
        best_raw_name = min(("faiss default", "faiss scan", "faiss gemm"), key=med.__getitem__)
        # Same neighbours as FAISS (ids are "v<row>"), for both of ours.
        ref = raw.search(queries, args.k)[1]
        same = {}
        for name in ("ours fp32", "ours auto"):
            preds = variants[name](queries)
            got = np.array([[int(n.id[1:]) for n in p.neighbors] for p in preds])
            same[name] = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(got.tolist(), ref.tolist())]))
        row = {"q": q_n, "repeats": reps, "median_s": med, "all_s": times, "best_raw": best_raw_name,
               "ours_fp32_over_best_raw": med["ours fp32"] / med[best_raw_name],
               "ours_auto_over_best_raw": med["ours auto"] / med[best_raw_name],
               "default_over_best_raw": med["faiss default"] / med[best_raw_name],
               "neighbour_overlap_with_faiss": same}
        rows.append(row)
        print(f"  Q={q_n:>5}: " + "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()), flush=True)

    names = list(variants)
    header = f"{'Q':>5} " + " ".join(f"{n:>20}" for n in names) + f" {'fp32/best':>10} {'auto/best':>10}"
    print(f"\nN={args.n:,} d={args.d} k={args.k}; median ms over interleaved repeats; best = best of the three FAISS kernels")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['q']:>5} " + " ".join(f"{r['median_s'][n] * 1e3:>20.1f}" for n in names)
              + f" {r['ours_fp32_over_best_raw']:>10.2f} {r['ours_auto_over_best_raw']:>10.2f}")
    worst = max(max(r["ours_fp32_over_best_raw"], r["ours_auto_over_best_raw"]) for r in rows)
    print(f"\nworst ours / best raw FAISS: {worst:.2f}x (target <= 1.2x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "exact", "target": 1.2, "worst_ours_over_best_raw": worst,
        "machine": {"cpu": cpu.summary(), "native_bf16": cpu.native_bf16(), "platform": platform.platform(),
                    "faiss": faiss.__version__, "torch": torch.__version__, "load_avg": os.getloadavg()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
