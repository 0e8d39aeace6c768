"""Exact (and approximate) kNN over the store's vectors, with FAISS.

The index holds vectors in *rows*; the memory maps rows to record ids. It owns
no data the store lacks and can always be rebuilt from it.

Removal is a tombstone (O(1), so a deleted record stops voting at once); search
over-fetches by the number of tombstones and drops them; `compact` rewrites the
index without them once they pile up.
"""

from __future__ import annotations

import logging

import numpy as np

from .errors import VectorError

log = logging.getLogger(__name__)


def as_queries(x: np.ndarray, dim: int, *, what: str = "queries") -> np.ndarray:
    """Validate and convert to C-contiguous float32 (n, dim); refuse NaN/inf/zero rows."""
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise VectorError(f"{what} must have shape (n, {dim}); got {arr.shape}")
    if arr.shape[1] != dim:
        raise VectorError(f"{what} have dimension {arr.shape[1]}, but this memory's encoder gives {dim}-d vectors")
    if not np.issubdtype(arr.dtype, np.floating):
        raise VectorError(f"{what} must be floating point; got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)[:5].tolist()
        raise VectorError(f"{what} contain NaN or infinite values (rows {bad})")
    norms = np.linalg.norm(arr, axis=1)
    if (norms < 1e-12).any():
        bad = np.flatnonzero(norms < 1e-12)[:5].tolist()
        raise VectorError(f"{what} contain all-zero vectors (rows {bad}), which have no direction")
    return arr / norms[:, None]


class VectorIndex:
    """Inner-product kNN with tombstones, built from a FAISS factory string.

    Parameters
    ----------
    dim : int
    factory : str, default "Flat"
        A FAISS index-factory string with inner-product metric: ``"Flat"``
        (exact, the reference), ``"HNSW32"``, ``"IVF1024,Flat"``, ``"IVF4096,PQ64"``...
        Indexes that need training are trained on the vectors of the first build.

    Examples
    --------
    >>> import numpy as np
    >>> ix = VectorIndex(2)
    >>> ix.add(np.array([[1, 0], [0, 1]], dtype="float32"))
    >>> sims, rows = ix.search(np.array([[1, 0]], dtype="float32"), 1)
    >>> rows.tolist(), sims.round(2).tolist()
    ([[0]], [[1.0]])
    """

    def __init__(self, dim: int, factory: str = "Flat") -> None:
        import faiss

        self.dim = int(dim)
        self.factory = factory
        try:
            self._index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"invalid FAISS index factory string {factory!r}: {exc}") from exc
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None:
            # IVF cannot reconstruct vectors (needed by `compact`) without a direct map.
            ivf.set_direct_map_type(faiss.DirectMap.Array)
        self._alive = np.zeros(0, dtype=bool)
        self._n_dead = 0

    @property
    def ntotal(self) -> int:
        """Rows including tombstones."""
        return int(self._index.ntotal)

    @property
    def n_alive(self) -> int:
        return self.ntotal - self._n_dead

    @property
    def n_dead(self) -> int:
        return self._n_dead

    @property
    def is_exact(self) -> bool:
        return self.factory == "Flat"

    def add(self, vectors: np.ndarray) -> None:
        """Append rows (float32, (n, dim), already normalised)."""
        vectors = self._checked(vectors, "vectors")
        if len(vectors) == 0:
            return
        if not self._index.is_trained:
            self._index.train(vectors)
        self._index.add(vectors)
        self._alive = np.concatenate([self._alive, np.ones(len(vectors), dtype=bool)])

    def remove(self, rows: np.ndarray) -> None:
        """Tombstone rows: they never appear in results again."""
        rows = np.asarray(rows, dtype=np.int64)
        newly = rows[self._alive[rows]]
        self._alive[newly] = False
        self._n_dead += len(np.unique(newly))

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self.is_exact:
            import faiss

            xb = faiss.rev_swig_ptr(self._index.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)
            return np.array(xb[rows])
        return np.stack([self._index.reconstruct(int(r)) for r in rows]) if len(rows) else np.zeros((0, self.dim), np.float32)

    def search(self, queries: np.ndarray, k: int, **params) -> tuple[np.ndarray, np.ndarray]:
        """k nearest alive rows by inner product.

        Parameters
        ----------
        queries : float32 array of shape (n, dim)
        k : int
        **params : per-call tuning knobs, e.g. ``nprobe=32`` (IVF) or ``efSearch=64`` (HNSW)

        Returns
        -------
        similarities : float32 array of shape (n, k), descending
        rows : int64 array of shape (n, k); -1 where fewer than k rows exist
        """
        queries = self._checked(queries, "queries")
        n = len(queries)
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        if self.n_alive == 0:
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        self._apply_params(params)
        fetch = min(k + self._n_dead, self.ntotal)
        sims, rows = self._index.search(queries, fetch)
        if self._n_dead:
            sims, rows = self._drop_dead(sims, rows, k)
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return sims[:, :k], rows[:, :k]

    def _checked(self, x: np.ndarray, what: str) -> np.ndarray:
        # FAISS checks shapes with `assert`, which `python -O` strips: a wrong
        # width would then be read out of bounds.
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise VectorError(f"{what} must have shape (n, {self.dim}) for this index; got {x.shape}")
        return x

    def _drop_dead(self, sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ok = rows >= 0
        ok[ok] = self._alive[rows[ok]]
        # Stable sort puts alive rows first, keeping their order.
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
        sims = np.take_along_axis(sims, order, axis=1)
        rows = np.take_along_axis(rows, order, axis=1)
        kept = np.take_along_axis(ok, order, axis=1)
        sims[~kept] = -np.inf
        rows[~kept] = -1
        return sims, rows

    def _apply_params(self, params: dict) -> None:
        if not params:
            return
        import faiss

        ps = faiss.ParameterSpace()
        for key, value in params.items():
            try:
                ps.set_index_parameter(self._index, key, value)
            except RuntimeError as exc:
                raise ValueError(f"index {self.factory!r} has no search parameter {key!r}") from exc

    def erase(self, rows: np.ndarray) -> bool:
        """Tombstone rows and overwrite their vectors in RAM with zeros (for `forget`).

        Returns False when the index type cannot be overwritten in place (only
        "Flat" can); the caller must then `compact` to drop the vectors.
        """
        rows = np.asarray(rows, dtype=np.int64)
        self.remove(rows)
        if not self.is_exact or len(rows) == 0:
            return self.is_exact
        import faiss

        xb = faiss.rev_swig_ptr(self._index.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)
        xb[rows] = 0.0
        return True

    def compact(self) -> np.ndarray:
        """Rebuild without tombstones. Returns the alive rows' old positions (new row i = old row out[i])."""
        keep = np.flatnonzero(self._alive)
        vectors = self.reconstruct(keep)
        fresh = VectorIndex(self.dim, self.factory)
        fresh.add(vectors)
        self._index, self._alive, self._n_dead = fresh._index, fresh._alive, 0
        return keep
