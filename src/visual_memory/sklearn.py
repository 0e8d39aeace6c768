"""A scikit-learn classifier over embeddings, on the memory's own index and vote code.

`VisualMemoryClassifier` is the paper's kNN classifier as a scikit-learn
estimator: ``fit`` stores L2-normalised embeddings in an index
(`visual_memory.index.make_index`), ``predict`` retrieves each query's
``n_neighbors`` nearest by cosine similarity and lets them vote with
`visual_memory.vote.contributions` and `visual_memory.vote.tally`, exactly
as `Memory.classify` does. It passes scikit-learn's ``check_estimator`` and
works in ``Pipeline``, ``GridSearchCV`` and ``cross_val_score``.

With ``memory=PATH`` the estimator fits into a durable memory directory (the
records are written there, audited and versioned); `Memory.as_estimator`
hands out an estimator over an existing memory, whose predictions are those
of `Memory.classify`.

Sample weights follow scikit-learn's rule: weight 0 is the same as leaving
the sample out, and an integer weight ``n`` the same as repeating the sample
``n`` times (each copy takes a place among the ``n_neighbors``; under the rank
vote each copy also takes a rank). A fractional weight ``w`` counts as
``floor(w)`` copies plus one copy whose vote is multiplied by the rest, so a
weight in (0, 1], the kind pruning gives, multiplies the sample's vote exactly
as a memory record's weight does.
"""

from __future__ import annotations

import os
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.utils._param_validation import Interval, StrOptions
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "visual_memory.sklearn needs scikit-learn >= 1.6: pip install 'visual-memory[sklearn]'"
    ) from exc

from . import vote as voting
from .errors import VisualMemoryError
from .index import as_queries, drop_self, make_index

if TYPE_CHECKING:  # pragma: no cover
    from .memory import Memory

__all__ = ["VisualMemoryClassifier"]

_VOTE_PARAM = {"rank": "alpha", "softmax": "tau", "distance": "xi", "plurality": None}


