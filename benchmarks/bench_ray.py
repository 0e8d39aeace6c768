"""Ray: ingest throughput, sharded search QPS, and the measurements behind docs/scale.md (issue 10).

Three phases, each against a baseline built in the same run on the same data:

``ingest``  N real CIFAR-10 train images (an ImageFolder of symlinks, N/10 per
            class): single-process ``Memory.add`` vs ``Memory.add(ray="local")``
            with W embedding actors (images/s; per-worker efficiency =
            Ray images/s / (W x single-process images/s)). Ray is started
            once beforehand; its start-up is reported apart.
``search``  a vectors-only memory of N random unit vectors (d dims, 100
            labels): ``classify`` in one process vs ``open(ray="local",
            shards=S)`` at query batch Q (QPS; the results are checked equal).
``scale``   bytes per record (Lance records table, with and without the 64 px
            thumbnail a real add stores; an IVF-PQ index); IVF1024,PQ48 build
            time on one core (train on a 65k sample, add N); recall@10 vs exact
            and single-thread QPS of that index at several nprobe, on real
            CIFAR-10 vectors from the embedding cache (d=1280) and on clustered
            synthetic vectors (d=384).

    python benchmarks/bench_ray.py ingest --images 2000 --workers 1 2
    python benchmarks/bench_ray.py search --n 1000000 --d 384 --shards 2
    python benchmarks/bench_ray.py scale --n 1000000

Prints the CPU flags, the machine's load and a table; writes
benchmarks/results/ray_<phase>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import visual_memory as vm  # noqa: E402
from visual_memory import cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("VISMEM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "cifar10"


def machine() -> dict:
    return {"cpu": cpu.summary(), "cores": os.cpu_count(), "platform": platform.platform(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered_rows(rng: np.random.Generator, n: int, d: int, centres: int = 4096, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around random centres (closer to real embeddings than isotropic noise)."""
    c = unit_rows(rng, centres, d)
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        out[lo:hi] = c[rng.integers(0, centres, hi - lo)] + spread * unit_rows(rng, hi - lo, d)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def write(name: str, result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ray_{name}.json"
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {out}")


# -- ingest ------------------------------------------------------------------------


def image_folder(dest: Path, n: int) -> int:
    classes = sorted(p.name for p in (DATA / "train").iterdir() if p.is_dir())
    per = n // len(classes)
    for c in classes:
        (dest / c).mkdir(parents=True)
        for f in sorted((DATA / "train" / c).iterdir())[:per]:
            (dest / c / f.name).symlink_to(f)
    return per * len(classes)


def bench_ingest(args) -> None:
    from visual_memory.distributed import cluster

    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_ingest_", dir=os.environ.get("VISMEM_BENCH_TMP")))
    try:
        n = image_folder(tmp / "imgs", args.images)
        print(f"{n} CIFAR-10 train images; {machine()}")
        results = {"images": n, "machine_before": machine(), "runs": []}
        t = time.perf_counter()
        cluster.ensure("local")
        results["ray_start_s"] = time.perf_counter() - t
        import ray

        results["ray_cpus"] = ray.cluster_resources().get("CPU")
        # Warm the encoder export and the page cache once, outside the timings.
        vm.create(tmp / "warm").add(tmp / "imgs" / "airplane", labels="airplane")
        for w in [0, *args.workers]:
            mem = vm.create(tmp / f"m{w}")
            t = time.perf_counter()
            r = mem.add(tmp / "imgs") if w == 0 else mem.add(tmp / "imgs", ray="local", workers=w, batch_size=args.block)
            dt = time.perf_counter() - t
            assert r.added == n
            results["runs"].append({"mode": "single process" if w == 0 else f"ray, {w} worker(s)", "workers": w,
                                    "seconds": dt, "images_per_s": n / dt, "load_avg": os.getloadavg()[0]})
            print(f"  {results['runs'][-1]}")
            if w:
                assert mem.ids() == vm.open(tmp / "m0").ids()
        base = results["runs"][0]["images_per_s"]
        for r in results["runs"]:
            r["speedup"] = r["images_per_s"] / base
            r["per_worker_efficiency"] = r["images_per_s"] / (max(1, r["workers"]) * base)
        results["record_bytes"] = dir_bytes(tmp / "m0" / "records.lance") / n
        results["machine_after"] = machine()
        print(cpu.summary())
        print(table([[r["mode"], f"{r['seconds']:.1f}", f"{r['images_per_s']:.1f}", f"{r['speedup']:.2f}",
                      f"{r['per_worker_efficiency']:.2f}", f"{r['load_avg']:.1f}"] for r in results["runs"]],
                    ["mode", "s", "images/s", "vs single", "per-worker eff.", "load"]))
        print(f"Ray start-up (not in the timings): {results['ray_start_s']:.1f} s; records: "
              f"{results['record_bytes']:.0f} B/record on disk (vector, id, source, 64 px thumbnail)")
        write("ingest", results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- sharded search -----------------------------------------------------------------


def timed_qps(fn, q: int, repeats: int) -> float:
    fn()  # warm
    best = min(_timed(fn) for _ in range(repeats))
    return q / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_search(args) -> None:
    from visual_memory.distributed import cluster

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_search_", dir=os.environ.get("VISMEM_BENCH_TMP")))
    try:
        mem = vm.create(tmp / "m", encoder=None, dim=args.d)
        for lo in range(0, args.n, 250_000):
            hi = min(args.n, lo + 250_000)
            mem.add_embeddings(unit_rows(rng, hi - lo, args.d), labels=[f"c{i % 100}" for i in range(lo, hi)],
                               ids=[f"r{i}" for i in range(lo, hi)])
        del mem
        queries = unit_rows(rng, max(args.q), args.d)
        cluster.ensure("local")
        results = {"n": args.n, "d": args.d, "k": args.k, "shards": args.shards, "machine_before": machine(), "runs": []}
        t = time.perf_counter()
        one = vm.open(tmp / "m")
        results["open_one_s"] = time.perf_counter() - t
        for q in args.q:
            qps = timed_qps(lambda: one.classify(queries[:q], k=args.k), q, args.repeats)
            results["runs"].append({"mode": "one process", "q": q, "qps": qps, "load_avg": os.getloadavg()[0]})
            print(f"  {results['runs'][-1]}")
        ref = [(p.label, [n.id for n in p.neighbors]) for p in one.classify(queries[:100], k=args.k)]
        del one
        t = time.perf_counter()
        sharded = vm.open(tmp / "m", ray="local", shards=args.shards)
        results["open_sharded_s"] = time.perf_counter() - t
        got = [(p.label, [n.id for n in p.neighbors]) for p in sharded.classify(queries[:100], k=args.k)]
        results["identical_to_one_process"] = got == ref
        for q in args.q:
            qps = timed_qps(lambda: sharded.classify(queries[:q], k=args.k), q, args.repeats)
            results["runs"].append({"mode": f"{args.shards} shards", "q": q, "qps": qps, "load_avg": os.getloadavg()[0]})
            print(f"  {results['runs'][-1]}")
        base = {r["q"]: r["qps"] for r in results["runs"] if r["mode"] == "one process"}
        for r in results["runs"]:
            r["vs_one_process"] = r["qps"] / base[r["q"]]
        results["machine_after"] = machine()
        print(cpu.summary())
        print(table([[r["mode"], r["q"], f"{r['qps']:.1f}", f"{r['vs_one_process']:.2f}", f"{r['load_avg']:.1f}"]
                     for r in results["runs"]], ["mode", "Q", "QPS", "vs one process", "load"]))
        print(f"N={args.n} d={args.d} k={args.k}; open: one process {results['open_one_s']:.1f} s, "
              f"{args.shards} shards {results['open_sharded_s']:.1f} s; identical results: {results['identical_to_one_process']}")
        write("search", results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- scale measurements ------------------------------------------------------------


def lance_bytes_per_record(d: int, n: int) -> float:
    """Bytes per record of a records table without thumbnails (SHA-256 ids, path-like sources)."""
    import hashlib

    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_bytes_", dir=os.environ.get("VISMEM_BENCH_TMP")))
    try:
        import lance

        from visual_memory.memory.adding import record_table

        rng = np.random.default_rng(1)
        ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
        t = record_table(d, ids=ids, labels=[f"c{i % 1000}" for i in range(n)], vectors=unit_rows(rng, n, d),
                         sources=[f"/data/train/c{i % 1000}/{h[:16]}.jpg" for i, h in enumerate(ids)])
        lance.write_dataset(t, str(tmp / "r.lance"))
        return dir_bytes(tmp / "r.lance") / n
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def thumbnail_bytes(n: int = 1000) -> float:
    """Mean size of the 64 px JPEG thumbnail `Memory.add` stores, over n real CIFAR-10 images."""
    from PIL import Image

    from visual_memory.memory.adding import thumbnail

    files = sorted((DATA / "train" / "cat").iterdir())[:n]
    return float(np.mean([len(thumbnail(Image.open(f).convert("RGB"))) for f in files]))


def ivfpq_run(name: str, x: np.ndarray, q: np.ndarray, *, nlist: int, m: int, nprobes: list[int]) -> dict:
    """Train once on <= 65k, add all on one thread; recall@10 vs exact and 1-thread QPS per nprobe."""
    import faiss

    from visual_memory.index import exact_knn

    n, d = x.shape
    faiss.omp_set_num_threads(1)
    ix = faiss.index_factory(d, f"IVF{nlist},PQ{m}np", faiss.METRIC_INNER_PRODUCT)
    sample = x[np.random.default_rng(2).choice(n, size=min(n, 65_536), replace=False)]
    t = time.perf_counter()
    ix.train(sample)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    ix.add(x)
    add_s = time.perf_counter() - t
    index_bytes = len(faiss.serialize_index(ix))
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, truth = exact_knn(x, q, 10)
    faiss.omp_set_num_threads(1)
    runs = []

    def recall(got: np.ndarray) -> float:
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), truth.tolist())]))

    for nprobe in nprobes:
        ix.nprobe = nprobe
        t = time.perf_counter()
        _, got = ix.search(q, 10)
        dt = time.perf_counter() - t
        # Re-ranked with the stored vectors: 100 PQ candidates, exact inner products, top 10.
        t = time.perf_counter()
        _, cand = ix.search(q, 100)
        sims = np.einsum("qd,qkd->qk", q, x[np.maximum(cand, 0)])
        sims[cand < 0] = -np.inf
        reranked = np.take_along_axis(cand, np.argsort(-sims, axis=1)[:, :10], axis=1)
        dt_rr = time.perf_counter() - t
        runs.append({"nprobe": nprobe, "recall_at_10": recall(got), "qps_1thread": len(q) / dt,
                     "recall_at_10_reranked_100": recall(reranked), "qps_1thread_reranked": len(q) / dt_rr})
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    out = {"data": name, "n": n, "d": d, "spec": f"IVF{nlist},PQ{m}np", "train_s_1core": train_s,
           "add_s_1core": add_s, "add_s_per_10M_per_core": add_s * 10_000_000 / n,
           "index_bytes_per_record": index_bytes / n, "runs": runs}
    print(f"  {name}: train {train_s:.1f} s, add {add_s:.1f} s ({out['add_s_per_10M_per_core'] / 60:.1f} min/10M/core), "
          f"{out['index_bytes_per_record']:.1f} B/record; " +
          ", ".join(f"nprobe {r['nprobe']}: recall@10 {r['recall_at_10']:.3f} ({r['recall_at_10_reranked_100']:.3f} "
                    f"re-ranked) {r['qps_1thread']:.0f} QPS ({r['qps_1thread_reranked']:.0f})" for r in runs))
    return out


