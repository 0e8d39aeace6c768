"""The vote's cost: the authors' running tie rule and exclusions vs the vote before them, in one run.

Baseline = ``src/visual_memory/vote.py`` (and, for classify, the whole package)
at git revision ``--baseline`` (default 8a802f1, the last commit before the
running tie rule), loaded in the same run, on the same inputs:

- tally: vote weights x record weights, then totals and winners, for
  n queries x k neighbours (rank vote; 10 and 1,000 labels);
- every k: `predict_every_k` for all k = 1..K;
- classify: `Memory.classify(Q, k)` end to end on a vectors-only memory (search
  included), each tree in its own subprocess, alternating.

    python benchmarks/bench_vote.py                      # 5,000 queries x k=100
    python benchmarks/bench_vote.py --queries 1000 --k 50

Prints the CPU and a table (best of --repeat, ms; ratio = new / baseline) and
writes benchmarks/results/vote.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from visual_memory import vote as new  # noqa: E402
from visual_memory.sysinfo import cpu_line, cpu_summary  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "vote.json"

CLASSIFY = """
import sys, tempfile, time, numpy as np
sys.path.insert(0, sys.argv[1])
import visual_memory as vm
n, d, q, k, rep = (int(a) for a in sys.argv[2:7])
rng = np.random.default_rng(0)
x = rng.standard_normal((n, d), dtype=np.float32)
mem = vm.create(tempfile.mkdtemp() + "/m", encoder=None, dim=d)
mem.add_embeddings(x, [f"c{i % 10}" for i in range(n)], ids=[f"r{i}" for i in range(n)])
mem.reweight([f"r{i}" for i in range(0, n, 7)], 0.0)
qs = rng.standard_normal((q, d), dtype=np.float32)
mem.classify(qs[:10], k=k)
best = 1e9
for _ in range(rep):
    t = time.perf_counter(); preds = mem.classify(qs, k=k); best = min(best, time.perf_counter() - t)
print(best)
"""


def load_baseline_vote(rev: str):
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:src/visual_memory/vote.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "vote_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("vote_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def export_tree(rev: str) -> Path:
    out = Path(tempfile.mkdtemp()) / "tree"
    out.mkdir()
    tar = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(tar)) as t:
        t.extractall(out)
    return out / "src"


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline", default="8a802f1")
    ap.add_argument("--memory", type=int, default=20000, help="records in the classify memory")
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    print(cpu_line())
    old = load_baseline_vote(args.baseline)
    rng = np.random.default_rng(0)
    n, k = args.queries, args.k
    sims = -np.sort(-rng.uniform(-0.2, 1.0, (n, k)), axis=1)
    rec_w = np.where(rng.random((n, k)) < 1 / 7, 0.0, 1.0)  # every 7th record hard-pruned, as in classify below
    rows = []
    for L in (10, 1000):
        codes = rng.integers(0, L, (n, k))
        t_old = best_ms(lambda: old.tally(codes, old.neighbor_weights(sims, "rank") * rec_w, L), args.repeat)
        t_new = best_ms(lambda: new.tally(codes, new.contributions(sims, "rank", record_weights=rec_w), L), args.repeat)
        rows.append({"what": f"tally, {L} labels", "baseline_ms": t_old, "new_ms": t_new})
        w_old, w_new = old.neighbor_weights(sims, "rank") * rec_w, new.contributions(sims, "rank", record_weights=rec_w)
        t_old = best_ms(lambda: old.predict_every_k(codes, w_old, L), max(1, args.repeat // 2))
        t_new = best_ms(lambda: new.predict_every_k(codes, w_new, L), max(1, args.repeat // 2))
        rows.append({"what": f"every k=1..{k}, {L} labels", "baseline_ms": t_old, "new_ms": t_new})
    base_tree = export_tree(args.baseline)
    t_c = {"baseline_ms": [], "new_ms": []}
    cmd = [str(args.memory), str(args.dim), str(n), str(k), str(max(1, args.repeat // 2))]
    for _ in range(2):  # alternate, so load changes hit both
        for key, tree in (("baseline_ms", base_tree), ("new_ms", REPO / "src")):
            out = subprocess.run([sys.executable, "-c", CLASSIFY, str(tree), *cmd], check=True, capture_output=True, text=True,
                                 env={**os.environ, "VISMEM_PROGRESS": "0", "PYTHONPATH": str(tree)})
            t_c[key].append(1000 * float(out.stdout.strip().splitlines()[-1]))
    rows.append({"what": f"Memory.classify ({args.memory} records, d={args.dim})", "baseline_ms": min(t_c["baseline_ms"]),
                 "new_ms": min(t_c["new_ms"])})
    print(f"\n{n} queries x k={k}, rank vote, 1 in 7 neighbours weight 0; best of {args.repeat} (ms)")
    print(f"{'':38s}{'baseline':>10s}{'new':>10s}{'ratio':>8s}")
    for r in rows:
        r["ratio"] = r["new_ms"] / r["baseline_ms"]
        print(f"{r['what']:38s}{r['baseline_ms']:10.1f}{r['new_ms']:10.1f}{r['ratio']:8.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": cpu_summary(), "queries": n, "k": k, "baseline_rev": args.baseline, "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
