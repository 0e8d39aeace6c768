"""Approximate search with FAISS, built from an index-factory string (IVF Flat/SQ/PQ, HNSW).

Row numbers are FAISS ids (``add_with_ids``), so an IVF index removes rows
for real (``remove_ids``: the codes leave the inverted lists) while every
other row keeps its number; `compact` renumbers the ids in place, without
re-encoding. HNSW cannot remove: its removed rows are tombstones (search
over-fetches past them) until `compact` or `erase` rebuilds the graph.

Per-call ``nprobe`` / ``efSearch`` go through FAISS ``SearchParameters``
objects made for that call, never set on the index, so they cannot leak into
later calls or other threads.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from .base import LocalIndex, check_k, checked, drop_dead, pad_results


def build_faiss(spec: str, dim: int):
    """``faiss.index_factory(dim, spec, METRIC_INNER_PRODUCT)``, or a ValueError naming the spec."""
    import faiss

    try:
        return faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"invalid FAISS index factory string {spec!r} for {dim}-d vectors: {first}") from None


def min_train_size(spec: str) -> int:
    """Vectors needed to train ``spec`` well: FAISS's 39 per centroid, for the coarse and the PQ quantisers.

    >>> min_train_size("IVF1024,PQ48np"), min_train_size("IVF64,Flat"), min_train_size("HNSW32")
    (39936, 2496, 0)
    """
    need = 0
    ivf = re.search(r"IVF(\d+)", spec)
    if ivf:
        need = max(need, 39 * int(ivf.group(1)))
    pq = re.search(r"PQ\d+(?:x(\d+))?", spec)
    if pq:
        need = max(need, 39 * (1 << int(pq.group(1) or 8)))
    return need


DEFAULT_EF_SEARCH = 64


def default_nprobe(nlist: int) -> int:
    """Lists searched by default: 1/16 of them, at least 8 (all of a small index), at most 256.

    >>> default_nprobe(16), default_nprobe(1024), default_nprobe(65536)
    (8, 64, 256)
    """
    return int(min(nlist, max(8, min(256, nlist // 16))))


def _ids_view(invlists, lst: int) -> np.ndarray:
    import faiss

    n = invlists.list_size(lst)
    return faiss.rev_swig_ptr(invlists.get_ids(lst), n) if n else np.zeros(0, np.int64)


def _codes_view(invlists, lst: int) -> np.ndarray:
    import faiss

    n = invlists.list_size(lst)
    return faiss.rev_swig_ptr(invlists.get_codes(lst), n * invlists.code_size) if n else np.zeros(0, np.uint8)


class FaissIndex(LocalIndex):
    """A FAISS factory index whose FAISS ids are the memory's row numbers.

    Parameters
    ----------
    dim : int
    spec : str
        A FAISS index-factory string (inner-product metric), e.g. ``"HNSW32"``,
        ``"IVF1024,Flat"``, ``"IVF4096,PQ48np"``. Indexes that need training
        are trained by `train` (the memory trains on a random sample of its
        records, see `min_train_size`) or else on the first `add`.
    """

    def __init__(self, dim: int, spec: str) -> None:
        import faiss

        self.dim = int(dim)
        self.spec = spec
        index = build_faiss(spec, dim)
        self._set(index, np.zeros(0, bool))
        # FAISS's defaults (nprobe 1, efSearch 16) trade most of the recall away; these are
        # saved with the index, and a call's params override them.
        if self._ivf is not None:
            self._ivf.nprobe = default_nprobe(self._ivf.nlist)
        hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = DEFAULT_EF_SEARCH

    def _set(self, index, alive: np.ndarray) -> None:
        import faiss

        self._index = index
        self._ivf = faiss.try_extract_index_ivf(index)
        self._alive = alive
        self._n_dead = int((~alive).sum())

    # -- what it is --------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return len(self._alive)

    @property
    def n_alive(self) -> int:
        return len(self._alive) - self._n_dead

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def compressed(self) -> bool:
        """True if distances come from codes (PQ, SQ), not the vectors: the memory re-ranks them."""
        return self.code_size < 4 * self.dim

    @property
    def code_size(self) -> int:
        """Bytes stored per vector (an IVF's inverted-list code; an HNSW's storage code)."""
        import faiss

        if self._ivf is not None:
            return int(self._ivf.code_size)
        storage = getattr(faiss.downcast_index(self._index), "storage", None)
        return int((storage if storage is not None else self._index).sa_code_size())

    def codes(self, vectors: np.ndarray) -> list[bytes]:
        """The bytes this index stores for each vector (for the erasure scan's needles).

        For IVF the stored code is the residual's, relative to the list's
        centroid; the encoder's ``sa_encode`` gives list number + that code.
        """
        vectors = checked(vectors, self.dim, "vectors")
        if not len(vectors) or not self.is_trained:
            return []
        if self._ivf is not None:
            _, lists = self._ivf.quantizer.search(vectors, 1)
            out = np.zeros((len(vectors), self._ivf.code_size), np.uint8)
            self._ivf.encode_vectors(len(vectors), self._swig(vectors), self._swig(lists.ravel()), self._swig(out))
            return [bytes(c) for c in out]
        return [bytes(c) for c in self._index.sa_encode(vectors)]

    def live_codes_among(self, codes: list[bytes]) -> set[bytes]:
        """Which of these codes a row still in the index stores (IVF: scanned list by list)."""
        if self._ivf is None or not codes:
            return set()
        size = self._ivf.invlists.code_size
        want = {c for c in codes if len(c) == size}
        if not want:
            return set()
        dtype = np.dtype((np.void, size))
        needles = np.frombuffer(b"".join(want), dtype)
        out: set[bytes] = set()
        inv = self._ivf.invlists
        for lst in range(self._ivf.nlist):
            held = _codes_view(inv, lst)
            if len(held):
                hit = np.isin(needles, held.view(dtype))
                out.update(bytes(x) for x in needles[hit])
        return out

    @staticmethod
    def _swig(a: np.ndarray):
        import faiss

        return faiss.swig_ptr(a)

    # -- verbs -------------------------------------------------------------------------

    def train(self, vectors: np.ndarray) -> None:
        self._index.train(checked(vectors, self.dim, "vectors"))

    def add(self, vectors: np.ndarray) -> None:
        vectors = checked(vectors, self.dim, "vectors")
        if len(vectors) == 0:
            return
        if not self._index.is_trained:
            self._index.train(vectors)
        if self._ivf is not None:
            self._index.add_with_ids(vectors, np.arange(self.ntotal, self.ntotal + len(vectors), dtype=np.int64))
        else:
            self._index.add(vectors)
        self._alive = np.concatenate([self._alive, np.ones(len(vectors), dtype=bool)])

    def remove(self, rows: np.ndarray) -> None:
        import faiss

        rows = np.unique(np.asarray(rows, dtype=np.int64))
        newly = rows[self._alive[rows]]
        if not len(newly):
            return
        if self._ivf is not None:
            self._index.remove_ids(faiss.IDSelectorBatch(newly))
        self._alive[newly] = False
        self._n_dead += len(newly)

    def erase(self, rows: np.ndarray) -> Optional[np.ndarray]:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if self._ivf is None:
            # HNSW keeps every vector in its graph's storage: rebuild without them.
            self.remove(rows)
            return self.compact()
        # remove_ids moves each list's last code into the hole and shrinks the list, which
        # leaves a removed tail code in the list's spare capacity: zero the codes first.
        doomed = rows[self._alive[rows]]
        inv = self._ivf.invlists
        for lst in range(self._ivf.nlist):
            ids = _ids_view(inv, lst)
            hit = np.flatnonzero(np.isin(ids, doomed)) if len(ids) else ()
            if len(hit):
                codes = _codes_view(inv, lst).reshape(len(ids), inv.code_size)
                codes[hit] = 0
        self.remove(rows)
        return None

    def search(self, queries: np.ndarray, k: int, *, params: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
        queries = checked(queries, self.dim, "queries")
        k = check_k(k)
        n = len(queries)
        if self.n_alive == 0:
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        tombstones = self._n_dead if self._ivf is None else 0
        fetch = min(k + tombstones, int(self._index.ntotal))
        sims, rows = self._index.search(queries, fetch, params=self._search_parameters(params))
        if tombstones:
            sims, rows = drop_dead(sims, rows, self._alive, k)
        return pad_results(sims, rows, k)

    def _search_parameters(self, params: Optional[dict]):
        """A FAISS SearchParameters object for this call only (never set on the index: thread-safe)."""
        if not params:
            return None
        import faiss

        hnsw = getattr(faiss.downcast_index(self._index), "hnsw", None)
        if self._ivf is not None:
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
        if self._ivf is not None:
            # Removed rows already left the lists: renumber the ids in place (no re-encoding).
            new_of = np.cumsum(self._alive) - 1
            inv = self._ivf.invlists
            for lst in range(self._ivf.nlist):
                ids = _ids_view(inv, lst)
                if len(ids):
                    ids[:] = new_of[ids]
            self._alive, self._n_dead = np.ones(len(keep), bool), 0
            return keep
        vectors = (np.stack([self._index.reconstruct(int(r)) for r in keep.tolist()]) if len(keep)
                   else np.zeros((0, self.dim), np.float32))
        fresh = faiss.clone_index(self._index)  # keeps any trained quantiser
        fresh.reset()
        if len(vectors):
            fresh.add(vectors)
        self._set(fresh, np.ones(len(keep), bool))
        return keep

    # -- files -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        import faiss

        alive = np.packbits(self._alive).tobytes()
        head = len(self._alive).to_bytes(8, "little") + len(alive).to_bytes(8, "little")
        return head + alive + faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, dim: int, spec: str) -> "FaissIndex":
        import faiss

        n, m = int.from_bytes(blob[:8], "little"), int.from_bytes(blob[8:16], "little")
        alive = np.unpackbits(np.frombuffer(blob[16 : 16 + m], np.uint8), count=n).astype(bool)
        index = faiss.deserialize_index(np.frombuffer(blob, np.uint8, offset=16 + m))  # no copy of the slice
        if index.d != dim:
            raise ValueError(f"saved index is {index.d}-d, not {dim}-d")
        ix = cls.__new__(cls)
        ix.dim, ix.spec = int(dim), spec
        ix._set(index, alive)
        return ix

    def stats(self) -> dict:
        out = super().stats()
        out.update(code_bytes=self.code_size, compressed=self.compressed)
        if self._ivf is not None:
            out.update(nlist=int(self._ivf.nlist), nprobe=int(self._ivf.nprobe))
        return out
