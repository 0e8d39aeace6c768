"""The paper's evaluations, run on embeddings (never on images).

Every experiment takes cached embeddings as arrays, searches exactly with
FAISS, votes with `visual_memory.vote` and scores with
`visual_memory.scores`; a search is shared by every experiment that can use
it (one query search of the full memory serves the k curves, the parameter
sweeps, the i-th neighbour curve, calibration and every label-noise level,
because neighbours do not depend on labels).

`run_experiments` runs them all and returns one JSON-able dict; the
``headline`` entry holds the numbers a reader wants first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .. import vote as voting
from ..index import exact_knn as knn
from ..prune import ISSUE_K, SOFT_K, exact_self_neighbors, mislabel_scores, neighbor_counts, rank_issues, soft_weights
from ..rows import LabelCodes
from ..progress import progress_bar
from ..scores import auroc, expected_calibration_error, label_agreement, ood_scores, plurality_counts, vote_share

log = logging.getLogger(__name__)

K_MAX = 100
SWEEPS = {
    "rank": ("alpha", (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)),
    "softmax": ("tau", (0.01, 0.02, 0.05, 0.07, 0.1, 0.2, 0.5, 1.0)),
    "distance": ("xi", (0.1, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)),
}
NOISE_LEVELS = (0.0, 0.1, 0.3, 0.6)
SIZES = (1, 10, 100, 1000, None)  # per class; None = all
HOLDOUT = ("cat", "truck")  # each has a near neighbour class (dog, automobile) left in memory


@dataclass
class EvalData:
    """Labelled embeddings for the evaluations.

    Attributes
    ----------
    train_x : float32 array of shape (n_train, d), the memory (L2-normalised)
    train_y : sequence of str, shape (n_train,)
    val_x : float32 array of shape (n_val, d), the queries
    val_y : sequence of str, shape (n_val,)
    weights : float array of shape (n_train,), optional
        Record weights (e.g. after pruning); default all 1. Used by the
        experiments on the memory as given (k curves, sweeps, calibration).
    new_x, new_y, new_val_x, new_val_y : optional
        Records and queries of classes the memory has never seen and that are
        distinct from its own (e.g. Fashion-MNIST next to CIFAR-10).
    new_name : str
        Where the new classes come from (for the report).
    """

    train_x: np.ndarray
    train_y: Sequence[str]
    val_x: np.ndarray
    val_y: Sequence[str]
    weights: Optional[np.ndarray] = None
    new_x: Optional[np.ndarray] = None
    new_y: Optional[Sequence[str]] = None
    new_val_x: Optional[np.ndarray] = None
    new_val_y: Optional[Sequence[str]] = None
    new_name: str = "new classes"


def _best(ks: Sequence[int], acc: np.ndarray) -> dict:
    i = int(np.argmax(acc))  # first best: the smallest k reaching it
    return {"k": int(ks[i]), "accuracy": float(acc[i])}


def _fit_log(i: np.ndarray, acc: np.ndarray) -> dict:
    a, b = np.polyfit(np.log(i), acc, 1)
    pred = a * np.log(i) + b
    ss = float(((acc - acc.mean()) ** 2).sum())
    return {"a": float(a), "b": float(b), "r2": float(1 - ((acc - pred) ** 2).sum() / ss) if ss > 0 else 1.0}


def _per_class_subset(y: np.ndarray, n: Optional[int]) -> np.ndarray:
    if n is None:
        return np.arange(len(y))
    keep, seen = [], {}
    for i, c in enumerate(y.tolist()):
        if seen.get(c, 0) < n:
            seen[c] = seen.get(c, 0) + 1
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def run_experiments(
    data: EvalData,
    *,
    k_max: int = K_MAX,
    k_ref: int = 50,
    calib_k: int = 10,
    sizes: Sequence[Optional[int]] = SIZES,
    noise_levels: Sequence[float] = NOISE_LEVELS,
    holdout: Sequence[str] = HOLDOUT,
    self_neighbors: Optional[tuple[np.ndarray, np.ndarray]] = None,
    seed: int = 0,
    progress: bool | str = False,
) -> dict:
    """Run every evaluation of the report.

    Parameters
    ----------
    data : EvalData
    k_max : int, default 100
        Largest k of every curve (capped by the memory size).
    k_ref : int, default 50
        The k at which single-k numbers are given (rank vote), next to the best k.
    calib_k : int, default 10
        Neighbours behind the calibration numbers (vote share, plurality count).
    sizes : sequence of int or None
        Records per class for the memory-size scaling (None = all).
    noise_levels : sequence of float in [0, 1)
        Fractions of memory labels replaced by a random *other* label.
    holdout : pair of str
        Classes removed from the memory for the held-out and OOD experiments
        (skipped if absent).
    self_neighbors : (sims, nbrs), optional
        Precomputed self-neighbours of ``train_x`` (100 columns, or all the
        others in a smaller memory; e.g. from the memory's cache): soft pruning
        counts over the first 10, label issues vote with the first 100.
        Computed here otherwise.
    seed : int, default 0
        Seeds the label noise.

    Returns
    -------
    dict with one entry per experiment plus ``headline``.
    """
    tx = np.ascontiguousarray(data.train_x, dtype=np.float32)
    vx = np.ascontiguousarray(data.val_x, dtype=np.float32)
    coder = LabelCodes.sorted(data.train_y, data.val_y, data.new_y, data.new_val_y)
    ty, vy = coder.encode(data.train_y, add=False), coder.encode(data.val_y, add=False)
    L = len(coder)
    w = np.ones(len(tx)) if data.weights is None else np.asarray(data.weights, dtype=np.float64)
    if len(w) != len(tx) or len(ty) != len(tx) or len(vy) != len(vx):
        raise ValueError(f"EvalData arrays disagree: {len(tx)} train vectors, {len(ty)} labels, {len(w)} weights; "
                         f"{len(vx)} queries, {len(vy)} labels")
    K = min(int(k_max), len(tx))
    k_ref = min(int(k_ref), K)
    calib_k = min(int(calib_k), K)
    ks = list(range(1, K + 1))
    out: dict = {"n_train": int(len(tx)), "n_val": int(len(vx)), "dim": int(tx.shape[1]), "classes": sorted(set(map(str, data.train_y))),
                 "k_max": K, "k_ref": k_ref, "calib_k": calib_k}
    steps = 7
    with progress_bar(progress and "evaluations", total=steps, unit="step") as bar:
        sims, idx = knn(tx, vx, K)
        nb, nw = ty[idx], w[idx]

        # 1. accuracy vs k for the four votes (record weights honoured)
        acc = {v: voting.accuracy_every_k(nb, sims, vy, L, ks, v, nw) for v in voting.VOTES}
        out["accuracy_vs_k"] = {"ks": ks, **{v: a.tolist() for v, a in acc.items()}}
        out["best"] = {v: _best(ks, a) for v, a in acc.items()}
        out["at_k_max"] = {v: float(a[-1]) for v, a in acc.items()}

        # 2. parameter sweeps
        out["sweeps"] = {}
        for v, (p, values) in SWEEPS.items():
            rows = []
            for val in values:
                a = voting.accuracy_every_k(nb, sims, vy, L, ks, v, nw, **{p: val})
                rows.append({p: val, **{f"best_{key}": x for key, x in _best(ks, a).items()}, "at_k_max": float(a[-1]), "at_k_ref": float(a[k_ref - 1])})
            out["sweeps"][v] = {"param": p, "rows": rows}
        bar.advance()

        # 3. accuracy of the i-th neighbour alone
        ith = (nb == vy[:, None]).mean(axis=0)
        i = np.arange(1, K + 1)
        out["ith_neighbor"] = {"i": i.tolist(), "accuracy": ith.tolist(), "fit": _fit_log(i, ith) if K > 2 else None,
                               "true_label_in_top_k": float((nb == vy[:, None]).any(axis=1).mean())}

        # 4. calibration at calib_k (rank vote)
        c_nb, c_s, c_w = nb[:, :calib_k], sims[:, :calib_k], nw[:, :calib_k]
        winners, totals, _ = voting.tally(c_nb, voting.contributions(c_s, "rank", c_w), L)
        correct = winners == vy
        share = vote_share(totals, winners)
        ece, bins = expected_calibration_error(share, correct)
        pc = plurality_counts(c_nb)
        agree = label_agreement(c_nb, len(set(ty.tolist())))
        by_count = [{"count": int(c), "n": int((pc == c).sum()), "accuracy": float(correct[pc == c].mean())} for c in np.unique(pc)]
        edges = np.linspace(0, 1, 6)
        by_agree = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (agree >= lo) & ((agree < hi) if hi < 1 else (agree <= hi))
            by_agree.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()), "accuracy": float(correct[m].mean()) if m.any() else None})
        out["calibration"] = {"k": calib_k, "vote": "rank", "accuracy": float(correct.mean()), "ece": ece, "bins": bins,
                              "by_plurality_count": by_count, "by_agreement": by_agree}
        bar.advance()

        # 5. memory-size scaling (unweighted records, rank and plurality votes)
        out["scaling"] = _scaling(tx, ty, vx, vy, L, sizes, K)
        bar.advance()

        # 6. held-out near classes (and OOD AUROC), then distinct new classes
        out["holdout"] = _holdout(tx, ty, vx, vy, L, coder, holdout, K, k_ref, sims, idx)
        out["new_classes"] = _new_classes(data, tx, ty, vx, vy, coder, K, k_ref, sims, idx)
        bar.advance()

        # 7. label noise, with and without soft pruning; label-issue precision
        if self_neighbors is None:
            sn_sims, sn_nbrs = exact_self_neighbors(tx, max(SOFT_K, ISSUE_K), progress=progress and "self-neighbours")
        else:
            sn_sims, sn_nbrs = self_neighbors
        bar.advance()
        out["label_noise"] = _label_noise(ty, vy, L, idx, sims, sn_nbrs, sn_sims, noise_levels, ks, k_ref, seed)
        bar.advance()
        out["headline"] = _headline(out)
        bar.advance()
    return out


def _scaling(tx, ty, vx, vy, L, sizes, K) -> dict:
    rows, done = [], set()
    for n in sizes:
        sub = _per_class_subset(ty, n)
        if len(sub) in done:  # n per class already covers every record
            continue
        done.add(len(sub))
        k = min(K, len(sub))
        s, ix = knn(tx[sub], vx, k)
        nb = ty[sub][ix]
        ones = np.ones_like(s, dtype=np.float64)
        ks = list(range(1, k + 1))
        r = voting.accuracy_every_k(nb, s, vy, L, ks, "rank", ones)
        p = voting.accuracy_every_k(nb, s, vy, L, ks, "plurality", ones)
        rows.append({"per_class": n, "size": int(len(sub)), "k1": float(r[0]), "rank_best": _best(ks, r), "plurality_best": _best(ks, p),
                     "error": float(1 - r.max())})
    # The paper's law: log10(error) is linear in log10(log10(size)).
    pts = [(np.log10(np.log10(r["size"])), np.log10(r["error"])) for r in rows if r["size"] > 1 and r["error"] > 0]
    fit = None
    if len(pts) >= 2:
        x, y = np.array(pts).T
        a, b = np.polyfit(x, y, 1)
        fit = {"slope": float(a), "intercept": float(b), "form": "log10(error) = slope * log10(log10(size)) + intercept"}
    return {"rows": rows, "fit": fit}


def _vote_acc(nb, s, y, L, k, mask=None, w=None) -> float:
    nb, s = nb[:, :k], s[:, :k]
    contrib = voting.contributions(s, "rank", None if w is None else w[:, :k])
    winners = voting.tally(nb, contrib, L).winners
    ok = winners == y
    if mask is not None:
        ok = ok[mask]
    return float(ok.mean()) if len(ok) else float("nan")


def _holdout(tx, ty, vx, vy, L, coder, holdout, K, k_ref, sims_all, idx_all) -> Optional[dict]:
    names = [h for h in holdout if h in coder.names]
    if len(names) != len(holdout) or not holdout:
        return {"skipped": f"hold-out classes {list(holdout)} not all in the memory"}
    hcodes = coder.encode(names, add=False)
    in_h_train = np.isin(ty, hcodes)
    keep = np.flatnonzero(~in_h_train)
    q_new = np.isin(vy, hcodes)
    k = min(K, len(keep))
    s, ix = knn(tx[keep], vx, k)
    nb = ty[keep][ix]
    res = {"classes": names, "k": k_ref, "n_old_queries": int((~q_new).sum()), "n_new_queries": int(q_new.sum()),
           "old_before": _vote_acc(nb, s, vy, L, k_ref, ~q_new),
           "old_after": _vote_acc(ty[idx_all], sims_all, vy, L, k_ref, ~q_new),
           "new_before": 0.0,
           "new_after": _vote_acc(ty[idx_all], sims_all, vy, L, k_ref, q_new)}
    res["old_change"] = res["old_after"] - res["old_before"]
    ood = {}
    for kk in sorted({1, 10, min(100, k)}):
        sc = ood_scores(s[:, :kk])
        ood[str(kk)] = auroc(sc[q_new], sc[~q_new])
    res["ood_auroc"] = ood
    res["ood_scores"] = {"in": ood_scores(s[~q_new, : min(100, k)]).tolist(), "out": ood_scores(s[q_new, : min(100, k)]).tolist()}
    return res


def _new_classes(data, tx, ty, vx, vy, coder, K, k_ref, sims_all, idx_all) -> Optional[dict]:
    if data.new_x is None or data.new_val_x is None:
        return {"skipped": "no new-class data given (new_classes=None, Fashion-MNIST is not installed, "
                           "or the memory has no encoder)"}
    nx = np.ascontiguousarray(data.new_x, np.float32)
    nvx = np.ascontiguousarray(data.new_val_x, np.float32)
    ny, nvy = coder.encode(data.new_y, add=False), coder.encode(data.new_val_y, add=False)
    L = len(coder)
    both_x = np.concatenate([tx, nx])
    both_y = np.concatenate([ty, ny])
    k = min(K, len(both_x))
    s, ix = knn(both_x, np.concatenate([vx, nvx]), k)
    nb = both_y[ix]
    n_old = len(vx)
    old_after = _vote_acc(nb[:n_old], s[:n_old], vy, L, k_ref)
    new_after = _vote_acc(nb[n_old:], s[n_old:], nvy, L, k_ref)
    old_before = _vote_acc(ty[idx_all], sims_all, vy, L, k_ref)
    # Far OOD: the new classes' queries against the memory that never saw them.
    s_far, _ = knn(tx, nvx, min(K, 100))
    far = auroc(ood_scores(s_far), ood_scores(sims_all[:, : s_far.shape[1]]))
    return {"source": data.new_name, "classes": sorted(set(map(str, data.new_y))), "n_added": int(len(nx)), "k": k_ref,
            "n_old_queries": int(n_old), "n_new_queries": int(len(nvx)),
            "old_before": old_before, "old_after": old_after, "old_change": old_after - old_before,
            "new_before": 0.0, "new_after": new_after, "far_ood_auroc": far}


def _label_noise(ty, vy, L, idx, sims, sn_nbrs, sn_sims, levels, ks, k_ref, seed) -> dict:
    rng = np.random.default_rng(seed)
    present = np.unique(ty)
    rows = []
    n = len(ty)
    for p in levels:
        if not 0 <= p < 1:
            raise ValueError(f"noise levels must be in [0, 1); got {p}")
        n_flip = int(round(p * n))
        flip = rng.choice(n, n_flip, replace=False) if n_flip else np.zeros(0, np.int64)
        noisy = ty.copy()
        if n_flip:
            # A random *other* label present in the memory, so every flip is wrong.
            pos = np.searchsorted(present, ty[flip])
            noisy[flip] = present[(pos + rng.integers(1, len(present), n_flip)) % len(present)]
        nb = noisy[idx]
        ones = np.ones_like(sims, dtype=np.float64)
        plain = voting.accuracy_every_k(nb, sims, vy, L, ks, "rank", ones)
        wrong, _, _ = neighbor_counts(noisy, sn_nbrs, SOFT_K)
        sw = soft_weights(wrong)
        pruned = voting.accuracy_every_k(nb, sims, vy, L, ks, "rank", sw[idx])
        row = {"noise": float(p), "n_flipped": n_flip,
               "rank_at_k_ref": float(plain[k_ref - 1]), "soft_at_k_ref": float(pruned[k_ref - 1]),
               "rank_best": _best(ks, plain), "soft_best": _best(ks, pruned)}
        if n_flip:
            score, _ = mislabel_scores(noisy, sn_nbrs, sn_sims, L, k=ISSUE_K)
            order = rank_issues(score, wrong)[:n_flip]
            is_flip = np.zeros(n, bool)
            is_flip[flip] = True
            row["issue_precision"] = float(is_flip[order].mean())
            row["issue_chance"] = float(p)
            row["issue_auroc"] = auroc(score[is_flip], score[~is_flip]) if n_flip < n else None
        rows.append(row)
    return {"k_ref": k_ref, "soft_k": SOFT_K, "soft_c": 1.75, "issue_k": ISSUE_K, "issue_score": "softmax self-confidence",
            "rows": rows}


def _headline(out: dict) -> dict:
    h: dict = {"best_accuracy": {v: b for v, b in out["best"].items()},
               "rank_vs_plurality_at_k_max": {"k": out["k_max"], "rank": out["at_k_max"]["rank"], "plurality": out["at_k_max"]["plurality"]}}
    for key in ("new_classes", "holdout"):
        r = out.get(key) or {}
        if "old_change" in r:
            h[key] = {x: r[x] for x in ("classes", "old_before", "old_after", "old_change", "new_after")}
    noise = {r["noise"]: r for r in out["label_noise"]["rows"]}
    h["label_issue_precision"] = {str(p): noise[p].get("issue_precision") for p in noise if p > 0}
    h["label_noise"] = {str(p): {"rank": noise[p]["rank_at_k_ref"], "soft": noise[p]["soft_at_k_ref"],
                                 "rank_best": noise[p]["rank_best"]["accuracy"], "soft_best": noise[p]["soft_best"]["accuracy"]} for p in noise}
    if "ood_auroc" in (out.get("holdout") or {}):
        h["ood_auroc_holdout"] = out["holdout"]["ood_auroc"]
    if "far_ood_auroc" in (out.get("new_classes") or {}):
        h["far_ood_auroc"] = out["new_classes"]["far_ood_auroc"]
    h["ece"] = out["calibration"]["ece"]
    return h
