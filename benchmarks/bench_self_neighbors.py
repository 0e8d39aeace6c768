"""Self-neighbours (the memory queried against itself, self-match removed) vs raw FAISS.

For each N: build a vectors-only memory of N random 384-d unit vectors, then
time

- ours: `visual_memory.prune.self_neighbors(mem, k)` (batched exact search of
  the memory's own index, self-match dropped, row -> record mapping), with the
  on-disk cache off, and again with the cache warm;
- raw FAISS: `IndexFlatIP.add(x)` + `search(x, k + 1)` + dropping the self column,
  the least work that gives the same answer.

Exact self-search costs N^2 * d multiply-adds (1M x 1M x 384 = 3.8e14 MACs, about
an hour on 2 cores), so for N above --full-max both sides run the same random
sample of --sample queries and the full time is extrapolated linearly (the
cost per query is constant at fixed N); the table says which rows are
extrapolated.

    python benchmarks/bench_self_neighbors.py                 # N = 100k (full) and 1M (sampled)
    python benchmarks/bench_self_neighbors.py --sizes 20000   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VISMEM_PROGRESS", "0")

import visual_memory as vm  # noqa: E402
from visual_memory import prune as P  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "self_neighbors.json"


def unit(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, 100_000):
        x = rng.standard_normal((min(100_000, n - lo), d), dtype=np.float32)
        out[lo : lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def raw_faiss(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    import faiss

    t = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, nbrs = index.search(x[queries], k + 1)
    from visual_memory.index import drop_self

    _, nbrs = drop_self(sims, nbrs, queries, k)
    return time.perf_counter() - t, nbrs


def ours(mem, queries: np.ndarray, k: int, full: bool) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    if full:
        nbrs = P.self_neighbors(mem, k=k, cache=False).nbrs
    else:  # the same search path self_neighbors runs, on a sample of records
        from visual_memory.index import exact_self_knn

        nbrs = exact_self_knn(mem.vectors(), k, positions=queries)[1]
    return time.perf_counter() - t, nbrs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated N")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10, help="neighbours per record (10 = soft pruning)")
    ap.add_argument("--full-max", type=int, default=200_000, help="largest N searched in full; larger N are sampled")
    ap.add_argument("--sample", type=int, default=4096, help="queries timed when N > --full-max")
    ap.add_argument("--threads", type=int, default=0, help="FAISS threads (0 = FAISS default)")
    args = ap.parse_args()
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    rows = []
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        x = unit(n, args.dim, seed=n)
        full = n <= args.full_max
        queries = np.arange(n) if full else np.sort(np.random.default_rng(0).choice(n, args.sample, replace=False))
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            mem = vm.create(Path(tmp) / "m", encoder=None, dim=args.dim)
            mem.add_embeddings(x, labels=["a"] * n, ids=[str(i) for i in range(n)])
            build = time.perf_counter() - t
            t_raw, nb_raw = raw_faiss(x, queries, args.k)
            t_ours, nb_ours = ours(mem, queries, args.k, full)
            agree = float((nb_raw == nb_ours).mean())
            t_warm = None
            if full:
                P.self_neighbors(mem, k=args.k)  # writes the cache
                t = time.perf_counter()
                P.self_neighbors(mem, k=args.k)
                t_warm = time.perf_counter() - t
        scale = n / len(queries)
        row = {"n": n, "dim": args.dim, "k": args.k, "queries_timed": int(len(queries)), "extrapolated": not full,
               "build_memory_s": round(build, 2), "raw_faiss_s": round(t_raw * scale, 2), "ours_s": round(t_ours * scale, 2),
               "ratio_ours_over_faiss": round(t_ours / t_raw, 3), "cached_s": None if t_warm is None else round(t_warm, 3),
               "neighbour_agreement": agree,
               "gflops_ours": round(2.0 * len(queries) * n * args.dim / t_ours / 1e9, 1)}
        rows.append(row)
        print(f"N={n}: done", file=sys.stderr, flush=True)
        del x
    print(f"\nself-neighbours, d={args.dim}, k={args.k} (exact; ratio = ours / raw FAISS, same run)")
    hdr = f"{'N':>9} {'raw FAISS s':>12} {'ours s':>9} {'ratio':>6} {'cached s':>9} {'GFLOP/s':>8} {'agree':>6}  note"
    print(hdr)
    for r in rows:
        note = f"extrapolated from {r['queries_timed']} queries" if r["extrapolated"] else "full"
        cached = "-" if r["cached_s"] is None else f"{r['cached_s']:.3f}"
        print(f"{r['n']:>9} {r['raw_faiss_s']:>12.2f} {r['ours_s']:>9.2f} {r['ratio_ours_over_faiss']:>6.3f} {cached:>9} "
              f"{r['gflops_ours']:>8.1f} {r['neighbour_agreement']:>6.3f}  {note}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "self_neighbors", "cpu_count": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
