"""Reliability of records from their leave-one-out neighbours; pruning; label issues.

The memory is queried against itself with each record's own match removed
(PAPER.md, "Memory pruning"). From those self-neighbours, per record:

- ``wrong``: how often it is among the top-k neighbours of a record with a
  *different* label (it would have voted wrongly), ``right`` likewise for the
  same label;
- ``agreement``: the share of its own top-k neighbours that share its label;
- a label-issue ``score``: 1 - the softmax-vote share of its own label among
  its top-100 self-neighbours (cleanlab's self-confidence, with the kNN vote as
  the predicted probabilities), the best of the scores measured by
  ``benchmarks/bench_label_issues.py`` across memory sizes and noise rates.

Pruning turns ``wrong`` into vote weights through `Memory.reweight` (audited,
reversible): hard pruning gives weight 0 to records with ``wrong >=
threshold``; soft pruning gives ``min(1, c / (1 + wrong))`` over the top 10
(c = 1.75 as in the paper, so records never wrong keep weight 1). Soft-rank
voting is then the ordinary rank vote with those weights.

Self-neighbours are cached in ``MEMORY/cache/`` keyed by the exact set of
alive records (a relabel or reweight keeps the cache; an add or remove drops
it). The cache holds only row positions and similarities: no ids, no vectors,
so erasing a record leaves nothing of it there.

The array functions (`exact_self_neighbors`, `neighbor_counts`,
`soft_weights`, `mislabel_scores`) are pure and are what the evaluations use.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from . import vote as voting
from .errors import VisualMemoryError
from .index import as_queries, check_k, exact_self_knn
from .store import DERIVED_CACHE

if TYPE_CHECKING:  # pragma: no cover
    from .memory import Memory

log = logging.getLogger(__name__)

SOFT_C = 1.75  # the paper's soft-pruning constant
SOFT_K = 10  # soft pruning counts over the top 10 neighbours (paper)
HARD_K = 100
ISSUE_K = 100  # self-neighbours that vote on a record's label (bench_label_issues.py: best k at every size)
ISSUE_TAU = 0.07  # softmax temperature of that vote (DINOv2's, PAPER.md)
CACHE_DIR = DERIVED_CACHE
_CACHE_PREFIX = "self-neighbors-"
BATCH = 2048  # queries per exact search: a (2048 x n) similarity block at a time


# -- pure array functions ---------------------------------------------------------------


def exact_self_neighbors(
    vectors: np.ndarray, k: int, *, batch_size: int = BATCH, progress: bool | str = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every vector among the others (inner product).

    Parameters
    ----------
    vectors : float32 array of shape (n, d), L2-normalised
    k : int
        Neighbours per vector (capped at n - 1).

    Returns
    -------
    sims : float32 array of shape (n, k), descending
    nbrs : int64 array of shape (n, k), positions into ``vectors``
    """
    return exact_self_knn(vectors, k, batch_size=batch_size, progress=progress)