def as_copies(sims: np.ndarray, codes: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour lists in which a record of weight ``w > 1`` stands for its copies.

    A record of weight ``w`` becomes ``floor(w)`` entries of weight 1, plus one
    entry of weight ``w - floor(w)`` if that is not 0; records of weight in
    (0, 1] stay one entry. The lists are then cut to ``k`` entries, so fitting
    with integer sample weights gives the same lists as repeating the samples.

    Parameters
    ----------
    sims : float array of shape (n_queries, K), nearest first; -inf pads
    codes : int array of shape (n_queries, K); -1 pads
    weights : float array of shape (n_queries, K), each > 0 where present
    k : int
        Entries to keep per query.

    Returns
    -------
    sims, codes, weights : arrays of shape (n_queries, k)

    Examples
    --------
    >>> s, c, w = as_copies(np.array([[0.9, 0.8]]), np.array([[0, 1]]), np.array([[2.5, 1.0]]), 4)
    >>> c.tolist(), w.tolist()
    ([[0, 0, 0, 1]], [[1.0, 1.0, 0.5, 1.0]])
    """
    w = np.asarray(weights, np.float64)
    present = np.asarray(codes) >= 0
    whole = np.floor(w)
    count = np.where(present & (w > 0), whole + ((w - whole) > 0), 0).astype(np.int64)
    n, K = w.shape
    if count.max(initial=0) <= 1 and K <= k:
        return sims, codes, w
    flat = count.ravel()
    src = np.repeat(np.arange(flat.size), flat)  # entry -> the neighbour it copies (ascending)
    within = np.arange(src.size) - (np.cumsum(flat) - flat)[src]
    entry_w = np.where(within < whole.ravel()[src], 1.0, (w - whole).ravel()[src])
    query = src // K
    pos = np.arange(src.size) - np.searchsorted(query, np.arange(n))[query]
    keep = pos < k
    out_s = np.full((n, k), -np.inf, np.float32)
    out_c = np.full((n, k), -1, np.int64)
    out_w = np.zeros((n, k), np.float64)
    q, p, s = query[keep], pos[keep], src[keep]
    out_s[q, p] = np.asarray(sims).ravel()[s]
    out_c[q, p] = np.asarray(codes).ravel()[s]
    out_w[q, p] = entry_w[keep]
    return out_s, out_c, out_w


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32, C-contiguous; an all-zero row stays all zero.

    As in `sklearn.preprocessing.normalize` and
    `sklearn.metrics.pairwise.cosine_similarity`: a zero vector has cosine
    similarity 0 with every vector.

    >>> unit_rows(np.array([[3, 4], [0, 0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    x = np.ascontiguousarray(X, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _sample_weights(sample_weight, n: int) -> np.ndarray:
    """float64 weights of shape (n,), finite and >= 0, not all zero."""
    if sample_weight is None:
        return np.ones(n)
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.ndim != 1 or len(w) != n:
        raise ValueError(f"sample_weight must have shape ({n},), one weight per sample; got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        bad = np.flatnonzero(~np.isfinite(w) | (w < 0))[:5].tolist()
        raise ValueError(f"sample_weight must be finite and >= 0 (bad at samples {bad})")
    if not (w > 0).any():
        raise ValueError("sample_weight is zero for every sample: at least one sample needs a non-zero weight to vote")
    return w


class VisualMemoryClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classifier over embeddings, voting as in the paper.

    Rows of ``X`` are L2-normalised and compared by cosine similarity (the
    inner product of unit vectors; distance = 1 - cosine). An all-zero row
    has no direction; as in `sklearn.metrics.pairwise.cosine_similarity`, its
    cosine with every vector is 0: a zero sample is as near to every query as
    an orthogonal one, and a zero query is equally near to every sample (its
    neighbours are then the earliest-fitted samples). A memory-backed
    estimator refuses zero rows instead, as `Memory` refuses vectors with no
    direction (`VectorError`, a ``ValueError``, naming the rows).

    Parameters
    ----------
    n_neighbors : int, default 50
        Neighbours that vote (capped at the number of fitted samples).
    vote : {"rank", "plurality", "distance", "softmax"}, default "rank"
        Each neighbour's vote weight: rank ``1 / (alpha + r)`` at 0-based rank
        r, plurality 1, distance ``exp(-d) ** xi``, softmax ``exp(s / tau)``.
    alpha : float, default 2.0
        Rank-vote offset (used by ``vote="rank"`` only).
    tau : float, default 0.07
        Softmax temperature (``vote="softmax"`` only).
    xi : float, default 1.0
        Distance-vote exponent (``vote="distance"`` only).
    index : str, default "Flat"
        FAISS index-factory string: ``"Flat"`` is exact search, others
        (``"HNSW32"``, ``"IVF64,Flat"``...) are approximate.
    memory : str or PathLike, optional
        Fit into a new durable memory directory at this path (vectors only,
        labels stored as ``str(label)``, ids ``"0"``..``"n-1"``, sample weights
        as record weights). The path must not hold a memory yet; use
        `Memory.as_estimator` or `from_memory` to predict from an existing one.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Sorted class labels.
    n_features_in_ : int
        Embedding dimension.
    n_samples_fit_ : int
        Samples that can be retrieved (those with a non-zero weight).
    index_ : visual_memory.index.Index
        The fitted search structure (None for a memory-backed estimator).
    memory_ : visual_memory.Memory or None
        The memory searched, if memory-backed.

    Notes
    -----
    `predict` follows the authors' tie rule (the label that reached the top
    total first wins). On an exact tie between totals, `predict_proba` gives
    the winner the next representable float above the others, so that
    ``argmax(predict_proba(X)) == predict(X)`` always holds.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]])
    >>> clf = VisualMemoryClassifier(n_neighbors=2).fit(X, ["cat", "cat", "dog", "dog"])
    >>> clf.predict([[0.8, 0.2], [0.2, 0.7]]).tolist()
    ['cat', 'dog']
    >>> clf.predict_proba([[0.8, 0.2]]).round(3).tolist()  # rank vote: 1/2 + 1/3 for cat
    [[1.0, 0.0]]
    >>> dist, ind = clf.kneighbors([[0.8, 0.2]])
    >>> ind.tolist(), dist.round(3).tolist()               # distance = 1 - cosine
    ([[1, 0]], [[0.009, 0.03]])
    """

    _parameter_constraints: dict = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "vote": [StrOptions(set(voting.VOTES))],
        "alpha": [Interval(Real, 0, None, closed="neither")],
        "tau": [Interval(Real, 0, None, closed="neither")],
        "xi": [Interval(Real, 0, None, closed="neither")],
        "index": [str],
        "memory": [str, os.PathLike, None],
    }

    def __init__(self, n_neighbors: int = 50, *, vote: str = "rank", alpha: float = 2.0, tau: float = 0.07,
                 xi: float = 1.0, index: str = "Flat", memory: Optional[str | os.PathLike] = None) -> None:
        self.n_neighbors = n_neighbors
        self.vote = vote
        self.alpha = alpha
        self.tau = tau
        self.xi = xi
        self.index = index
        self.memory = memory

    # -- fitting ----------------------------------------------------------------------

    def fit(self, X, y, sample_weight=None) -> "VisualMemoryClassifier":
        """Store the embeddings and their labels.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Embeddings (any scale: rows are L2-normalised; none may be all zero).
        y : array-like of shape (n_samples,)
            Class labels.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative; 0 leaves a sample out, an integer n counts it n
            times (see the module docstring). Default 1.

        Returns
        -------
        self
        """
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        x = as_queries(X, X.shape[1], what="X") if self.memory is not None else unit_rows(X)
        w = _sample_weights(sample_weight, len(x))
        self.classes_, codes = np.unique(y, return_inverse=True)
        if self.memory is not None:
            return self._fit_memory(x, codes, w)
        keep = np.flatnonzero(w > 0)
        index = make_index(self.index, x.shape[1])
        index.add(x[keep])
        self.index_, self.memory_ = index, None
        self._codes, self._weights, self._samples = codes[keep].astype(np.int64), w[keep], keep
        self.n_samples_fit_ = len(keep)
        return self

    def _fit_memory(self, x: np.ndarray, codes: np.ndarray, w: np.ndarray) -> "VisualMemoryClassifier":
        from . import memory as vm_memory

        mem = vm_memory.create(self.memory, encoder=None, dim=x.shape[1], index=self.index)
        ids = [str(i) for i in range(len(x))]
        mem.add_embeddings(x, labels=[str(c) for c in self.classes_[codes].tolist()], ids=ids)
        other = np.flatnonzero(w != 1)
        if len(other):
            mem.reweight([ids[i] for i in other.tolist()], w[other])
        self._attach(mem, classes=self.classes_)
        return self

    @classmethod
    def from_memory(cls, memory: "Memory | str | os.PathLike", **params) -> "VisualMemoryClassifier":
        """A fitted estimator over an existing memory (its records, weights and index).

        Predictions equal `Memory.classify` with the same k and vote, and
        follow later edits of the memory; ``classes_`` are its labels at this
        call (strings). ``kneighbors`` returns rows of `Memory.rows`.
        ``index`` is the memory's own. A clone of it is unfitted and would
        `fit` into the same path, which already holds a memory (refused):
        cross-validate standalone estimators on the memory's vectors instead.

        Parameters
        ----------
        memory : Memory or path
        **params : n_neighbors, vote, alpha, tau, xi
        """
        from . import memory as vm_memory

        mem = memory if isinstance(memory, vm_memory.Memory) else vm_memory.open(memory)
        if "index" in params or "memory" in params:
            raise TypeError("from_memory takes the memory's own path and index; pass n_neighbors, vote, alpha, tau or xi")
        est = cls(memory=mem.path, index=mem.index["spec"], **params)
        est._validate_params()
        names = sorted(mem.labels)
        if not names:
            raise VisualMemoryError(f"{mem.path}: the memory has no records to classify with")
        est._attach(mem, classes=np.array(names))
        return est

    def _attach(self, mem: "Memory", *, classes: np.ndarray) -> None:
        self.memory_, self.index_ = mem, None
        self.classes_ = classes
        self.n_features_in_ = mem.dim
        self.n_samples_fit_ = len(mem)

    # -- searching and voting ---------------------------------------------------------

    def _vote_params(self) -> dict:
        name = _VOTE_PARAM[self.vote]
        return {name: float(getattr(self, name))} if name else {}

    def _queries(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return as_queries(X, self.n_features_in_, what="X") if self.memory_ is not None else unit_rows(X)

    def _neighbors(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(sims, rows, class codes, record weights) of the k nearest; -inf / -1 / -1 / 0 pads."""
        if self.memory_ is None:
            sims, rows = self.index_.search(q, k)
            present = rows >= 0
            safe = np.where(present, rows, 0)
            return sims, rows, np.where(present, self._codes[safe], -1), np.where(present, self._weights[safe], 0.0)
        mem = self.memory_
        sims, rows = mem.search(q, k=k)
        codes, weights = mem.rows.codes_weights(rows)
        want = {str(c): i for i, c in enumerate(self.classes_.tolist())}
        lut = np.array([want.get(name, -2) for name in mem.rows.labels.names] + [-1], dtype=np.int64)
        mapped = lut[np.where(codes >= 0, codes, len(lut) - 1)]
        if (mapped == -2).any():
            new = sorted({mem.rows.labels[c] for c in codes[mapped == -2].tolist()})
            raise VisualMemoryError(f"{mem.path}: records labelled {new[:5]} were added after this estimator was made; "
                                    "make a new one with Memory.as_estimator()")
        return sims, rows, mapped, weights

    def _tally(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(winner class index, vote totals of shape (n, n_classes)) of each query."""
        q = self._queries(X)
        k = int(self.n_neighbors)
        if self.memory_ is None:
            sims, _, codes, weights = self._neighbors(q, min(k, self.n_samples_fit_))
            sims, codes, weights = as_copies(sims, codes, weights, k)
        else:  # exactly Memory.classify's lists (the memory may have grown or shrunk since)
            sims, _, codes, weights = self._neighbors(q, k)
        contrib = voting.contributions(sims, self.vote, record_weights=weights, **self._vote_params())
        result = voting.tally(codes, contrib, len(self.classes_))
        winners, totals = np.asarray(result[0]), np.asarray(result[1])
        # No neighbour voted (every one has weight 0, which only a memory can hold): the nearest's label.
        winners = np.where(winners >= 0, winners, codes[:, 0])
        if (winners < 0).any():
            raise VisualMemoryError(f"{self.memory_.path}: the memory has no records left to classify with")
        return winners, totals

    def predict(self, X) -> np.ndarray:
        """Class labels of shape (n_queries,).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
        """
        winners, _ = self._tally(X)
        return self.classes_[winners]

    def predict_proba(self, X) -> np.ndarray:
        """Each class's share of the vote, float64 array of shape (n_queries, n_classes).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
        """
        winners, totals = self._tally(X)
        sums = totals.sum(axis=1, keepdims=True)
        proba = np.divide(totals, sums, out=np.zeros_like(totals), where=sums > 0)
        rows = np.arange(len(proba))
        none = sums[:, 0] <= 0
        proba[rows[none], winners[none]] = 1.0
        # An exact tie: lift the vote's winner by one ulp so argmax(proba) == predict.
        top = proba.max(axis=1)
        tied = (proba == top[:, None]).sum(axis=1) > 1
        proba[rows[tied], winners[tied]] = np.nextafter(top[tied], np.inf)
        return proba

    def kneighbors(self, X=None, n_neighbors: Optional[int] = None, return_distance: bool = True):
        """The nearest fitted samples of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), optional
            Default: the fitted samples themselves, each without its own match
            (exact index only).
        n_neighbors : int, optional
            Default ``self.n_neighbors``; capped at the fitted samples.
        return_distance : bool, default True

        Returns
        -------
        distances : float64 array of shape (n_queries, k)
            Cosine distance ``1 - cosine``, ascending (only if ``return_distance``).
        indices : int64 array of shape (n_queries, k)
            Positions in the ``X`` given to `fit` (memory-backed: rows of
            `Memory.rows`).
        """
        check_is_fitted(self)
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise ValueError(f"n_neighbors must be a positive integer; got {k!r}")
        if X is None:
            sims, rows = self._self_neighbors(int(k))
        else:
            k = min(int(k), self.n_samples_fit_ if self.memory_ is None else max(len(self.memory_), 1))
            sims, rows, _, _ = self._neighbors(self._queries(X), k)
        ind = rows if self.memory_ is not None else np.where(rows >= 0, self._samples[np.maximum(rows, 0)], -1)
        return (1.0 - sims.astype(np.float64), ind) if return_distance else ind

    def _self_neighbors(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.memory_ is not None or not self.index_.lossless:
            raise ValueError("kneighbors(X=None) needs the fitted vectors: pass X (it is supported with index='Flat')")
        k = min(k, self.n_samples_fit_ - 1)
        if k < 1:
            raise ValueError("kneighbors(X=None) needs at least two fitted samples")
        own = np.arange(self.n_samples_fit_)
        sims, rows = self.index_.search(self.index_.vectors(own), k + 1)
        return drop_self(sims, rows, own, k)

    # -- pickling: a memory-backed estimator travels as its path -------------------------

    def __getstate__(self):
        state = super().__getstate__()
        if state.get("memory_") is not None:
            state = {**state, "memory_": None, "_memory_path": str(state["memory_"].path)}
        return state

    def __setstate__(self, state):
        path = state.pop("_memory_path", None)
        super().__setstate__(state)
        if path is not None:
            from . import memory as vm_memory

            self.memory_ = vm_memory.open(Path(path), read_only=True)
