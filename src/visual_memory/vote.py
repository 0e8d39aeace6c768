"""Aggregators that turn neighbours into a label. Pure numpy, no I/O.

A neighbour at 0-based rank ``r`` with cosine similarity ``s`` (distance
``d = 1 - s``) gets a vote weight by method (PAPER.md):

===========  ===========================  ==========
plurality    1
distance     exp(-d) ** xi                xi = 1
softmax      exp(s / tau)                 tau = 0.07
rank         1 / (alpha + r)              alpha = 2
===========  ===========================  ==========

Each weight is multiplied by the record's own weight (1 by default; 0 means
it never votes; soft pruning lowers it). Weights are summed per label and the
highest total wins. Ties go to the label whose first voting neighbour ranks
highest (is nearest), so votes are deterministic.

>>> import numpy as np
>>> codes = np.array([[0, 1, 1]])        # labels of 3 neighbours, nearest first
>>> sims = np.array([[0.9, 0.8, 0.7]])
>>> winners, totals = tally(codes, neighbor_weights(sims, "plurality"), n_labels=2)
>>> winners.tolist(), totals.tolist()
([1], [[1.0, 2.0]])
>>> tally(codes, neighbor_weights(sims, "rank"), n_labels=2)[0].tolist()  # 1/2 vs 1/3 + 1/4
[1]
>>> tally(codes, neighbor_weights(sims, "softmax"), n_labels=2)[0].tolist()  # 1 vs e^(-0.1/0.07) + e^(-0.2/0.07)
[0]
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

VOTES = ("plurality", "distance", "softmax", "rank")
DEFAULTS = {"distance": {"xi": 1.0}, "softmax": {"tau": 0.07}, "rank": {"alpha": 2.0}, "plurality": {}}


def check_vote(vote: str, params: Optional[dict] = None) -> dict:
    """Validate a vote name and its parameters; return the resolved parameters."""
    if vote not in VOTES:
        raise ValueError(f"unknown vote {vote!r}; choose one of {', '.join(VOTES)}")
    resolved = dict(DEFAULTS[vote])
    for key, value in (params or {}).items():
        if value is None:
            continue
        if key not in resolved:
            allowed = ", ".join(resolved) or "none"
            raise ValueError(f"vote {vote!r} takes no parameter {key!r} (allowed: {allowed})")
        value = float(value)
        if not np.isfinite(value) or (key in ("tau",) and value <= 0) or (key == "alpha" and value <= 0):
            raise ValueError(f"{vote} parameter {key} must be a positive finite number; got {value}")
        resolved[key] = value
    return resolved


def neighbor_weights(similarities: np.ndarray, vote: str = "rank", **params: float) -> np.ndarray:
    """Vote weight of each neighbour.

    Parameters
    ----------
    similarities : array of shape (n_queries, k)
        Cosine similarities, nearest first; ``-inf`` marks a missing neighbour.
    vote : {"plurality", "distance", "softmax", "rank"}
    **params : xi (distance), tau (softmax), alpha (rank)

    Returns
    -------
    float64 array of shape (n_queries, k); 0 for missing neighbours.
    """
    p = check_vote(vote, params)
    s = np.asarray(similarities, dtype=np.float64)
    present = np.isfinite(s)
    s0 = np.where(present, s, 0.0)
    if vote == "plurality":
        w = np.ones_like(s0)
    elif vote == "distance":
        w = np.exp(-(1.0 - s0) * p["xi"])
    elif vote == "softmax":
        # exp(s/tau) overflows for small tau; a per-query shift does not change the argmax.
        z = s0 / p["tau"]
        w = np.exp(z - np.where(present, z, -np.inf).max(axis=1, keepdims=True))
    else:
        ranks = np.arange(s0.shape[1], dtype=np.float64)
        w = np.broadcast_to(1.0 / (p["alpha"] + ranks), s0.shape).copy()
    w[~present] = 0.0
    return w


def _winners(totals: np.ndarray, first_rank: np.ndarray) -> np.ndarray:
    best = totals.max(axis=1, keepdims=True)
    tied = (totals == best) & (best > 0)
    key = np.where(tied, first_rank, np.iinfo(np.int64).max)
    win = key.argmin(axis=1)
    return np.where(best[:, 0] > 0, win, -1)


def tally(codes: np.ndarray, weights: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum weights per label and pick the winner of each query.

    Parameters
    ----------
    codes : int array of shape (n_queries, k)
        Label code of each neighbour in ``[0, n_labels)``; -1 for none.
    weights : float array of shape (n_queries, k)
        Final contribution of each neighbour (vote weight x record weight).
    n_labels : int

    Returns
    -------
    winners : int64 array of shape (n_queries,); -1 when no neighbour votes
    totals : float64 array of shape (n_queries, n_labels)
    """
    codes = np.asarray(codes, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    n, k = codes.shape
    valid = (codes >= 0) & (weights > 0)
    totals = np.zeros((n, max(n_labels, 1)), dtype=np.float64)
    qi = np.repeat(np.arange(n), k).reshape(n, k)
    np.add.at(totals, (qi[valid], codes[valid]), weights[valid])
    first_rank = np.full(totals.shape, np.iinfo(np.int64).max, dtype=np.int64)
    ranks = np.broadcast_to(np.arange(k), (n, k))
    # Not a fancy assignment: with repeated indices numpy does not promise which write wins.
    np.minimum.at(first_rank, (qi[valid], codes[valid]), ranks[valid])
    return _winners(totals, first_rank), totals


def predict_every_k(codes: np.ndarray, weights: np.ndarray, n_labels: int, ks: Optional[Sequence[int]] = None) -> np.ndarray:
    """Winners for every prefix k = 1..K of the neighbour lists, in one pass.

    Parameters
    ----------
    codes, weights : arrays of shape (n_queries, K)
        As in `tally`; weights must be those for the full K (rank weights do
        not depend on K, so prefixes are exact).
    n_labels : int
    ks : sequence of int, optional
        Which k to return (1-based); default all 1..K.

    Returns
    -------
    int64 array of shape (n_queries, len(ks)): the winner at each k.
    """
    codes = np.asarray(codes, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    n, K = codes.shape
    ks = list(range(1, K + 1)) if ks is None else [int(k) for k in ks]
    if any(k < 1 or k > K for k in ks):
        raise ValueError(f"every k must be in 1..{K}; got {ks}")
    wanted = {k: i for i, k in enumerate(ks)}
    out = np.full((n, len(ks)), -1, dtype=np.int64)
    totals = np.zeros((n, max(n_labels, 1)), dtype=np.float64)
    first_rank = np.full(totals.shape, np.iinfo(np.int64).max, dtype=np.int64)
    rows = np.arange(n)
    for r in range(max(ks)):
        c, w = codes[:, r], weights[:, r]
        valid = (c >= 0) & (w > 0)
        rv, cv = rows[valid], c[valid]
        totals[rv, cv] += w[valid]
        first_rank[rv, cv] = np.minimum(first_rank[rv, cv], r)
        if r + 1 in wanted:
            out[:, wanted[r + 1]] = _winners(totals, first_rank)
    return out


def contributions(similarities: np.ndarray, vote: str = "rank", record_weights: Optional[np.ndarray] = None,
                  **params: float) -> np.ndarray:
    """Each neighbour's final contribution: its vote weight times its record's weight.

    The one place votes and record weights meet (everything that votes calls it).

    Parameters
    ----------
    similarities : array of shape (n_queries, k)
    vote : str
    record_weights : array of shape (n_queries, k), optional
        The retrieved records' own weights (default 1).
    **params : the vote's parameters

    Returns
    -------
    float64 array of shape (n_queries, k)
    """
    w = neighbor_weights(similarities, vote, **params)
    return w if record_weights is None else w * np.asarray(record_weights, dtype=np.float64)


def accuracy_every_k(codes: np.ndarray, similarities: np.ndarray, truth: np.ndarray, n_labels: int,
                     ks: Optional[Sequence[int]] = None, vote: str = "rank", record_weights: Optional[np.ndarray] = None,
                     **params: float) -> np.ndarray:
    """Top-1 accuracy of a vote at every k, from one neighbour search.

    Parameters
    ----------
    codes, similarities : arrays of shape (n_queries, K)
        Neighbour label codes (-1 = none) and similarities, nearest first.
    truth : int array of shape (n_queries,)
        True label codes (a code no neighbour has counts as wrong).
    n_labels : int
    ks : sequence of int, optional
        Default 1..K.
    vote, record_weights, **params : as `contributions`

    Returns
    -------
    float64 array of shape (len(ks),)
    """
    pred = predict_every_k(codes, contributions(similarities, vote, record_weights, **params), n_labels, ks)
    return (pred == np.asarray(truth)[:, None]).mean(axis=0)