def neighbor_counts(codes: np.ndarray, nbrs: np.ndarray, k: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-record ``wrong``, ``right`` and ``agreement`` from self-neighbours.

    Parameters
    ----------
    codes : int array of shape (n,)
        Label code of each record.
    nbrs : int array of shape (n, K)
        Self-neighbours (positions into ``codes``), nearest first; -1 = none.
    k : int, optional
        Count over the top ``k`` only (default all K).

    Returns
    -------
    wrong : int64 (n,)
        Times the record is among the top-k neighbours of a record with another label.
    right : int64 (n,)
        Times it is among the top-k of a record with its own label.
    agreement : float64 (n,)
        Share of its own top-k neighbours that carry its label (1 when it has none).

    >>> codes = np.array([0, 0, 1])
    >>> nbrs = np.array([[1], [2], [1]])      # 0->1, 1->2, 2->1
    >>> [a.tolist() for a in neighbor_counts(codes, nbrs)]
    [[0, 1, 1], [0, 1, 0], [1.0, 0.0, 0.0]]
    """
    codes = np.asarray(codes, dtype=np.int64)
    nb = np.asarray(nbrs, dtype=np.int64)[:, : (k or nbrs.shape[1])]
    n = len(codes)
    valid = nb >= 0
    same = valid & (codes[np.where(valid, nb, 0)] == codes[:, None])
    diff = valid & ~same
    wrong = np.bincount(nb[diff], minlength=n).astype(np.int64)
    right = np.bincount(nb[same], minlength=n).astype(np.int64)
    have = valid.sum(axis=1)
    agreement = np.where(have > 0, same.sum(axis=1) / np.maximum(have, 1), 1.0)
    return wrong, right, agreement


def soft_weights(wrong: np.ndarray, c: float = SOFT_C) -> np.ndarray:
    """Soft-pruning weights ``min(1, c / (1 + wrong))`` (records never wrong keep 1).

    >>> soft_weights(np.array([0, 1, 2, 6])).round(3).tolist()
    [1.0, 0.875, 0.583, 0.25]
    """
    if not (np.isfinite(c) and c > 0):
        raise ValueError(f"soft-pruning constant c must be a positive finite number; got {c}")
    return np.minimum(1.0, c / (1.0 + np.asarray(wrong, dtype=np.float64)))


def mislabel_scores(
    codes: np.ndarray, nbrs: np.ndarray, sims: np.ndarray, n_labels: int, *, k: int = ISSUE_K, tau: float = ISSUE_TAU
) -> tuple[np.ndarray, np.ndarray]:
    """How likely each record's label is wrong: 1 - its self-confidence under its neighbours' softmax vote.

    Parameters
    ----------
    codes : int array (n,); nbrs, sims : arrays (n, K) of self-neighbours
    n_labels : int
    k : int, default 100
        Neighbours that vote (the first ``k`` of ``nbrs``).
    tau : float, default 0.07
        Softmax temperature: neighbour weight ``exp(similarity / tau)``.

    Returns
    -------
    score : float64 (n,)
        1 - the share of the softmax vote that goes to the record's own label
        (0 = its neighbours all agree with it, 1 = none does; 0 without neighbours).
    suggested : int64 (n,)
        The label code the neighbours vote for (-1 if it has no neighbours).

    >>> codes = np.array([0, 0, 1])
    >>> nbrs = np.array([[1, 2], [0, 2], [0, 1]])
    >>> sims = np.array([[0.9, 0.2], [0.9, 0.2], [0.2, 0.2]])
    >>> score, suggested = mislabel_scores(codes, nbrs, sims, 2, k=2)
    >>> score.round(4).tolist(), suggested.tolist()      # exp(-0.7 / 0.07) = 4.5e-5 of the vote is foreign
    ([0.0, 0.0, 1.0], [0, 0, 0])
    """
    codes = np.asarray(codes, dtype=np.int64)
    nb = np.asarray(nbrs, dtype=np.int64)[:, :k]
    s = np.asarray(sims)[:, :k]
    ncodes = np.where(nb >= 0, codes[np.where(nb >= 0, nb, 0)], -1)
    w = voting.contributions(np.where(nb >= 0, s, -np.inf), "softmax", tau=tau)
    winners, totals, _ = voting.tally(ncodes, w, n_labels)
    tot = totals.sum(axis=1)
    own = totals[np.arange(len(codes)), codes]
    score = np.where(tot > 0, 1.0 - own / np.where(tot > 0, tot, 1.0), 0.0)
    return score, winners


# -- memory-level -----------------------------------------------------------------------


@dataclass(frozen=True)
class SelfNeighbors:
    """The memory queried against itself, self-matches removed.

    Attributes
    ----------
    rows : int64 array of shape (n,)
        Index rows of the alive records, in store order; position ``i`` of
        every other array refers to record ``rows[i]``.
    nbrs : int64 array of shape (n, k)
        Each record's neighbours as positions into ``rows``, nearest first (-1 = none).
    sims : float32 array of shape (n, k)
        Their cosine similarities.
    version : int
        Memory version they were computed at.
    """

    rows: np.ndarray
    nbrs: np.ndarray
    sims: np.ndarray
    version: int

    @property
    def k(self) -> int:
        return int(self.nbrs.shape[1])

    def top(self, k: int) -> "SelfNeighbors":
        """The first ``k`` neighbours only."""
        return SelfNeighbors(self.rows, self.nbrs[:, :k], self.sims[:, :k], self.version)


def _alive_key(ids: list[str]) -> str:
    h = hashlib.sha256()
    for rid in ids:
        h.update(rid.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def self_neighbors(mem: "Memory", *, k: int = HARD_K, progress: bool | str = False, cache: bool | str = True) -> SelfNeighbors:
    """Exact self-neighbours of every record (self-match removed), cached.

    Parameters
    ----------
    mem : Memory
    k : int, default 100
        Neighbours per record (capped at ``len(mem) - 1``).
    progress : bool or str
        Show a progress bar over the records.
    cache : bool, default True
        Read and write ``MEMORY/cache/self-neighbors-<key>.npz``; the key is a
        hash of the alive record ids, so any add or remove invalidates it and a
        relabel or reweight does not. A cached result with a larger k serves
        smaller ones. ``"read"``: use a cached result but write none (dry runs).

    Returns
    -------
    SelfNeighbors

    Notes
    -----
    Search is exact whatever the memory's index, over the stored vectors
    (`Memory.vectors`), because pruning decisions must not depend on an
    approximate search's misses or a compressed index's reconstructions.
    """
    check_k(k)
    table = mem.rows
    rows = table.alive_rows()
    n = len(rows)
    want = min(int(k), max(n - 1, 0))
    path = None
    if cache and isinstance(mem.path, Path):  # derived files are kept beside a local memory only
        key = _alive_key([table.ids[r] for r in rows.tolist()])
        path = mem.path / CACHE_DIR / f"{_CACHE_PREFIX}{key}.npz"
        hit = _load_cache(path, n, want)
        if hit is not None:
            return SelfNeighbors(rows, hit[0][:, :want], hit[1][:, :want], mem.version)
    sims, nbrs = exact_self_neighbors(mem.vectors(rows), want, progress=progress)
    if path is not None and cache != "read":
        _save_cache(path, nbrs, sims)
    return SelfNeighbors(rows, nbrs, sims, mem.version)


def _load_cache(path: Path, n: int, k: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            nbrs, sims = z["nbrs"], z["sims"]
    except Exception:  # a torn or foreign file is a cache miss
        return None
    if nbrs.shape[0] != n or nbrs.shape[1] < k:
        return None
    return nbrs, sims


def _save_cache(path: Path, nbrs: np.ndarray, sims: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"{_CACHE_PREFIX}*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, nbrs=nbrs, sims=sims)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only memory still answers, it just cannot remember
        log.info("self-neighbour cache not written (%s)", exc)


def clear_cache(mem: "Memory") -> int:
    """Delete cached self-neighbours (e.g. after `forget`). Returns files removed."""
    if not isinstance(mem.path, Path):
        return 0
    d = mem.path / CACHE_DIR
    files = list(d.glob(f"{_CACHE_PREFIX}*")) if d.is_dir() else []
    for f in files:
        f.unlink(missing_ok=True)
    return len(files)


@dataclass
class Reliability:
    """Per-record evidence from self-neighbours (arrays aligned with ``ids``)."""

    ids: list[str]
    labels: list[str]
    wrong: np.ndarray
    right: np.ndarray
    agreement: np.ndarray
    k: int
    version: int

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "version": self.version,
            "records": [
                {"id": i, "label": lab, "wrong": int(w), "right": int(r), "agreement": float(a)}
                for i, lab, w, r, a in zip(self.ids, self.labels, self.wrong, self.right, self.agreement)
            ],
        }


def reliability(mem: "Memory", *, k: int = SOFT_K, progress: bool | str = False, cache: bool | str = True) -> Reliability:
    """``wrong``, ``right`` and ``agreement`` for every record, over the top ``k`` self-neighbours (``cache``: as `self_neighbors`)."""
    sn = self_neighbors(mem, k=max(k, 1), progress=progress, cache=cache)
    table = mem.rows
    codes = table.codes[sn.rows]
    wrong, right, agreement = neighbor_counts(codes, sn.nbrs, k)
    return Reliability([table.ids[r] for r in sn.rows.tolist()], table.labels.decode(codes).tolist(), wrong, right,
                       agreement, k, sn.version)


@dataclass(frozen=True)
class PruneResult:
    """What `prune` did.

    ``changed`` records got a new weight at ``version`` (``version_before`` is
    the version undo restores weights from); ``pruned`` of them now have
    weight 0 (hard) or below 1 (soft).
    """

    version: int
    mode: str
    changed: int
    pruned: int
    version_before: int
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"version": self.version, "mode": self.mode, "changed": self.changed, "pruned": self.pruned,
                "version_before": self.version_before, **self.params}


@dataclass(frozen=True)
class PrunePlan:
    """The weights a prune would set (computed, not applied): `Memory.prune` applies it."""

    mode: str
    ids: list[str]
    weights: np.ndarray
    pruned: int
    params: dict = field(default_factory=dict)

    @property
    def audit(self) -> dict:
        return {"mode": self.mode, "pruned": self.pruned, **self.params}


def plan(
    mem: "Memory",
    *,
    mode: str = "soft",
    threshold: Optional[int] = None,
    k: Optional[int] = None,
    c: float = SOFT_C,
    progress: bool | str = False,
    cache: bool | str = True,
) -> PrunePlan:
    """The weights that pruning gives the records (nothing is written).

    Parameters
    ----------
    mem : Memory
    mode : {"soft", "hard", "undo"}, default "soft"
        ``"hard"``: weight 0 for records with ``wrong >= threshold`` (they stop
        voting but stay inspectable). ``"soft"``: weight ``min(1, c / (1 +
        wrong))``. ``"undo"``: give back every record the weight it had before
        the most recent prune that is not yet undone (records edited since keep
        their newer weight).
    threshold : int
        Required for hard pruning; >= 1.
    k : int, optional
        Neighbours counted per record: default 10 (soft, as in the paper), 100 (hard).
    c : float, default 1.75
        Soft-pruning constant.
    cache : bool or "read", default True
        Self-neighbour cache use (`self_neighbors`); ``"read"`` writes nothing.

    Returns
    -------
    PrunePlan
        Only records whose weight would change are listed.

    Every weight is computed from the same self-neighbours whatever the
    current weights are, so pruning twice gives the same weights (not
    compounded). `Memory.prune` applies the plan as one audited version
    (op ``"prune"``, with the mode, parameters and the version before, which
    is what undo restores from).
    """
    if mode not in ("soft", "hard", "undo"):
        raise ValueError(f"mode must be 'soft', 'hard' or 'undo'; got {mode!r}")
    if mode == "undo":
        return _undo_plan(mem)
    if mode == "hard":
        if threshold is None or isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or threshold < 1:
            raise ValueError(f"hard pruning needs an integer threshold >= 1 (records with wrong >= threshold stop voting); got {threshold!r}")
    elif threshold is not None:
        raise ValueError("threshold applies to hard pruning only; soft pruning weights every record by c / (1 + wrong)")
    if mode == "soft":
        soft_weights(np.zeros(1), c)  # validates c before any work
    k = check_k(k if k is not None else (SOFT_K if mode == "soft" else HARD_K))
    rel = reliability(mem, k=k, progress=progress, cache=cache)
    new = (np.where(rel.wrong >= threshold, 0.0, 1.0) if mode == "hard" else soft_weights(rel.wrong, c)).astype(np.float32)
    params = {"k": k, "threshold": threshold} if mode == "hard" else {"k": k, "c": float(c)}
    pruned = int((new == 0).sum() if mode == "hard" else (new < 1).sum())
    return _changes(mem, rel.ids, new, mode=mode, pruned=pruned, params=params)


def _changes(mem: "Memory", ids: list[str], new: np.ndarray, *, mode: str, pruned: int, params: dict) -> PrunePlan:
    table = mem.rows
    rows, _ = table.rows_of(ids)
    change = np.flatnonzero(~np.isclose(table.weights[rows], new, rtol=0, atol=1e-7))
    return PrunePlan(mode, [ids[i] for i in change.tolist()], new[change], pruned, params)


def _prune_lines(mem: "Memory") -> list[dict]:
    """Audit lines of prunes that changed weights, with ``version_before``/``version_after`` (either log format)."""
    out = []
    for e in mem.history():
        if e.get("op") != "prune" or not e.get("changed", e.get("n")):
            continue
        after = e.get("version_after", e.get("version"))
        out.append({**e, "version_after": int(after), "version_before": int(e.get("version_before", after - 1))})
    return out


def _undo_plan(mem: "Memory") -> PrunePlan:
    from .store import Store

    entries = _prune_lines(mem)
    undone = {e.get("undoes") for e in entries if e.get("mode") == "undo"}
    todo = [e for e in entries if e.get("mode") != "undo" and e["version_after"] not in undone]
    if not todo:
        raise VisualMemoryError(f"{mem.path}: no prune to undo (every prune in the audit log is undone or changed nothing)")
    last = todo[-1]
    try:
        old = Store.open(mem.path, version=last["version_before"])
        pruned_at = Store.open(mem.path, version=last["version_after"])
    except VisualMemoryError as exc:
        raise VisualMemoryError(
            f"{mem.path}: cannot undo the prune at version {last['version_after']}: an earlier version it needs "
            f"is gone ({exc}); `forget` erases old versions. Reset weights with `reweight` instead."
        ) from exc
    w_old = _weights_by_id(old)
    w_pruned = _weights_by_id(pruned_at)
    table = mem.rows
    ids, weights = [], []
    for rid, w in w_pruned.items():
        row = table.row(rid)
        if row is not None and rid in w_old and w_old[rid] != w and np.isclose(table.weights[row], w, atol=1e-7):
            ids.append(rid)
            weights.append(w_old[rid])
    return PrunePlan("undo", ids, np.array(weights, dtype=np.float32), 0, {"undoes": last["version_after"]})


def _weights_by_id(store) -> dict[str, float]:
    t = store.read_columns(["id", "weight"])
    return dict(zip(t.column("id").to_pylist(), t.column("weight").to_numpy(zero_copy_only=False).tolist()))


# -- label issues ------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelIssue:
    """A record whose label its own neighbours dispute.

    ``score`` = 1 - the share of its neighbours' softmax vote that backs its
    label; ``wrong`` = how often it is a neighbour (top 10) of a record with
    another label; ``neighbors`` = (id, label, similarity) of the neighbours
    that voted, nearest first.
    """

    id: str
    label: str
    suggested: Optional[str]
    score: float
    wrong: int
    neighbors: list[tuple[str, str, float]]

    def to_dict(self) -> dict:
        return {"id": self.id, "label": self.label, "suggested": self.suggested, "score": self.score, "wrong": self.wrong,
                "neighbors": [{"id": i, "label": lab, "similarity": s} for i, lab, s in self.neighbors]}


def rank_issues(score: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """Record positions, most suspicious first: by ``score``, then ``wrong``, both descending (stable)."""
    return np.lexsort((-np.asarray(wrong), -np.asarray(score)))


def label_issues(mem: "Memory", *, k: int = ISSUE_K, limit: Optional[int] = 20, min_score: float = 0.5,
                 progress: bool | str = False) -> list[LabelIssue]:
    """Records most likely mislabelled, most suspicious first.

    Parameters
    ----------
    mem : Memory
    k : int, default 100
        Self-neighbours that vote on each record's label (softmax vote, tau
        0.07); the default is the best measured by ``benchmarks/bench_label_issues.py``
        on CIFAR-10 memories of 300 to 45,000 records with 10% and 30% of labels flipped.
    limit : int or None, default 20
        Return at most this many (None: all above ``min_score``).
    min_score : float, default 0.5
        Only records whose neighbours give their label less than half the vote.

    Returns
    -------
    list of LabelIssue, sorted by score, then by ``wrong`` (times the record
    misled a neighbour), both descending.
    """
    check_k(k)
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be >= 0 or None; got {limit!r}")
    sn = self_neighbors(mem, k=max(k, SOFT_K), progress=progress)
    table = mem.rows
    codes = table.codes[sn.rows]
    score, suggested = mislabel_scores(codes, sn.nbrs, sn.sims, len(table.labels), k=k)
    wrong, _, _ = neighbor_counts(codes, sn.nbrs, SOFT_K)
    order = rank_issues(score, wrong)
    order = order[score[order] >= min_score]
    if limit is not None:
        order = order[:limit]
    out = []
    for i in order:
        nb = [(table.ids[sn.rows[j]], table.labels[codes[j]], float(s)) for j, s in zip(sn.nbrs[i, :k], sn.sims[i, :k]) if j >= 0]
        sug = table.labels[suggested[i]] if suggested[i] >= 0 else None
        out.append(LabelIssue(table.ids[sn.rows[i]], table.labels[codes[i]], sug, float(score[i]), int(wrong[i]), nb))
    return out


class KNNLabelIssues:
    """scikit-learn-style finder of label issues in a labelled embedding set.

    Parameters
    ----------
    n_neighbors : int, default 100
    tau : float, default 0.07
        Softmax temperature of the neighbours' vote.

    Attributes (after `fit`)
    ------------------------
    scores_ : float64 array of shape (n_samples,)
        1 - share of the neighbours' softmax vote backing each sample's label.
    suggested_labels_ : object array of shape (n_samples,)
    ranking_ : int64 array, sample indices, most suspicious first
    wrong_ : int64 array, times each sample misled a neighbour (top 10)

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1, 0], [0.99, 0.1], [0.98, -0.1], [0, 1], [0.1, 0.99], [-0.1, 0.98]])
    >>> y = ["a", "a", "b", "b", "b", "b"]        # sample 2 sits among the a's
    >>> int(KNNLabelIssues(n_neighbors=2).fit(X, y).ranking_[0])
    2
    """

    def __init__(self, n_neighbors: int = ISSUE_K, *, tau: float = ISSUE_TAU) -> None:
        self.n_neighbors = n_neighbors
        self.tau = tau

    def fit(self, X, y: Sequence) -> "KNNLabelIssues":
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must have shape (n_samples, n_features); got {X.shape}")
        x = as_queries(X, X.shape[1], what="X")
        y = np.asarray(list(y), dtype=object)
        if len(y) != len(x):
            raise ValueError(f"X has {len(x)} samples but y has {len(y)} labels")
        if isinstance(self.n_neighbors, bool) or int(self.n_neighbors) < 1:
            raise ValueError(f"n_neighbors must be >= 1; got {self.n_neighbors!r}")
        voting.check_vote("softmax", {"tau": self.tau})
        classes, codes = np.unique(y.astype(str), return_inverse=True)
        sims, nbrs = exact_self_neighbors(x, max(int(self.n_neighbors), SOFT_K))
        self.scores_, sug = mislabel_scores(codes, nbrs, sims, len(classes), k=int(self.n_neighbors), tau=self.tau)
        self.wrong_ = neighbor_counts(codes, nbrs, SOFT_K)[0]
        self.suggested_labels_ = np.where(sug >= 0, classes[np.maximum(sug, 0)], None).astype(object)
        self.ranking_ = rank_issues(self.scores_, self.wrong_)
        self.classes_ = classes
        return self

    def find(self, n: Optional[int] = None) -> np.ndarray:
        """Indices of the ``n`` most suspicious samples (default: those scoring >= 0.5)."""
        if not hasattr(self, "ranking_"):
            raise VisualMemoryError("call fit(X, y) first")
        if n is None:
            return self.ranking_[self.scores_[self.ranking_] >= 0.5]
        return self.ranking_[: int(n)]
