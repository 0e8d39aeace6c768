"""How sure a kNN decision is, and how novel its query looks. Pure numpy.

Every function takes a batch of neighbour lists (nearest first) and returns one
number per query, so evaluations score thousands of queries at once and a
single `Prediction` uses the same formulas on one row (PAPER.md,
"Interpretability and control"):

==================  =========================================================
vote share          winner's total / all labels' totals (0..1)
plurality count     how many of the k neighbours carry the most common label
label agreement     1 - entropy(neighbour labels) / log(min(k, n_labels))
OOD score           mean distance (1 - cosine) to the k neighbours
==================  =========================================================

>>> import numpy as np
>>> codes = np.array([[0, 0, 1, 0]])
>>> plurality_counts(codes).tolist()
[3]
>>> label_agreement(np.array([[0, 0, 0, 0]]), n_labels=10).tolist()
[1.0]
>>> ood_scores(np.array([[0.9, 0.7]])).round(2).tolist()
[0.2]
"""

from __future__ import annotations

import numpy as np


def _counts(codes: np.ndarray, n_labels: int | None = None) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.int64)
    n, k = codes.shape
    m = int(max(n_labels or 0, codes.max(initial=-1) + 1, 1))
    out = np.zeros((n, m), dtype=np.int64)
    valid = codes >= 0
    rows = np.broadcast_to(np.arange(n)[:, None], codes.shape)
    np.add.at(out, (rows[valid], codes[valid]), 1)
    return out


def vote_share(totals: np.ndarray, winners: np.ndarray) -> np.ndarray:
    """Share of the summed vote that went to the winner.

    Parameters
    ----------
    totals : float array of shape (n_queries, n_labels)
        Summed contributions per label (as from `visual_memory.vote.tally`).
    winners : int array of shape (n_queries,)
        Winning label codes; -1 where no neighbour voted (share 0).

    Returns
    -------
    float64 array of shape (n_queries,) in [0, 1].
    """
    totals = np.asarray(totals, dtype=np.float64)
    winners = np.asarray(winners, dtype=np.int64)
    s = totals.sum(axis=1)
    won = np.take_along_axis(totals, np.maximum(winners, 0)[:, None], axis=1)[:, 0]
    return np.where((winners >= 0) & (s > 0), won / np.where(s > 0, s, 1.0), 0.0)


def plurality_counts(codes: np.ndarray) -> np.ndarray:
    """Count of the most common label among each query's neighbours.

    Parameters
    ----------
    codes : int array of shape (n_queries, k); -1 marks a missing neighbour.

    Returns
    -------
    int64 array of shape (n_queries,), 0 when no neighbour is present.
    """
    return _counts(codes).max(axis=1)


def label_agreement(codes: np.ndarray, n_labels: int | None = None) -> np.ndarray:
    """1 - normalised entropy of the neighbours' labels (1 = unanimous).

    The entropy is divided by its largest possible value, ``log(min(k,
    n_labels))`` with ``k`` the neighbours present, so the score spans 0..1
    whatever k and the number of classes are.

    Parameters
    ----------
    codes : int array of shape (n_queries, k); -1 marks a missing neighbour.
    n_labels : int, optional
        Labels in the memory (default: inferred from ``codes``).

    Returns
    -------
    float64 array of shape (n_queries,); 1 when fewer than two labels are possible.
    """
    counts = _counts(codes, n_labels)
    present = counts.sum(axis=1)
    p = counts / np.maximum(present, 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    n_lab = counts.shape[1] if n_labels is None else int(n_labels)
    hmax = np.log(np.clip(present, 1, max(n_lab, 1)).astype(np.float64))  # no neighbour: log(1) = 0, agreement 1
    return np.where(hmax > 0, 1.0 - h / np.where(hmax > 0, hmax, 1.0), 1.0)


def ood_scores(similarities: np.ndarray) -> np.ndarray:
    """Mean cosine distance to the neighbours: higher = more novel.

    Parameters
    ----------
    similarities : float array of shape (n_queries, k)
        Nearest first; ``-inf`` marks a missing neighbour (ignored).

    Returns
    -------
    float64 array of shape (n_queries,); ``inf`` when no neighbour is present.
    """
    s = np.asarray(similarities, dtype=np.float64)
    present = np.isfinite(s)
    n = present.sum(axis=1)
    d = np.where(present, 1.0 - s, 0.0).sum(axis=1)
    return np.where(n > 0, d / np.maximum(n, 1), np.inf)


def auroc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half.

    Parameters
    ----------
    scores_pos, scores_neg : 1-d float arrays (non-empty)

    >>> auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    1.0
    """
    pos = np.asarray(scores_pos, dtype=np.float64).ravel()
    neg = np.asarray(scores_neg, dtype=np.float64).ravel()
    if not len(pos) or not len(neg):
        raise ValueError("auroc needs at least one positive and one negative score")
    allv = np.concatenate([pos, neg])
    # Average ranks handle ties (Mann-Whitney U).
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    sorted_v = allv[order]
    uniq, start, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> tuple[float, list[dict]]:
    """ECE over equal-width confidence bins, plus the reliability-diagram bins.

    Parameters
    ----------
    confidence : float array of shape (n,), in [0, 1]
    correct : bool array of shape (n,)
    n_bins : int, default 10

    Returns
    -------
    ece : float
        Sum over bins of (bin share of queries) x |accuracy - mean confidence|.
    bins : list of dict with lo, hi, n, accuracy, confidence (None for empty bins)
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if conf.shape != ok.shape or conf.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-d of equal length; got {conf.shape} and {ok.shape}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        acc = float(ok[m].mean()) if n else None
        c = float(conf[m].mean()) if n else None
        if n:
            ece += n / max(len(conf), 1) * abs(acc - c)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n, "accuracy": acc, "confidence": c})
    return float(ece), bins