def cached_cifar() -> tuple[np.ndarray, np.ndarray]:
    from visual_memory.cache import embed_folder
    from visual_memory.encoders import create_encoder

    enc = create_encoder("efficientnet-lite0")
    tx, _, _ = embed_folder(enc, DATA / "train")
    vx, _, _ = embed_folder(enc, DATA / "val")
    return tx, vx


def bench_scale(args) -> None:
    results = {"machine_before": machine()}
    results["thumbnail_bytes_mean"] = thumbnail_bytes()
    results["lance_bytes_per_record_no_thumbnail"] = {f"d{d}": lance_bytes_per_record(d, args.bytes_n) for d in (384, 1024)}
    print(f"  Lance B/record without thumbnail: {results['lance_bytes_per_record_no_thumbnail']}; "
          f"thumbnail mean {results['thumbnail_bytes_mean']:.0f} B")
    rng = np.random.default_rng(3)
    results["ivfpq"] = []
    if (DATA / "train").is_dir():
        tx, vx = cached_cifar()
        results["ivfpq"].append(ivfpq_run("cifar10-efficientnet-lite0", tx, vx[:1000], nlist=256, m=64,
                                          nprobes=[4, 16, 64]))
        del tx, vx
    x = clustered_rows(rng, args.n, 384)
    q = clustered_rows(np.random.default_rng(4), 1000, 384)
    # Synthetic clusters have no fine structure: only the build time and bytes carry over, not the recall.
    results["ivfpq"].append(ivfpq_run("synthetic clustered", x, q, nlist=1024, m=48, nprobes=[8, 32]))
    results["machine_after"] = machine()
    print(cpu.summary())
    write("scale", results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="phase", required=True)
    a = sub.add_parser("ingest")
    a.add_argument("--images", type=int, default=2000, help="CIFAR-10 train images (45000 = all)")
    a.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a.add_argument("--block", type=int, default=250, help="images per Ray block (one data file each)")
    s = sub.add_parser("search")
    s.add_argument("--n", type=int, default=1_000_000)
    s.add_argument("--d", type=int, default=384)
    s.add_argument("--k", type=int, default=50)
    s.add_argument("--q", type=int, nargs="+", default=[1, 1000])
    s.add_argument("--shards", type=int, default=2)
    s.add_argument("--repeats", type=int, default=3)
    c = sub.add_parser("scale")
    c.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors for the IVF-PQ build")
    c.add_argument("--bytes-n", type=int, default=100_000, help="records for the bytes-per-record measurement")
    args = ap.parse_args()
    os.environ.setdefault("VISMEM_PROGRESS", "0")
    print(cpu.summary())
    {"ingest": bench_ingest, "search": bench_search, "scale": bench_scale}[args.phase](args)


if __name__ == "__main__":
    main()
