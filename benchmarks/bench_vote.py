"""The vote's cost: the authors' running tie rule and exclusions vs the vote before them, in one run.

Baseline = ``src/visual_memory/vote.py`` (and, for classify, the whole package)
at git revision ``--baseline`` (default: the parent of the commit "Votes equal
the authors' aggregator code", i.e. the tree just before the running tie
rule), loaded in the same run, on the same inputs:

- tally: vote weights x record weights, then totals and winners, for
  n queries x k neighbours (rank vote; 10 and 1,000 labels);
- every k: `predict_every_k` for all k = 1..K;
- classify's vote: on a vectors-only memory's real search results (every 7th
  record weight 0), the baseline's weights + tally + score order vs ours
  (contributions + tally + `_score_dicts`); the whole `Memory.classify` is
  timed too, to show the vote's share of it (the search is the same code).

    python benchmarks/bench_vote.py                      # 5,000 queries x k=100
    python benchmarks/bench_vote.py --queries 1000 --k 50

Prints the CPU and a table (best of --repeat, ms, garbage collection off while
timing as in `timeit`; ratio = new / baseline) and writes benchmarks/results/vote.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from visual_memory import vote as new  # noqa: E402
from visual_memory import cpu  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "vote.json"

def load_baseline_vote(rev: str):
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:src/visual_memory/vote.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "vote_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("vote_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    with _no_gc():
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return 1000 * min(times)


@contextlib.contextmanager
def _no_gc():
    """As `timeit` does: a collection triggered by one side's allocations would be charged to whichever runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def best_pair(baseline, ours, repeat: int) -> tuple[float, float]:
    """Best-of-``repeat`` ms of each, alternating runs so a change in machine load hits both."""
    baseline(), ours()
    tb, to = [], []
    with _no_gc():
        for _ in range(repeat):
            for fn, out in ((baseline, tb), (ours, to)):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
    return 1000 * min(tb), 1000 * min(to)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline", default=None, help="git revision (default: just before the running tie rule)")
    ap.add_argument("--memory", type=int, default=20000, help="records in the classify memory")
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    print("CPU:", cpu.summary())
    if args.baseline is None:
        found = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%H", "--grep", "Votes equal the authors' aggregator code"],
                               check=True, capture_output=True, text=True).stdout.strip()
        if not found:
            raise SystemExit("no commit 'Votes equal the authors' aggregator code' in this history; pass --baseline REV")
        args.baseline = found + "^"
    old = load_baseline_vote(args.baseline)
    rng = np.random.default_rng(0)
    n, k = args.queries, args.k
    sims = -np.sort(-rng.uniform(-0.2, 1.0, (n, k)), axis=1)
    rec_w = np.where(rng.random((n, k)) < 1 / 7, 0.0, 1.0)  # every 7th record hard-pruned, as in classify below
    rows = []
    for L in (10, 1000):
        codes = rng.integers(0, L, (n, k))
        t_old, t_new = best_pair(lambda: old.tally(codes, old.neighbor_weights(sims, "rank") * rec_w, L),
                                 lambda: new.tally(codes, new.contributions(sims, "rank", rec_w), L), args.repeat)
        rows.append({"what": f"tally, {L} labels", "baseline_ms": t_old, "new_ms": t_new})
        w_old, w_new = old.neighbor_weights(sims, "rank") * rec_w, new.contributions(sims, "rank", rec_w)
        t_old, t_new = best_pair(lambda: old.predict_every_k(codes, w_old, L), lambda: new.predict_every_k(codes, w_new, L),
                                 max(1, args.repeat // 2))
        rows.append({"what": f"every k=1..{k}, {L} labels", "baseline_ms": t_old, "new_ms": t_new})
    # classify: the vote on a real memory's search results (old vote + old score order vs new), and the
    # whole classify (new) to show the vote's share of it; the search itself is the same code on both sides.
    import tempfile as _tf

    import visual_memory as vm
    from visual_memory.memory import _score_dicts

    x = rng.standard_normal((args.memory, args.dim), dtype=np.float32)
    mem = vm.create(_tf.mkdtemp() + "/m", encoder=None, dim=args.dim)
    mem.add_embeddings(x, [f"c{i % 10}" for i in range(args.memory)], ids=[f"r{i}" for i in range(args.memory)])
    mem.reweight([f"r{i}" for i in range(0, args.memory, 7)], 0.0)
    qs = rng.standard_normal((n, args.dim), dtype=np.float32)
    s_q, rows_q = mem.search(qs, k=k)
    codes_q, w_q = mem.rows.codes_weights(rows_q)
    names = mem.rows.labels.names

    def old_vote():  # the baseline's classify: weights x record weights, tally, score dicts (equal totals by label code)
        won, totals = old.tally(codes_q, old.neighbor_weights(s_q, "rank") * w_q, len(names))
        qi, ci = np.nonzero(totals)
        vals = totals[qi, ci]
        order = np.lexsort((-vals, qi))
        lab, vals = list(map(names.__getitem__, ci[order].tolist())), vals[order].tolist()
        bounds = np.concatenate([[0], np.cumsum(np.bincount(qi, minlength=len(totals)))]).tolist()
        [dict(zip(lab[a:b], vals[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]

    def new_vote():
        t = new.tally(codes_q, new.contributions(s_q, "rank", w_q), len(names))
        _score_dicts(t.totals, names, t.reached)

    t_old, t_new = best_pair(old_vote, new_vote, args.repeat)
    rows.append({"what": f"classify's vote ({args.memory} records, d={args.dim})", "baseline_ms": t_old, "new_ms": t_new})
    t_all = best_ms(lambda: mem.classify(qs, k=k), 2)
    print(f"whole Memory.classify (new): {t_all:.0f} ms, of which the vote above is {100 * rows[-1]['new_ms'] / t_all:.1f}%")
    print(f"\n{n} queries x k={k}, rank vote, 1 in 7 neighbours weight 0; best of {args.repeat} (ms)")
    print(f"{'':38s}{'baseline':>10s}{'new':>10s}{'ratio':>8s}")
    for r in rows:
        r["ratio"] = r["new_ms"] / r["baseline_ms"]
        print(f"{r['what']:38s}{r['baseline_ms']:10.1f}{r['new_ms']:10.1f}{r['ratio']:8.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": cpu.summary(), "cpu_features": cpu.features(), "queries": n, "k": k, "baseline_rev": args.baseline, "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
