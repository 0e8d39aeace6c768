"""Exact inner-product search: the reference every approximate index is measured against.

`exact_knn` is the one exact kNN of the package (classify, self-neighbours,
evaluations, index checks all use it). `ExactIndex` keeps the vectors in one
growing float32 matrix and searches it with `exact_knn`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..progress import progress_bar
from .base import Index, check_k, checked, drop_dead, pad_results

BATCH = 4096  # queries per search call: bounds the (batch x n) similarity block


def _search_block(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    return faiss.knn(queries, db, k, metric=faiss.METRIC_INNER_PRODUCT)


def exact_knn(
    db: np.ndarray, queries: np.ndarray, k: int, *, batch_size: int = BATCH, progress: bool | str = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``db`` for each query, by inner product.

    Parameters
    ----------
    db : float32 array of shape (n, d)
    queries : float32 array of shape (q, d)
    k : int
        Capped at n.
    batch_size : int, default 4096
    progress : bool or str

    Returns
    -------
    sims : float32 array of shape (q, min(k, n)), descending
    idx : int64 array of shape (q, min(k, n))

    Examples
    --------
    >>> db = np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype="float32")
    >>> exact_knn(db, db[[2]], 2)[1].tolist()
    [[2, 1]]
    """
    db = np.ascontiguousarray(db, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(check_k(k), len(db))
    sims = np.empty((len(q), k), np.float32)
    idx = np.empty((len(q), k), np.int64)
    if k == 0 or len(q) == 0:
        return sims, idx
    with progress_bar(progress, total=len(q), unit="query") as bar:
        for lo in range(0, len(q), batch_size):
            hi = min(lo + batch_size, len(q))
            sims[lo:hi], idx[lo:hi] = _search_block(db, q[lo:hi], k)
            bar.advance(hi - lo)
    return sims, idx


def drop_self(sims: np.ndarray, nbrs: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own entry from (n, k + 1) neighbour lists, keeping order.

    Where the record itself was not retrieved (an exact duplicate can outrank
    it on ties), the last column is dropped instead.

    Returns
    -------
    sims : float32 (n, k), nbrs : int64 (n, k)
    """
    is_self = nbrs == own[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(sims, order, axis=1).astype(np.float32, copy=False),
            np.take_along_axis(nbrs, order, axis=1).astype(np.int64, copy=False))


def exact_self_knn(
    db: np.ndarray, k: int, *, positions: Optional[np.ndarray] = None, batch_size: int = BATCH,
    progress: bool | str = False, search: Optional[Callable] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest *other* rows of ``db`` for the rows at ``positions`` (default all): leave-one-out.

    Parameters
    ----------
    db : float32 array of shape (n, d)
    k : int
        Capped at n - 1.
    positions : int array, optional
        Which rows to query (default every row).
    search : callable(queries, k) -> (sims, idx), optional
        The kNN to use over ``db`` (default `exact_knn`).

    Returns
    -------
    sims : float32 array of shape (len(positions), k), descending; -inf pads
    nbrs : int64 array of shape (len(positions), k), positions into ``db``; -1 pads
    """
    db = np.ascontiguousarray(db, dtype=np.float32)
    n = len(db)
    positions = np.arange(n) if positions is None else np.asarray(positions, np.int64)
    k = min(int(k), max(n - 1, 0))
    sims = np.full((len(positions), k), -np.inf, dtype=np.float32)
    nbrs = np.full((len(positions), k), -1, dtype=np.int64)
    if k == 0:
        return sims, nbrs
    search = search or (lambda q, kk: exact_knn(db, q, kk, batch_size=len(q)))
    with progress_bar(progress, total=len(positions), unit="rec") as bar:
        for lo in range(0, len(positions), batch_size):
            hi = min(lo + batch_size, len(positions))
            s, r = search(db[positions[lo:hi]], k + 1)
            sims[lo:hi], nbrs[lo:hi] = drop_self(s, r, positions[lo:hi], k)
            bar.advance(hi - lo)
    return sims, nbrs


class ExactIndex(Index):
    """Exact search over a float32 matrix that grows by doubling (cheap single adds).

    Examples
    --------
    >>> ix = ExactIndex(2)
    >>> ix.add(np.array([[1, 0], [0, 1]], dtype="float32"))
    >>> sims, rows = ix.search(np.array([[1, 0]], dtype="float32"), 1)
    >>> rows.tolist(), sims.round(2).tolist()
    ([[0]], [[1.0]])
    """

    def __init__(self, dim: int, spec: str = "Flat") -> None:
        self.dim = int(dim)
        self.spec = spec
        self._x = np.zeros((0, self.dim), np.float32)
        self._n = 0
        self._alive = np.zeros(0, bool)
        self._n_alive = 0

    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def n_alive(self) -> int:
        return self._n_alive

    @property
    def is_exact(self) -> bool:
        return True

    @property
    def lossless(self) -> bool:
        return True

    def add(self, vectors: np.ndarray) -> None:
        v = checked(vectors, self.dim, "vectors")
        n = len(v)
        if not n:
            return
        if self._n + n > len(self._x):
            grown = np.zeros((max(self._n + n, 2 * len(self._x), 1024), self.dim), np.float32)
            grown[: self._n] = self._x[: self._n]
            self._x = grown
            alive = np.zeros(len(grown), bool)
            alive[: self._n] = self._alive[: self._n]
            self._alive = alive
        self._x[self._n : self._n + n] = v
        self._alive[self._n : self._n + n] = True
        self._n += n
        self._n_alive += n

    def remove(self, rows: np.ndarray) -> None:
        rows = np.unique(np.asarray(rows, np.int64))
        self._n_alive -= int(self._alive[rows].sum())
        self._alive[rows] = False

    def erase(self, rows: np.ndarray) -> None:
        self.remove(rows)
        self._x[np.asarray(rows, np.int64)] = 0.0
        return None

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self._x[np.asarray(rows, np.int64)]

    def matrix(self) -> np.ndarray:
        """All rows (removed ones included), a read-only view: no copy."""
        v = self._x[: self._n]
        v.flags.writeable = False
        return v

    def search(self, queries: np.ndarray, k: int, *, params: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
        if params:
            raise ValueError(f"exact search takes no search parameters; got {sorted(params)}")
        q = checked(queries, self.dim, "queries")
        k = check_k(k)
        if self._n_alive == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        n_dead = self._n - self._n_alive
        sims, rows = exact_knn(self._x[: self._n], q, min(k + n_dead, self._n))
        if n_dead:
            sims, rows = drop_dead(sims, rows, self._alive, k)
        return pad_results(sims, rows, k)

    def compact(self) -> np.ndarray:
        keep = np.flatnonzero(self._alive[: self._n])
        self._x = np.ascontiguousarray(self._x[keep])
        self._alive = np.ones(len(keep), bool)
        self._n = self._n_alive = len(keep)
        return keep

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, x=self._x[: self._n], alive=self._alive[: self._n])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, dim: int, spec: str = "Flat") -> "ExactIndex":
        ix = cls(dim, spec)
        with np.load(path) as z:
            x, alive = z["x"], z["alive"]
        ix._x, ix._alive = np.ascontiguousarray(x, np.float32), alive.astype(bool)
        ix._n, ix._n_alive = len(x), int(alive.sum())
        return ix
