"""Approximate indexes inside a memory vs exact search (issue 9, items 3-7).

N clustered synthetic unit vectors (d dims: ``--centres`` Gaussian centres,
each vector = centre + isotropic noise of norm ~``--noise``, normalised;
label = centre id mod ``--classes``) go into two vectors-only memories
through `add_embeddings`: one stays exact (``"Flat"``), the other gets each
approximate index through `Memory.build_index` (timed: build time). Queries
are fresh draws from the same distribution (not stored vectors). Measured in
the same run, on the same vectors:

1. per spec and per (nprobe, rerank): recall@k of the neighbour ids against
   the exact top-k (FAISS ``IndexFlatIP`` over all N), agreement of the rank
   vote label of `classify` with the exact memory's `classify`, and the median
   single-query `Memory.search` latency, against the exact memory's own
   single-query `search` and raw FAISS ``IndexFlatIP.search`` of one query
   (timed in interleaved blocks, rotated, so load from other processes hits
   all alike). Speed-up = the faster exact path / the index. `Memory.check_index`
   (stored records as queries) is run too for the primary spec.
2. build seconds, `visual_memory.open` time with the saved index vs opening the
   same records as a Flat memory (which rebuilds by scanning), bytes per record
   of the saved index (``<memory>/index/``).
3. single-record add / remove / forget latency on the approximate memory and on
   the exact one.
4. the primary spec's memory opened and queried in a subprocess under a memory
   limit below the raw vectors' size (prlimit --as if imports survive it, else
   a cgroup memory limit, else peak RSS only), its labels compared with this
   process's; and, as a control, the Flat memory under the same limit.

Targets (issue 9): recall@50 >= 0.95, agreement >= 99.5% at >= 20x the exact
single-query speed; <= 64 B per record (+ metadata) for PQ.

    python benchmarks/bench_ann.py                                   # N=1M d=384 k=50
    python benchmarks/bench_ann.py --n 100000 --specs IVF256,PQ48np  # quick
    python benchmarks/bench_ann.py --n 500000 --out benchmarks/results/ann_500k.json

Absolute times are measured on this (possibly loaded, 2-core) machine; the
ratios are the portable numbers. Prints the CPU flags and tables; writes
benchmarks/results/ann_1m.json. Memories live under ``--root`` (deleted at the
end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource  # noqa: F401 - rss_mb's fallback
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import visual_memory as vm  # noqa: E402
from visual_memory import cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 100_000
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM (ru_maxrss survives exec, so a child would report its parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- data -------------------------------------------------------------------------------


class Data:
    """Deterministic clustered unit vectors, generated chunk by chunk (bounded RAM)."""

    def __init__(self, d: int, centres: int, classes: int, noise: float, seed: int) -> None:
        self.d, self.n_centres, self.classes, self.noise, self.seed = d, centres, classes, noise, seed
        rng = np.random.default_rng([seed, 0])
        c = rng.standard_normal((centres, d), dtype=np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)

    def draw(self, n: int, stream: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, *stream])
        cid = rng.integers(0, self.n_centres, n)
        x = self.centres[cid] + (self.noise / np.sqrt(self.d)) * rng.standard_normal((n, self.d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), cid

    def chunk(self, i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.draw(n, [1, i])

    def queries(self, n: int, which: int = 0) -> tuple[np.ndarray, np.ndarray]:
        return self.draw(n, [2, which])

    def boundary(self, n: int, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queries between two centres of different labels: w c_a + (1 - w) c_b + noise, w ~ U(0.4, 0.6)."""
        rng = np.random.default_rng([self.seed, 3])
        a = rng.integers(0, self.n_centres, n)
        b = (a + rng.integers(1, self.n_centres, n)) % self.n_centres
        same = a % classes == b % classes
        b[same] = (b[same] + 1) % self.n_centres
        w = rng.uniform(0.4, 0.6, n).astype(np.float32)[:, None]
        x = w * self.centres[a] + (1 - w) * self.centres[b]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x = x + (self.noise / np.sqrt(self.d)) * rng.standard_normal((n, self.d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), a, b

    def label(self, cid: np.ndarray) -> list[str]:
        return [f"c{c % self.classes}" for c in cid.tolist()]


# -- the subprocess under a memory limit ---------------------------------------------


def child_main(path: str, params_json: str, queries_npy: str, out_json: str, k: int, singles: int, batch: int) -> None:
    """Open a memory; `singles` single-query classify calls; then every query in `classify` calls of `batch` queries.

    Writes what it has done so far to `out_json` after each phase (a killed child leaves its last phase).
    """
    out: dict = {"pid": os.getpid(), "phase": "start"}

    def write(phase: str) -> None:
        out["phase"], out["peak_rss_mb"] = phase, rss_mb()
        Path(out_json).write_text(json.dumps(out))

    write("start")
    t, mem = timed(lambda: vm.open(path))
    out["open_s"], out["load_note"], out["index"] = t, mem._state.load_note, mem.index
    out["rss_after_open_mb"] = rss_mb()
    write("opened")
    q = np.load(queries_npy)
    params = json.loads(params_json) or None
    times, single = [], []
    for i in range(min(singles, len(q))):
        t, p = timed(lambda: mem.classify(q[i : i + 1], k=k, search_params=params))
        times.append(t)
        single.append(p[0].label)
    out["single_labels"], out["single_median_ms"] = single, 1e3 * statistics.median(times) if times else None
    out["rss_after_singles_mb"] = rss_mb()
    write("singles done")
    labels, t0 = [], time.perf_counter()
    for lo in range(0, len(q), batch):
        labels += [p.label for p in mem.classify(q[lo : lo + batch], k=k, search_params=params)]
    out["batch"], out["batch_s"], out["labels"] = batch, time.perf_counter() - t0, labels
    write("done")


def my_cgroup() -> tuple[str, Path] | None:
    """('v2'|'v1', this process's memory cgroup directory) if one is writable here."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists() and "memory" in v2.read_text().split():
        rel = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), "/")
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        return ("v2", base) if os.access(base, os.W_OK) else None
    for ln in lines:
        _, controllers, rel = ln.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            return ("v1", base) if os.access(base, os.W_OK) else None
    return None


def run_limited(limit: int, argv: list[str], timeout: float) -> dict:
    """Run argv under a memory limit of `limit` bytes; the method that worked, rc, peak usage."""
    tried = []
    # 1. An address-space limit: only usable if the imports survive it.
    probe = ["prlimit", f"--as={limit}", sys.executable, "-c", "import visual_memory, lance, faiss, numpy"]
    if shutil.which("prlimit"):
        p = subprocess.run(probe, capture_output=True, text=True)
        tried.append({"method": "prlimit --as", "imports_ok": p.returncode == 0,
                      "stderr_tail": p.stderr.strip().splitlines()[-1:] if p.returncode else []})
        if p.returncode == 0:
            t, r = timed(lambda: subprocess.run(["prlimit", f"--as={limit}", *argv], capture_output=True, text=True,
                                                timeout=timeout))
            return {"method": "prlimit --as", "limit_bytes": limit, "rc": r.returncode, "seconds": t,
                    "stderr_tail": r.stderr[-2000:], "tried": tried}
    # 2. A cgroup memory limit (v2 memory.max, or v1 memory.limit_in_bytes), a child of our own cgroup.
    cg = my_cgroup()
    if cg is not None:
        kind, base = cg
        group = base / f"vismem-bench-ann-{os.getpid()}"
        try:
            group.mkdir()
            if kind == "v2":
                (group / "memory.max").write_text(str(limit))
                if (group / "memory.swap.max").exists():
                    (group / "memory.swap.max").write_text("0")
            else:
                (group / "memory.limit_in_bytes").write_text(str(limit))
                if (group / "memory.memsw.limit_in_bytes").exists():
                    (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
            wrapped = ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh", *argv]
            t, r = timed(lambda: subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout))
            peak_file = group / ("memory.peak" if kind == "v2" else "memory.max_usage_in_bytes")
            peak = int(peak_file.read_text().split()[0]) if peak_file.exists() else None
            fail = group / ("memory.events" if kind == "v2" else "memory.failcnt")
            events = fail.read_text().strip() if fail.exists() else None
            set_to = (group / ("memory.max" if kind == "v2" else "memory.limit_in_bytes")).read_text().strip()
            return {"method": f"cgroup {kind} memory limit", "cgroup": str(group), "limit_bytes": limit,
                    "limit_read_back": set_to, "rc": r.returncode, "seconds": t, "cgroup_peak_bytes": peak,
                    "cgroup_events": events, "stderr_tail": r.stderr[-2000:], "tried": tried}
        except OSError as exc:
            tried.append({"method": f"cgroup {kind}", "error": repr(exc)})
        finally:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
    # 3. No limit possible: run plain, report peak RSS.
    t, r = timed(lambda: subprocess.run(argv, capture_output=True, text=True, timeout=timeout))
    return {"method": "none (peak RSS only)", "limit_bytes": None, "rc": r.returncode, "seconds": t,
            "stderr_tail": r.stderr[-2000:], "tried": tried}


def git_state() -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, capture_output=True, text=True).stdout
        return {"commit": head, "src_modified": bool(dirty.strip())}
    except OSError:
        return {}


# -- measuring ---------------------------------------------------------------------------


def single_query_latency(variants: dict, q: np.ndarray, rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Each variant times len(q) single queries, in `rounds` blocks per variant, rotating the order."""
    names = list(variants)
    per_round = np.array_split(np.arange(len(q)), rounds)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r, idx in enumerate(per_round):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2:
            order = order[::-1]
        for j, name in enumerate(order):
            fn = variants[name]
            for i in idx[:warmup]:
                fn(q[i : i + 1])
            for i in idx:
                t = time.perf_counter()
                fn(q[i : i + 1])
                times[name].append(time.perf_counter() - t)
            if (j + 1) % 4 == 0 or j + 1 == len(order):
                say(f"  latency round {r + 1}/{rounds}: {j + 1}/{len(order)} variants timed")
    return times


def recall(got: list[list[str]], want: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(got, want)]))


