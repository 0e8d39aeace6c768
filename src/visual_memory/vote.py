"""Aggregators that turn neighbours into a label, as the paper authors' code does. Pure numpy, no I/O.

A voting neighbour at 0-based rank ``r`` with cosine similarity ``s``
(distance ``d = 1 - s``) gets a vote weight by method (PAPER.md):

===========  ===========================  ==========
plurality    1
distance     exp(-d) ** xi                xi = 1
softmax      exp(s / tau)                 tau = 0.07
rank         1 / (alpha + r)              alpha = 2
===========  ===========================  ==========

The vote is the authors' ``PredictionAggregation.predict``
(``code/main_analysis_plots.ipynb`` in google-deepmind/visual-memory): walk
the neighbours nearest first keeping a running total per label; a label
becomes the prediction only when its total becomes *strictly greater* than
the best total so far. On a tie, the label that *reached* the top total first
wins: plurality over ``[A, B, B, A]`` gives B (B reaches 2 at the third
neighbour, A only at the fourth), ``[2, 3, 3, 1, 1]`` gives 3. The totals
(a prediction's ``scores``) are ordered by the same rule, highest first and,
among equal totals, the label that reached its total first, so the first
score is always the winner. Predictions at every k come from the same walk.

Record weights
--------------
Each record carries a weight ``w >= 0`` (1 by default; soft pruning lowers
it; `Memory.reweight` sets it). `contributions` applies it:

- ``w > 0``: the neighbour keeps its rank position and its vote weight is
  multiplied by ``w`` (soft weights multiply, as the authors'
  ``SoftRankVoting`` / ``SoftPluralityVoting``; 0.001 still holds a rank).
- ``w == 0`` exactly: the neighbour is *excluded*, like a record in the
  authors' exclude sets (hard pruning): it casts no vote and takes no rank
  position, so the next voter gets rank weight ``1 / (alpha + its index
  among the voters)``. ``k`` still counts positions in the retrieved list.
- If every neighbour in a query's list is excluded, none is: they vote as
  if unweighted (w = 1). As in the authors' code this is decided over the
  whole list handed to the vote (the k of `Memory.classify`; the largest k
  for `predict_every_k`, whose smaller k are prefixes of that list).
- At a k before the first voter (`predict_every_k`), the prediction is the
  nearest neighbour's label, the authors' fallback.

Where this departs from the authors' code, on purpose: under exclusions
their distance and softmax aggregators read ``distances[i_count]``, the
distance of the neighbour at the voter's index in the *unfiltered* list,
while the vote here uses each voter's own distance (which is what removing a
neighbour from the list means; the paper reports hard pruning only with the
plurality and rank votes, where both agree). Their ``if not
highest_weight_class`` also treats a falsy label (class ``0``, ``""``) as no
prediction yet; here labels are codes and every label can win. Softmax
weights are shifted by the nearest voter's similarity (``exp((s - s0) /
tau)``) so a small ``tau`` cannot overflow; only ratios decide.

>>> import numpy as np
>>> codes = np.array([[0, 1, 1, 0]])     # labels A=0, B=1 of 4 neighbours, nearest first
>>> sims = np.array([[0.9, 0.8, 0.7, 0.6]])
>>> t = tally(codes, contributions(sims, "plurality"), n_labels=2)
>>> t.winners.tolist(), t.totals.tolist()     # 2-2: B reached 2 first
([1], [[2.0, 2.0]])
>>> tally(codes, contributions(sims, "rank"), n_labels=2).totals.round(3).tolist()   # 1/2 + 1/5 vs 1/3 + 1/4
[[0.7, 0.583]]
>>> w = contributions(sims, "rank", record_weights=np.array([[0.0, 1, 1, 1]]))  # the nearest is excluded
>>> w.round(3).tolist()                       # the next voter takes rank 0
[[0.0, 0.5, 0.333, 0.25]]
>>> predict_every_k(codes, w, n_labels=2).tolist()   # k=1: no voter yet, the nearest's label
[[0, 1, 1, 1]]
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

VOTES = ("plurality", "distance", "softmax", "rank")
DEFAULTS = {"distance": {"xi": 1.0}, "softmax": {"tau": 0.07}, "rank": {"alpha": 2.0}, "plurality": {}}


def check_vote(vote: str, params: Optional[dict] = None) -> dict:
    """Validate a vote name and its parameters; return the resolved parameters.

    Every parameter (xi, tau, alpha) must be a positive finite number.
    """
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
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{vote} parameter {key} must be a positive finite number; got {value}")
        resolved[key] = value
    return resolved


def contributions(
    similarities: np.ndarray, vote: str = "rank", record_weights: Optional[np.ndarray] = None, **params: float
) -> np.ndarray:
    """Each neighbour's contribution to the vote: vote weight x record weight, exclusions applied.

    The one place votes and record weights meet (everything that votes calls it).

    Parameters
    ----------
    similarities : array of shape (n_queries, k)
        Cosine similarities, nearest first; ``-inf`` marks a missing neighbour
        (a memory with fewer than k records).
    vote : {"plurality", "distance", "softmax", "rank"}, default "rank"
    record_weights : array broadcastable to (n_queries, k), optional
        Each neighbour's own weight (>= 0; default 1). Exactly 0 excludes the
        neighbour (no vote, no rank position) unless every neighbour of the
        query is excluded; see the module docstring.
    **params : xi (distance, 1), tau (softmax, 0.07), alpha (rank, 2)

    Returns
    -------
    float64 array of shape (n_queries, k); 0 for missing and excluded neighbours.
    """
    p = check_vote(vote, params)
    s = np.asarray(similarities, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"similarities must have shape (n_queries, k); got {s.shape}")
    present = np.isfinite(s)
    if record_weights is None:
        rw = np.ones(s.shape)
    else:
        rw = np.broadcast_to(np.asarray(record_weights, dtype=np.float64), s.shape)
        bad = present & ~(np.isfinite(rw) & (rw >= 0))
        if bad.any():
            q, j = np.argwhere(bad)[0]
            raise ValueError(f"record weights must be finite and >= 0; got {rw[q, j]} (query {q}, neighbour {j})")
    votes = present & (rw > 0)
    lifted = ~votes.any(axis=1) & present.any(axis=1)  # every neighbour excluded: none is
    if lifted.any():
        votes[lifted] = present[lifted]
        rw = np.where(lifted[:, None], 1.0, rw)
    if vote == "plurality":
        w = np.ones(s.shape)
    elif vote == "distance":
        w = np.exp(-(1.0 - np.where(votes, s, 1.0))) ** p["xi"]  # exp(-d) ** xi, the authors' order of operations
    elif vote == "softmax":
        z = np.where(votes, s / p["tau"], -np.inf)
        top = z.max(axis=1, keepdims=True)
        w = np.exp(z - np.where(np.isfinite(top), top, 0.0))
    else:
        w = 1.0 / (p["alpha"] + np.maximum(np.cumsum(votes, axis=1) - 1, 0))  # rank among the voters
    return np.where(votes, w * rw, 0.0)


class Tally(NamedTuple):
    """Result of `tally`.

    Attributes
    ----------
    winners : int64 array of shape (n_queries,)
        The authors' running winner; -1 when the query has no neighbour.
    totals : float64 array of shape (n_queries, n_labels)
        Summed contributions per label.
    reached : int64 array of shape (n_queries, n_labels)
        0-based neighbour position at which each label's total reached its
        final value (k for a label without a vote): among equal totals the
        smaller comes first, and the winner is the first label in the order
        (highest total, then smallest ``reached``).
    """

    winners: np.ndarray
    totals: np.ndarray
    reached: np.ndarray


def _walk(codes: np.ndarray, weights: np.ndarray, n_labels: int, ks: Sequence[int], reached: bool):
    """The authors' running vote, all queries at once: one step per neighbour position.

    Returns the winner after each k in ``ks`` (shape (n, len(ks))), the final
    totals and, if asked, the position at which each total reached its final value.
    """
    n, K = codes.shape
    L = max(int(n_labels), 1)
    out = np.full((n, len(ks)), -1, dtype=np.int64)
    totals = np.zeros(n * L, dtype=np.float64)  # flat: one linear index per (query, label)
    reach = np.full(n * L, K, dtype=np.int64) if reached else None
    best = np.full(n, -np.inf)
    pred = codes[:, 0].copy() if K else np.full(n, -1, dtype=np.int64)  # before the first voter: the nearest's label
    base = np.arange(n, dtype=np.int64) * L
    at: dict[int, list[int]] = {}
    for i, k in enumerate(ks):
        at.setdefault(int(k), []).append(i)
    # One position per step, contiguous; a neighbour that does not vote adds 0 to its row's label 0
    # (each row appears once per step, so the gather-add-scatter below has no repeated index).
    codes_t = np.ascontiguousarray(codes.T)
    weights_t = np.ascontiguousarray(weights.T)
    for r in range(max(ks, default=0)):
        c, w = codes_t[r], weights_t[r]
        v = (c >= 0) & (w > 0)
        idx = base + np.where(v, c, 0)
        old = totals[idx]
        new = old + np.where(v, w, 0.0)
        totals[idx] = new
        if reached:
            grew = new > old  # a weight too small to change the float total does not move `reached`
            reach[idx[grew]] = r
        up = v & (new > best)  # strictly greater: on a tie the label that got there first stays
        best = np.where(up, new, best)
        pred = np.where(up, c, pred)
        for i in at.get(r + 1, ()):
            out[:, i] = pred
    totals = totals.reshape(n, L)
    return out, totals, (reach.reshape(n, L) if reached else None)


def tally(codes: np.ndarray, weights: np.ndarray, n_labels: int) -> Tally:
    """Sum contributions per label and pick each query's winner by the authors' rule.

    Parameters
    ----------
    codes : int array of shape (n_queries, k)
        Label code of each neighbour in ``[0, n_labels)``; -1 for none.
    weights : float array of shape (n_queries, k)
        Each neighbour's contribution (from `contributions`); a neighbour with
        contribution 0 does not vote.
    n_labels : int

    Returns
    -------
    Tally(winners, totals, reached). ``winners`` is -1 only for a query
    without neighbours (a query whose every contribution is 0 gets its
    nearest neighbour's label, the authors' fallback).
    """
    codes = np.asarray(codes, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    if codes.ndim != 2 or codes.shape != weights.shape:
        raise ValueError(f"codes and weights must have the same shape (n_queries, k); got {codes.shape} and {weights.shape}")
    k = codes.shape[1]
    out, totals, reached = _walk(codes, weights, n_labels, [k] if k else [], reached=True)
    winners = out[:, 0] if k else np.full(len(codes), -1, dtype=np.int64)
    return Tally(winners, totals, reached)


def predict_every_k(codes: np.ndarray, weights: np.ndarray, n_labels: int, ks: Optional[Sequence[int]] = None) -> np.ndarray:
    """Winners for every prefix k = 1..K of the neighbour lists, in one walk.

    Parameters
    ----------
    codes, weights : arrays of shape (n_queries, K)
        As in `tally`; weights must be `contributions` computed on the full K
        lists (exclusions are decided over the whole list, as the authors do).
    n_labels : int
    ks : sequence of int, optional
        Which k to return (1-based); default all 1..K.

    Returns
    -------
    int64 array of shape (n_queries, len(ks)): the winner at each k.
    """
    codes = np.asarray(codes, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    if codes.ndim != 2 or codes.shape != weights.shape:
        raise ValueError(f"codes and weights must have the same shape (n_queries, K); got {codes.shape} and {weights.shape}")
    K = codes.shape[1]
    ks = list(range(1, K + 1)) if ks is None else [int(k) for k in ks]
    if any(k < 1 or k > K for k in ks):
        raise ValueError(f"every k must be in 1..{K}; got {ks}")
    return _walk(codes, weights, n_labels, ks, reached=False)[0]


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
