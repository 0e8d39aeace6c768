"""Approximate search with FAISS, built from an index-factory string (IVF, PQ, SQ, HNSW).

Removal is a tombstone (O(1), so a removed record stops voting at once):
search over-fetches by the number of tombstones and drops them; `compact`
rebuilds without them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from .base import Index, check_k, checked, drop_dead, pad_results


def build_faiss(spec: str, dim: int):
    """``faiss.index_factory(dim, spec, METRIC_INNER_PRODUCT)``, or a ValueError naming the spec."""
    import faiss

    try:
        return faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"invalid FAISS index factory string {spec!r} for {dim}-d vectors: {first}") from None


class FaissIndex(Index):
    """A FAISS factory index with tombstones.

    Parameters
    ----------
    dim : int
    spec : str
        A FAISS index-factory string (inner-product metric), e.g. ``"HNSW32"``,
        ``"IVF1024,Flat"``. Indexes that need training are trained on the
        vectors of the first `add` unless `train` was called first.
    """

    def __init__(self, dim: int, spec: str) -> None:
        import faiss

        self.dim = int(dim)
        self.spec = spec
        self._index = build_faiss(spec, dim)
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None:
            # IVF cannot reconstruct vectors (needed by `compact`) without a direct map.
            ivf.set_direct_map_type(faiss.DirectMap.Array)
        self._alive = np.zeros(0, dtype=bool)
        self._n_dead = 0

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def n_alive(self) -> int:
        return self.ntotal - self._n_dead

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        self._index.train(checked(vectors, self.dim, "vectors"))

    def add(self, vectors: np.ndarray) -> None:
        vectors = checked(vectors, self.dim, "vectors")
        if len(vectors) == 0:
            return
        if not self._index.is_trained:
            self._index.train(vectors)
        self._index.add(vectors)
        self._alive = np.concatenate([self._alive, np.ones(len(vectors), dtype=bool)])

    def remove(self, rows: np.ndarray) -> None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        newly = rows[self._alive[rows]]
        self._alive[newly] = False
        self._n_dead += len(newly)

    def erase(self, rows: np.ndarray) -> np.ndarray:
        # FAISS codes cannot be overwritten in place in every index type: rebuild without them.
        self.remove(rows)
        return self.compact()

    def _reconstruct(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._index.reconstruct(int(r)) for r in rows.tolist()])

    def search(self, queries: np.ndarray, k: int, *, params: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
        queries = checked(queries, self.dim, "queries")
        k = check_k(k)
        n = len(queries)
        if self.n_alive == 0:
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        fetch = min(k + self._n_dead, self.ntotal)
        sims, rows = self._index.search(queries, fetch, params=self._search_parameters(params))
        if self._n_dead:
            sims, rows = drop_dead(sims, rows, self._alive, k)
        return pad_results(sims, rows, k)

    def _search_parameters(self, params: Optional[dict]):
        """A FAISS SearchParameters object for this call only (never set on the index: thread-safe)."""
        if not params:
            return None
        import faiss

        ivf = faiss.try_extract_index_ivf(self._index)
        hnsw = getattr(faiss.downcast_index(self._index), "hnsw", None)
        if ivf is not None:
            sp, allowed = faiss.SearchParametersIVF(), {"nprobe", "max_codes"}
        elif hnsw is not None:
            sp, allowed = faiss.SearchParametersHNSW(), {"efSearch"}
        else:
            raise ValueError(f"index {self.spec!r} takes no search parameters; got {sorted(params)}")
        for key, value in params.items():
            if key not in allowed:
                raise ValueError(f"index {self.spec!r} has no search parameter {key!r} (allowed: {', '.join(sorted(allowed))})")
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"search parameter {key} must be a positive integer; got {value!r}")
            setattr(sp, key, int(value))
        return sp

    def compact(self) -> np.ndarray:
        import faiss

        keep = np.flatnonzero(self._alive)
        vectors = self._reconstruct(keep)
        # A clone keeps the trained quantisers; re-encoding a decoded vector gives back its codes.
        fresh = faiss.clone_index(self._index)
        fresh.reset()
        if len(vectors):
            fresh.add(vectors)
        self._index, self._alive, self._n_dead = fresh, np.ones(len(keep), bool), 0
        return keep

    def save(self, path: Path) -> None:
        import faiss

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self._index, str(tmp))
        np.save(str(tmp) + ".alive.npy", self._alive)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(str(tmp) + ".alive.npy", str(path) + ".alive.npy")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, dim: int, spec: str) -> "FaissIndex":
        import faiss

        ix = cls.__new__(cls)
        ix.dim, ix.spec = int(dim), spec
        ix._index = faiss.read_index(str(path))
        ix._alive = np.load(str(path) + ".alive.npy")
        ix._n_dead = int((~ix._alive).sum())
        return ix