def params_of(nprobe, rerank) -> dict:
    p = {"nprobe": int(nprobe)}
    if rerank is not None:
        p["rerank"] = int(rerank)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--noise", type=float, default=2.0,
                    help="norm of each vector's noise relative to its (unit) centre; 2.0: 99.7%% of exact top-50 "
                         "neighbours share the query's centre at 1M, exact vote accuracy ~100%%")
    ap.add_argument("--specs", nargs="+", default=["IVF1024,PQ48np", "IVF1024,SQ8", "IVF1024,Flat"],
                    help="the first is the primary (open, check_index, memory limit, edits)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--rerank", type=int, nargs="+", default=[2, 4, 8, 16], help="primary spec (plus rerank 0 at one nprobe)")
    ap.add_argument("--extra-rerank", type=int, nargs="+", default=[0, 2], help="other compressed specs (SQ)")
    ap.add_argument("--queries", type=int, default=1000, help="fresh queries for recall and agreement (one batch)")
    ap.add_argument("--boundary-queries", type=int, default=1000,
                    help="also this many queries between two centres of different labels (a harder agreement test)")
    ap.add_argument("--latency-queries", type=int, default=200, help="single queries timed per variant")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--open-repeats", type=int, default=3)
    ap.add_argument("--edit-repeats", type=int, default=3, help="single-record adds and removes per memory")
    ap.add_argument("--forget-repeats", type=int, default=2)
    ap.add_argument("--limit-gb", type=float, default=1.0, help="memory limit of the subprocess (GB, 10^9 B)")
    ap.add_argument("--limit-batch", type=int, default=100,
                    help="queries per classify call in the limited subprocess (all --queries in one call is run too)")
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--agreement-target", type=float, default=0.995)
    ap.add_argument("--speedup-target", type=float, default=20.0)
    ap.add_argument("--root", type=Path, default=Path("/tmp/vismem-bench-ann"))
    ap.add_argument("--keep", action="store_true", help="keep the memories under --root")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "ann_1m.json")
    ap.add_argument("--child", nargs=7, metavar=("PATH", "PARAMS", "QUERIES", "OUT", "K", "SINGLES", "BATCH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, params, qfile, out, k, singles, batch = args.child
        child_main(path, params, qfile, out, int(k), int(singles), int(batch))
        return

    logging.basicConfig(level=logging.WARNING, format="    %(name)s: %(message)s")
    logging.getLogger("visual_memory").setLevel(logging.INFO)  # the library's progress log lines
    import faiss

    primary, extras = args.specs[0], args.specs[1:]
    print(f"CPU: {cpu.summary()}; native bf16: {cpu.native_bf16()}")
    print(f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), numpy {np.__version__}, "
          f"load average at start {os.getloadavg()}", flush=True)
    print(f"N={args.n:,} d={args.d} k={args.k}; {args.centres} centres, noise {args.noise}, {args.classes} labels; "
          f"specs {args.specs}", flush=True)
    if args.root.exists():
        shutil.rmtree(args.root)
    args.root.mkdir(parents=True)
    data = Data(args.d, args.centres, args.classes, args.noise, args.seed)
    results: dict = {"benchmark": "ann", "targets": {"recall_at_k": args.recall_target, "agreement": args.agreement_target,
                                                      "speedup": args.speedup_target, "pq_bytes_per_record": 64},
                     "machine": {"cpu": cpu.summary(), "native_bf16": cpu.native_bf16(), "cpus": os.cpu_count(),
                                 "platform": platform.platform(), "faiss": faiss.__version__,
                                 "load_avg_start": os.getloadavg()},
                     "git": git_state(),
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}}

    # -- the two memories and the raw exact index ---------------------------------------
    flat_path, ann_path = args.root / "flat", args.root / "ann"
    mem_flat = vm.create(flat_path, encoder=None, dim=args.d, index="Flat")
    mem_ann = vm.create(ann_path, encoder=None, dim=args.d, index="Flat")
    raw = faiss.IndexFlatIP(args.d)
    add_s = {"flat": 0.0, "ann": 0.0, "raw": 0.0}
    all_cid = np.empty(args.n, np.int64)
    for ci, lo in enumerate(range(0, args.n, CHUNK)):
        n = min(CHUNK, args.n - lo)
        x, cid = data.chunk(ci, n)
        labels, ids = data.label(cid), [f"v{i}" for i in range(lo, lo + n)]
        all_cid[lo : lo + n] = cid
        add_s["raw"] += timed(lambda: raw.add(x))[0]
        add_s["flat"] += timed(lambda: mem_flat.add_embeddings(x, labels, ids=ids))[0]
        add_s["ann"] += timed(lambda: mem_ann.add_embeddings(x, labels, ids=ids))[0]
        say(f"added {lo + n:,}/{args.n:,} records to both memories (add_embeddings {add_s['flat']:.0f} s + "
            f"{add_s['ann']:.0f} s so far; peak RSS {rss_mb():,.0f} MB)")
    del x, cid, labels, ids
    results["add_all_s"] = add_s

    nq = args.queries
    q, q_cid = data.queries(nq)
    q_lat = data.queries(args.latency_queries, which=1)[0]
    want_rows = raw.search(q, args.k)[1]
    want_ids = [[f"v{i}" for i in row] for row in want_rows.tolist()]
    nb = args.boundary_queries
    if nb:
        qb, qb_a, qb_b = data.boundary(nb, args.classes)
        want_b_rows = raw.search(qb, args.k)[1]
        want_b_ids = [[f"v{i}" for i in row] for row in want_b_rows.tolist()]
        exact_b_labels = [p.label for p in mem_flat.classify(qb, k=args.k)]
        nbr = all_cid[want_b_rows]
        results["boundary"] = {
            "queries": nb, "w": [0.4, 0.6],
            "exact_neighbours_from_the_two_centres": float(np.mean((nbr == qb_a[:, None]) | (nbr == qb_b[:, None]))),
            "queries_with_both_centres_in_exact_top_k": float(np.mean([(r == a).any() and (r == b).any()
                                                                       for r, a, b in zip(nbr, qb_a, qb_b)])),
            "exact_vote_is_label_of_a_or_b": float(np.mean([lab in (f"c{a % args.classes}", f"c{b % args.classes}")
                                                            for lab, a, b in zip(exact_b_labels, qb_a, qb_b)])),
        }
        say(f"boundary queries: {results['boundary']['queries_with_both_centres_in_exact_top_k']:.3f} have both centres "
            f"among the exact top-{args.k}")
    t_exact, exact_preds = timed(lambda: mem_flat.classify(q, k=args.k))
    exact_labels = [p.label for p in exact_preds]
    exact_ids = [[nb.id for nb in p.neighbors] for p in exact_preds]
    truth = np.array([f"c{c % args.classes}" for c in q_cid.tolist()])
    results["data"] = {
        "exact_vote_accuracy": float(np.mean(np.array(exact_labels) == truth)),
        "exact_neighbours_sharing_query_centre": float(np.mean(all_cid[want_rows] == q_cid[:, None])),
        "exact_memory_vs_raw_faiss_recall": recall(exact_ids, want_ids),
        "exact_classify_batch_s": t_exact,
        "queries": nq,
    }
    say(f"exact: vote accuracy {results['data']['exact_vote_accuracy']:.4f} against the centres' labels; "
        f"{results['data']['exact_neighbours_sharing_query_centre']:.4f} of the exact top-{args.k} share the query's centre; "
        f"exact memory's neighbours vs raw FAISS: {results['data']['exact_memory_vs_raw_faiss_recall']:.4f}")

    def exact_variants():
        return {"exact memory": lambda one: mem_flat.search(one, k=args.k),
                "raw FAISS IndexFlatIP": lambda one: raw.search(one, args.k)}

    rows: list[dict] = []
    spec_rows: list[dict] = []
    order = [*extras, primary]  # the primary last: its memory then stays for open, limits and edits

    for spec in order:
        say(f"== {spec}: build_index")
        gc.collect()
        info = mem_ann.build_index(spec, progress=False)
        assert mem_ann.index["spec"] == spec, mem_ann.index
        stats = mem_ann.index
        idx_dir = ann_path / "index"
        meta = json.loads((idx_dir / "meta.json").read_text())
        idx_bytes = dir_bytes(idx_dir)
        srow = {"spec": spec, "build_s": info["seconds"], "index_stats": stats, "index_dir_bytes": idx_bytes,
                "index_dir_bytes_per_record": idx_bytes / args.n, "saved_parts_bytes": meta.get("bytes"),
                "faiss_index_bytes_per_record": meta["bytes"]["index"] / args.n,
                "row_table_bytes_per_record": meta["bytes"]["rows"] / args.n}
        say(f"  built in {info['seconds']:.1f} s; saved index {idx_bytes / 1e6:.1f} MB = "
            f"{srow['index_dir_bytes_per_record']:.1f} B/record (FAISS {srow['faiss_index_bytes_per_record']:.1f}, "
            f"row table {srow['row_table_bytes_per_record']:.1f}); code {stats.get('code_bytes')} B")

        # configurations
        compressed = bool(stats.get("compressed"))
        if spec == primary:
            configs = [(p, r) for p in args.nprobe for r in args.rerank]
            mid = args.nprobe[len(args.nprobe) // 2]
            configs.append((mid, 0))
        elif compressed:
            configs = [(p, r) for p in args.nprobe for r in args.extra_rerank]
        else:
            configs = [(p, None) for p in args.nprobe]
        configs.append(("default", None))  # the index's own defaults (nprobe nlist/16, rerank 4)

        def ann_fn(cfg):
            p = None if cfg[0] == "default" else params_of(*cfg)
            return lambda one: mem_ann.search(one, k=args.k, params=p)

        # recall and agreement: one batch per configuration
        cfg_rows = {}
        for j, cfg in enumerate(configs):
            p = None if cfg[0] == "default" else params_of(*cfg)
            t, preds = timed(lambda: mem_ann.classify(q, k=args.k, search_params=p))
            got_ids = [[nb.id for nb in pr.neighbors] for pr in preds]
            labs = [pr.label for pr in preds]
            extra = {}
            if nb:
                tb, preds_b = timed(lambda: mem_ann.classify(qb, k=args.k, search_params=p))
                extra = {"recall_boundary": recall([[nb_.id for nb_ in pr.neighbors] for pr in preds_b], want_b_ids),
                         "agreement_boundary": float(np.mean(np.array([pr.label for pr in preds_b])
                                                             == np.array(exact_b_labels)))}
            cfg_rows[cfg] = {"spec": spec, "nprobe": cfg[0] if cfg[0] != "default" else stats.get("nprobe"),
                             "rerank": cfg[1] if cfg[0] != "default" else (4 if compressed else None),
                             "params": p, "default_params": cfg[0] == "default",
                             "recall_at_k": recall(got_ids, want_ids),
                             "agreement": float(np.mean(np.array(labs) == np.array(exact_labels))),
                             "batch_classify_s": t, "batch_qps": nq / t, "labels_sha": hash(tuple(labs)), **extra}
            say(f"  batch {j + 1}/{len(configs)} {cfg}: recall@{args.k} {cfg_rows[cfg]['recall_at_k']:.4f} "
                f"agreement {cfg_rows[cfg]['agreement']:.4f} ({t:.1f} s for {nq} queries)"
                + (f"; boundary queries: recall {extra['recall_boundary']:.4f} agreement {extra['agreement_boundary']:.4f}"
                   if nb else ""))

        # single-query latency, interleaved with the two exact paths
        variants = exact_variants()
        variants.update({f"ann {cfg}": ann_fn(cfg) for cfg in configs})
        say(f"  timing {len(q_lat)} single queries x {len(variants)} variants in {args.rounds} rounds")
        times = single_query_latency(variants, q_lat, args.rounds)
        med = {name: statistics.median(t) for name, t in times.items()}
        ex_mem, ex_raw = med["exact memory"], med["raw FAISS IndexFlatIP"]
        best_exact = min(ex_mem, ex_raw)
        srow.update(exact_memory_ms=1e3 * ex_mem, exact_raw_faiss_ms=1e3 * ex_raw)
        for cfg in configs:
            r = cfg_rows[cfg]
            ms = med[f"ann {cfg}"]
            r.update(single_ms=1e3 * ms, single_p90_ms=1e3 * float(np.percentile(times[f"ann {cfg}"], 90)),
                     exact_memory_ms=1e3 * ex_mem, exact_raw_faiss_ms=1e3 * ex_raw,
                     speedup=best_exact / ms, speedup_vs_exact_memory=ex_mem / ms, speedup_vs_raw_faiss=ex_raw / ms)
            r["meets"] = (r["recall_at_k"] >= args.recall_target and r["agreement"] >= args.agreement_target
                          and r["speedup"] >= args.speedup_target)
            if nb:
                r["meets_boundary"] = (r["recall_boundary"] >= args.recall_target and r["speedup"] >= args.speedup_target
                                       and r["agreement_boundary"] >= args.agreement_target)
            r.pop("labels_sha")
            rows.append(r)

        if spec == primary and compressed:
            # What re-ranking costs per query: reading rerank x k stored vectors from Lance by row address.
            rng = np.random.default_rng(5)
            reads = {}
            for fetch in (2 * args.k, 4 * args.k, 8 * args.k):
                ts = []
                for _ in range(30):
                    take = np.sort(rng.choice(args.n, fetch, replace=False))
                    ts.append(timed(lambda: mem_ann._state.vectors(take))[0])
                reads[fetch] = 1e3 * statistics.median(ts)
            srow["rerank_read_ms"] = reads
            say("  reading stored vectors for re-ranking (median ms): "
                + ", ".join(f"{n} rows {ms:.2f}" for n, ms in reads.items()))

        # open: the saved index vs (primary only) the Flat memory rebuilding by scanning
        opens, notes, flat_opens = [], [], []
        for i in range(args.open_repeats):
            gc.collect()
            t, m2 = timed(lambda: vm.open(ann_path))
            opens.append(t)
            notes.append(m2._state.load_note)
            m2.close()
            del m2
            if spec == primary and i < 2:
                gc.collect()
                t, m3 = timed(lambda: vm.open(flat_path))
                flat_opens.append(t)
                m3.close()
                del m3
                gc.collect()
        srow.update(open_s=statistics.median(opens), open_all_s=opens, load_notes=notes,
                    loaded_saved=all(n.startswith("loaded the saved index") for n in notes))
        if flat_opens:
            srow.update(flat_open_s=statistics.median(flat_opens), flat_open_all_s=flat_opens,
                        flat_open_over_ann_open=statistics.median(flat_opens) / statistics.median(opens))
        say(f"  open {srow['open_s']:.2f} s ({notes[0]!r})"
            + (f"; Flat memory open {srow['flat_open_s']:.1f} s" if flat_opens else ""))
        spec_rows.append(srow)

    # -- primary: check_index, memory limit, edits -------------------------------------------
    prim = [r for r in rows if r["spec"] == primary]
    meeting = [r for r in prim if r["meets"]]
    # Recall and agreement are the constraints, speed the objective: the best configuration is the
    # fastest meeting all three; else (closest) the fastest meeting recall and agreement; else the best recall.
    quality = [r for r in prim if r["recall_at_k"] >= args.recall_target and r["agreement"] >= args.agreement_target]
    fast = [r for r in prim if r["speedup"] >= args.speedup_target]
    if meeting:
        best, why = max(meeting, key=lambda r: r["speedup"]), "fastest configuration meeting all targets"
    elif quality:
        best, why = max(quality, key=lambda r: r["speedup"]), "closest: fastest meeting recall and agreement (misses speed)"
    else:
        best, why = max(prim, key=lambda r: (r["recall_at_k"], r["agreement"])), "closest: best recall (misses recall)"
    results["best_primary"] = {"meets_all": bool(meeting), "why": why, **best}
    results["fastest_meeting_quality"] = max(quality, key=lambda r: r["speedup"]) if quality else None
    results["best_quality_meeting_speed"] = max(fast, key=lambda r: (r["recall_at_k"], r["agreement"])) if fast else None
    say(f"primary best: {best['params']} recall {best['recall_at_k']:.4f} agreement {best['agreement']:.4f} "
        f"speed-up {best['speedup']:.1f}x ({why})")

    checks = []
    for p in (None, best["params"]):
        say(f"check_index(queries=200, k={args.k}, params={p}) (stored records as queries)")
        t, c = timed(lambda: mem_ann.check_index(queries=200, k=args.k, params=p, progress=False))
        c["seconds"] = t
        checks.append(c)
        say(f"  recall {c['recall_at_k']:.4f} agreement {c['agreement']:.4f} speed-up {c['speedup']:.1f}x "
            f"(exact {c['exact_ms']:.1f} ms, index {c['index_ms']:.2f} ms)")
    results["check_index"] = checks

    # memory limit
    limit = int(args.limit_gb * 1e9)
    raw_bytes = args.n * args.d * 4
    qfile = args.root / "queries.npy"
    np.save(qfile, q)
    singles = 100
    ours = [p.label for p in mem_ann.classify(q, k=args.k, search_params=best["params"])]
    limited = {"raw_vector_bytes": raw_bytes, "limit_bytes": limit, "limit_below_raw": limit < raw_bytes,
               "params": best["params"], "runs": {}}
    # (name, memory, params, single calls, queries per call, under the limit?)
    runs = [("ann", ann_path, best["params"], singles, args.limit_batch, True),
            ("ann_one_call", ann_path, best["params"], 0, nq, True),
            ("ann_one_call_unlimited", ann_path, best["params"], 0, nq, False),
            ("flat_control", flat_path, {}, singles, args.limit_batch, True)]  # exact search takes no parameters
    for which, path, child_params, n_single, batch, limited_run in runs:
        out_json = args.root / f"child_{which}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), json.dumps(child_params),
                str(qfile), str(out_json), str(args.k), str(n_single), str(batch)]
        say(f"subprocess {which}: open + {n_single} single classify calls + {nq} queries in calls of {batch}"
            + (f", under a {limit / 1e9:.2f} GB limit" if limited_run else ", no limit"))
        try:
            if limited_run:
                res = run_limited(limit, argv, timeout=900)
            else:
                t, r = timed(lambda: subprocess.run(argv, capture_output=True, text=True, timeout=900))
                res = {"method": "none", "rc": r.returncode, "seconds": t, "stderr_tail": r.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            res = {"rc": "timeout"}
        res.update(single_calls=n_single, queries_per_call=batch, memory=path.name)
        child = json.loads(out_json.read_text()) if out_json.exists() else {}
        res["last_phase"] = child.get("phase")
        res["completed"] = child.get("phase") == "done"
        res.update({k: child[k] for k in ("open_s", "load_note", "rss_after_open_mb", "rss_after_singles_mb", "batch_s",
                                          "peak_rss_mb", "single_median_ms") if k in child})
        ref = ours if path == ann_path else exact_labels
        if res["completed"]:
            res["agreement_with_unconstrained"] = float(np.mean(np.array(child["labels"]) == np.array(ref)))
            res["agreement_with_exact"] = float(np.mean(np.array(child["labels"]) == np.array(exact_labels)))
        if child.get("single_labels"):
            res["single_agreement_with_unconstrained"] = float(np.mean(
                np.array(child["single_labels"]) == np.array(ref[: len(child["single_labels"])])))
        limited["runs"][which] = res
        say(f"  {which}: method {res.get('method')}, rc {res.get('rc')}, last phase {res['last_phase']!r}, "
            f"peak RSS {res.get('peak_rss_mb', float('nan')):.0f} MB (at the last phase written), cgroup peak "
            f"{res.get('cgroup_peak_bytes')}"
            + (f", agreement with this process {res['agreement_with_unconstrained']:.4f}" if res["completed"] else ""))
    results["memory_limit"] = limited

    # edits: single-record add, remove, forget on the ANN memory and on the exact one
    say("edits: single-record add / remove / forget on both memories")
    new_x, new_c = data.queries(args.edit_repeats * 2, which=7)
    edits: dict = {"ann": {"add": [], "remove": [], "forget": [], "forget_ok": [], "forget_bytes_scanned": [],
                           "forget_codes_scanned": []},
                   "flat": {"add": [], "remove": [], "forget": [], "forget_ok": [], "forget_bytes_scanned": [],
                           "forget_codes_scanned": []}}
    mems = {"ann": mem_ann, "flat": mem_flat}
    for i in range(args.edit_repeats):
        for name in (("ann", "flat") if i % 2 == 0 else ("flat", "ann")):
            m = mems[name]
            t, _ = timed(lambda: m.add_embeddings(new_x[i : i + 1], data.label(new_c[i : i + 1]), ids=[f"new-{name}-{i}"]))
            edits[name]["add"].append(t)
    for i in range(args.edit_repeats):
        for name in (("ann", "flat") if i % 2 == 0 else ("flat", "ann")):
            t, _ = timed(lambda: mems[name].remove(ids=[f"v{args.n - 1 - i}"]))
            edits[name]["remove"].append(t)
    say(f"  adds and removes done; forgetting {args.forget_repeats} record(s) per memory (each scans every file)")
    for i in range(args.forget_repeats):
        for name in (("ann", "flat") if i % 2 == 0 else ("flat", "ann")):
            t, rec = timed(lambda: mems[name].forget(ids=[f"v{args.n - 100 - i}"], progress=False))
            edits[name]["forget"].append(t)
            edits[name]["forget_ok"].append(bool(rec.verification.get("ok")))
            edits[name]["forget_bytes_scanned"].append(rec.verification.get("bytes_scanned"))
            edits[name]["forget_codes_scanned"].append(rec.verification.get("codes_scanned"))
            say(f"  forget on {name}: {t:.1f} s, verification ok={rec.verification.get('ok')}")
    for name in edits:
        for op in ("add", "remove", "forget"):
            edits[name][f"{op}_median_ms"] = 1e3 * statistics.median(edits[name][op])
    edits["ann_index_after"] = mem_ann.index
    m4 = vm.open(ann_path)
    edits["ann_reopen_note"] = m4._state.load_note
    edits["ann_reopen_forgotten_gone"] = f"v{args.n - 100}" not in m4 and f"v{args.n - 1}" not in m4
    m4.close()
    del m4
    results["edits"] = edits
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["rows"] = rows
    results["specs"] = spec_rows
    results["total_s"] = time.perf_counter() - T0

    # -- tables -------------------------------------------------------------------------
    print(f"\nN={args.n:,} d={args.d} k={args.k}; {nq} fresh queries for recall/agreement, {len(q_lat)} single queries "
          f"timed per variant (median ms, this machine, load avg now {os.getloadavg()[0]:.1f});")
    print("speed-up = min(exact memory, raw FAISS IndexFlatIP) single-query ms / index ms, same run")
    hdr = (f"{'spec':<16} {'nprobe':>6} {'rerank':>6} {'recall@k':>9} {'agree':>7} {'ms':>7} {'p90 ms':>7} "
           f"{'x exact':>8} {'x mem':>6} {'batch q/s':>9} {'meets':>5}"
           + (f" {'recall(b)':>9} {'agree(b)':>8} {'meets(b)':>8}" if nb else ""))
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        rr = "-" if r["rerank"] is None else str(r["rerank"])
        npb = f"{r['nprobe']}" + ("*" if r["default_params"] else "")
        print(f"{r['spec']:<16} {npb:>6} {rr:>6} {r['recall_at_k']:>9.4f} {r['agreement']:>7.4f} {r['single_ms']:>7.2f} "
              f"{r['single_p90_ms']:>7.2f} {r['speedup']:>8.1f} {r['speedup_vs_exact_memory']:>6.1f} "
              f"{r['batch_qps']:>9.0f} {'yes' if r['meets'] else 'no':>5}"
              + (f" {r['recall_boundary']:>9.4f} {r['agreement_boundary']:>8.4f} {'yes' if r['meets_boundary'] else 'no':>8}"
                 if nb else ""))
    if nb:
        print(f"(b) = {nb} boundary queries (between two centres of different labels; "
              f"{results['boundary']['queries_with_both_centres_in_exact_top_k']:.2f} have both among the exact top-{args.k})")
    print("* = the index's defaults (no params). exact single-query ms per spec block: "
          + "; ".join(f"{s['spec']}: memory {s['exact_memory_ms']:.1f}, raw FAISS {s['exact_raw_faiss_ms']:.1f}"
                      for s in spec_rows))
    print(f"\n{'spec':<16} {'build s':>8} {'open s':>7} {'Flat open s':>11} {'Flat/open':>9} {'index B/rec':>11} "
          f"{'FAISS B/rec':>11} {'rows B/rec':>10}")
    for s in spec_rows:
        fo = f"{s['flat_open_s']:.1f}" if "flat_open_s" in s else "-"
        ratio = f"{s['flat_open_over_ann_open']:.1f}x" if "flat_open_s" in s else "-"
        print(f"{s['spec']:<16} {s['build_s']:>8.1f} {s['open_s']:>7.2f} {fo:>11} {ratio:>9} "
              f"{s['index_dir_bytes_per_record']:>11.1f} {s['faiss_index_bytes_per_record']:>11.1f} "
              f"{s['row_table_bytes_per_record']:>10.1f}")
    for s_ in spec_rows:
        if "rerank_read_ms" in s_:
            print(f"{s_['spec']}: reading the stored vectors to re-rank one query (Lance take by row address), median ms: "
                  + ", ".join(f"{n} rows {ms:.2f}" for n, ms in s_["rerank_read_ms"].items()))
    print(f"\nedits (single record, median ms on this machine): {'':<4} {'add':>8} {'remove':>8} {'forget':>9}")
    for name in ("ann", "flat"):
        e = edits[name]
        print(f"  {primary if name == 'ann' else 'Flat':<44} {e['add_median_ms']:>8.1f} {e['remove_median_ms']:>8.1f} "
              f"{e['forget_median_ms']:>9.1f}  forget verified: {all(e['forget_ok'])}")
    print("\ncheck_index (200 stored records as queries): " + "; ".join(
        f"params {c['params'] or 'default'}: recall {c['recall_at_k']:.4f} agreement {c['agreement']:.4f} "
        f"speed-up {c['speedup']:.1f}x" for c in checks))
    print(f"\nmemory limit {limit / 1e9:.2f} GB (raw vectors {raw_bytes / 1e9:.3f} GB), method "
          f"{limited['runs'].get('ann', {}).get('method')}, params {best['params']}:")
    for which, r in limited["runs"].items():
        agree = r.get("agreement_with_unconstrained")
        print(f"  {which:<24} {r['memory']:<5} {r['single_calls']:>3} single + calls of {r['queries_per_call']:>4}: "
              f"rc={r.get('rc')!s:>4} completed={r['completed']!s:<5} last phase {r['last_phase']!r:<16} "
              f"peak RSS {r.get('peak_rss_mb', float('nan')):6.0f} MB (last phase written) cgroup peak "
              + (f"{r['cgroup_peak_bytes'] / 1e6:6.0f} MB" if r.get("cgroup_peak_bytes") else "     -   ")
              + (f"  agreement with unconstrained {agree:.4f}" if agree is not None else ""))
    for key, what in (("fastest_meeting_quality", "fastest configuration meeting recall and agreement"),
                      ("best_quality_meeting_speed", "best recall among configurations meeting the speed-up")):
        r = results[key]
        print(f"{what}: " + ("none" if r is None else f"{r['params']} recall {r['recall_at_k']:.4f} agreement "
                                                     f"{r['agreement']:.4f} speed-up {r['speedup']:.1f}x"))
    b = results["best_primary"]
    print(f"\n{primary}: {'' if b['meets_all'] else 'NO configuration met all targets; '}{b['why']}: "
          f"{b['params'] or 'the defaults'}: recall@{args.k} {b['recall_at_k']:.4f} (target {args.recall_target}), agreement "
          f"{b['agreement']:.4f} (target {args.agreement_target}), speed-up {b['speedup']:.1f}x (target {args.speedup_target}x)")
    print(f"total {results['total_s'] / 60:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    del mem_ann, mem_flat, raw
    gc.collect()
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
