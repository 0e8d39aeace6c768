"""Single-record add, visible to the next classify: latency at N=100k (no embedding).

A vectors-only memory is filled with N random unit vectors (d=1280, the
default encoder's size). Then, R times: add one new vector with
``add_embeddings`` (a durable Lance commit plus an fsync'd audit line) and
classify that same vector with k=1; the record must come back as its own
nearest neighbour. Reported: median and p90 of the add alone, and of add +
classify ("visible"). Also a second handle on the same memory (as another
reader would hold): ``refresh()`` + classify after the first few adds.

Baselines measured in the same run on the same sizes:

* raw Lance: ``lance.write_dataset(one_row, ds, mode="append")`` on a plain
  N-row dataset (no lock, no audit, no index);
* raw FAISS: ``IndexFlatIP.add`` of one vector + ``search`` for it (k=1).

    python benchmarks/bench_add.py                  # N=100k d=1280 R=50
    python benchmarks/bench_add.py --n 10000 --r 20 # quick

Prints a table and writes benchmarks/results/add.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

import visual_memory as vm
from visual_memory.progress import progress_bar
from visual_memory.store import now_utc, record_schema

RESULTS = Path(__file__).resolve().parent / "results"


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def one_row_table(rid: str, vec: np.ndarray) -> pa.Table:
    d = vec.shape[-1]
    return pa.Table.from_arrays(
        [pa.array([rid]), pa.array(["c0"]), pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), d),
         pa.array([None], pa.string()), pa.array(np.ones(1, np.float32)),
         pa.array([now_utc()], pa.timestamp("us", tz="UTC")), pa.array([None], pa.string()), pa.array([None], pa.binary())],
        schema=record_schema(d),
    )


def stats(ts: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in ts)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "min_ms": ms[0], "all_ms": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="records already in the memory")
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--r", type=int, default=50, help="single-record adds timed")
    ap.add_argument("--reader-r", type=int, default=5, help="how many of the adds a second handle also checks (slow)")
    ap.add_argument("--chunk", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "add.json")
    args = ap.parse_args()

    import faiss
    import lance

    rng = np.random.default_rng(args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="bench_add_", dir=os.environ.get("VISMEM_BENCH_TMP"))
    mem = vm.create(Path(tmp.name) / "mem", encoder=None, dim=args.d)
    raw_ds = None
    raw_ix = faiss.IndexFlatIP(args.d)
    t_build = time.perf_counter()
    with progress_bar(f"building N={args.n:,}", total=args.n, unit="vec") as bar:
        for start in range(0, args.n, args.chunk):
            x = unit_rows(rng, min(args.chunk, args.n - start), args.d)
            labels = [f"c{c}" for c in rng.integers(0, 100, len(x))]
            ids = [f"v{i}" for i in range(start, start + len(x))]
            mem.add_embeddings(x, labels, ids=ids)
            table = pa.Table.from_arrays(
                [pa.array(ids), pa.array(labels), pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), args.d),
                 pa.array([None] * len(x), pa.string()), pa.array(np.ones(len(x), np.float32)),
                 pa.array([now_utc()] * len(x), pa.timestamp("us", tz="UTC")), pa.array([None] * len(x), pa.string()),
                 pa.array([None] * len(x), pa.binary())],
                schema=record_schema(args.d),
            )
            raw_path = str(Path(tmp.name) / "raw.lance")
            raw_ds = lance.write_dataset(table, raw_ds if raw_ds is not None else raw_path,
                                         mode="append" if raw_ds is not None else "create")
            raw_ix.add(x)
            bar.advance(len(x))
    build_s = time.perf_counter() - t_build
    reader = vm.open(mem.path)  # a second handle, as a server or another process holds

    t_add, t_visible, t_reader, t_lance, t_faiss = [], [], [], [], []
    for i in range(args.r):
        v = unit_rows(rng, 1, args.d)
        rid = f"new{i}"
        t0 = time.perf_counter()
        mem.add_embeddings(v, ["new"], ids=[rid])
        t1 = time.perf_counter()
        (p,) = mem.classify(v, k=1)
        t2 = time.perf_counter()
        if p.neighbors[0].id != rid:
            raise SystemExit(f"the new record {rid} was not visible to the next classify: got {p.neighbors[0].id}")
        if i < args.reader_r:
            reader.refresh()
            (p,) = reader.classify(v, k=1)
            if p.neighbors[0].id != rid:
                raise SystemExit(f"the second handle did not see {rid} after refresh(): got {p.neighbors[0].id}")
            t_reader.append(time.perf_counter() - t2)
        t_add.append(t1 - t0)
        t_visible.append(t2 - t0)

        t4 = time.perf_counter()
        raw_ds = lance.write_dataset(one_row_table(rid, v), raw_ds, mode="append")
        t5 = time.perf_counter()
        raw_ix.add(v)
        _, rows = raw_ix.search(v, 1)
        t6 = time.perf_counter()
        if rows[0, 0] != raw_ix.ntotal - 1:
            raise SystemExit("raw FAISS did not find the vector it just added")
        t_lance.append(t5 - t4)
        t_faiss.append(t6 - t5)

    raw_total = [a + b for a, b in zip(t_lance, t_faiss)]
    res = {
        "benchmark": "add",
        "n": args.n, "d": args.d, "r": args.r,
        "build_s": build_s,
        "ours_add": stats(t_add),
        "ours_add_then_classify": stats(t_visible),
        "second_handle_refresh_then_classify": stats(t_reader),
        "raw_lance_append": stats(t_lance),
        "raw_faiss_add_then_search": stats(t_faiss),
        "raw_lance_plus_faiss": stats(raw_total),
        "final_count": len(mem),
        "final_version": mem.version,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "lance": lance.__version__},
    }
    res["ours_visible_over_raw"] = res["ours_add_then_classify"]["median_ms"] / res["raw_lance_plus_faiss"]["median_ms"]

    rows = [
        ("ours: add_embeddings (1 record)", res["ours_add"]),
        ("ours: add + classify sees it", res["ours_add_then_classify"]),
        (f"ours: 2nd handle refresh + classify ({len(t_reader)})", res["second_handle_refresh_then_classify"]),
        ("raw Lance append (1 row)", res["raw_lance_append"]),
        ("raw FAISS add + search", res["raw_faiss_add_then_search"]),
        ("raw Lance + FAISS", res["raw_lance_plus_faiss"]),
    ]
    print(f"\nN={args.n:,} d={args.d}, {args.r} single-record adds (build {build_s:.1f}s)")
    print(f"{'operation':<38} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}")
    print("-" * 67)
    for name, s in rows:
        print(f"{name:<38} {s['median_ms']:>10.2f} {s['p90_ms']:>8.2f} {s['min_ms']:>8.2f}")
    print(f"\nadd visible to the next classify: {res['ours_add_then_classify']['median_ms']:.1f} ms median "
          f"({res['ours_visible_over_raw']:.2f}x raw Lance append + FAISS add/search)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
