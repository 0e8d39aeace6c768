"""The index protocol every backend implements, and the one input converter.

An index holds vectors in *rows* 0..ntotal-1, in the order they were added;
the memory's `visual_memory.rows.RowTable` maps rows to records. An index
owns no data the store lacks: it can always be rebuilt from the records.

Verbs (FAISS's, plus what a memory that must forget needs):

==========  ===============================================================
train       learn quantisers from a sample (no-op for exact search)
add         append rows
remove      rows never appear in results again
erase       remove, and overwrite every in-RAM byte derived from the rows (may compact)
search      (similarities, rows) of the k nearest live rows; per-call params
compact     drop removed rows; returns the old position of each kept row
to_bytes    the whole index as bytes (`LocalIndex`: saved beside the records; from_bytes reads it)
stats       a small dict for `vismem info`
==========  ===============================================================
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import VectorError


def as_queries(x: np.ndarray, dim: int, *, what: str = "queries") -> np.ndarray:
    """Validate and convert to C-contiguous, L2-normalised float32 (n, dim).

    Refuses wrong shapes, non-float dtypes, NaN/inf and all-zero rows, naming
    the offending rows.
    """
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


def checked(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    """C-contiguous float32 of shape (n, dim), or a VectorError.

    FAISS checks shapes with `assert`, which `python -O` strips: a wrong width
    would then be read out of bounds.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise VectorError(f"{what} must have shape (n, {dim}) for this index; got {x.shape}")
    return x


# Neighbours per query. The paper votes with up to 100; k x n_queries results are held in
# RAM, so a k past this is a typo and is refused (`Memory.search` also clamps k to its size).
MAX_K = 10_000


def check_k(k) -> int:
    """``int(k)``, or a ValueError unless ``1 <= k <= MAX_K``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if k > MAX_K:
        raise ValueError(f"k={k} is more neighbours than any vote needs; the limit is {MAX_K} "
                         "(visual_memory.index.MAX_K; a k above the memory's size is clamped to it)")
    return int(k)


class Index(abc.ABC):
    """A kNN structure over rows of unit vectors, by inner product.

    Parameters
    ----------
    dim : int
    spec : str
        The factory string it was built from (``"Flat"``, ``"IVF1024,PQ48np"``...).
    """

    spec: str
    dim: int

    # -- size --------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Rows, removed ones included."""

    @property
    @abc.abstractmethod
    def n_alive(self) -> int:
        """Rows that can be returned."""

    @property
    def n_dead(self) -> int:
        return self.ntotal - self.n_alive

    @property
    def is_exact(self) -> bool:
        """True if `search` returns exactly the inner-product top-k."""
        return False

    @property
    def lossless(self) -> bool:
        """True if `vectors` returns the added vectors bit for bit."""
        return False

    @property
    def is_trained(self) -> bool:
        return True

    # -- verbs -------------------------------------------------------------------------

    def train(self, vectors: np.ndarray) -> None:  # noqa: B027 - a no-op is right for exact indexes
        """Learn the index's quantisers from a sample (float32 (n, dim))."""

    @abc.abstractmethod
    def add(self, vectors: np.ndarray) -> None:
        """Append rows ``ntotal .. ntotal + n - 1`` (float32 (n, dim), L2-normalised)."""

    @abc.abstractmethod
    def remove(self, rows: np.ndarray) -> None:
        """Rows never appear in results again (their positions stay until `compact`)."""

    @abc.abstractmethod
    def erase(self, rows: np.ndarray) -> Optional[np.ndarray]:
        """`remove`, and overwrite whatever the index holds in RAM of these rows.

        Returns None if row numbers are unchanged, else the kept rows' old
        positions (as `compact`: an index that cannot overwrite in place rebuilds).
        """

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int, *, params: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest live rows of each query.

        Parameters
        ----------
        queries : float32 array of shape (n, dim)
        k : int
        params : dict, optional
            Per-call knobs (``nprobe``, ``efSearch``...); they never change
            the index for later calls or other threads.

        Returns
        -------
        similarities : float32 array of shape (n, k), descending; -inf pads
        rows : int64 array of shape (n, k); -1 pads (fewer than k live rows)
        """

    @abc.abstractmethod
    def compact(self) -> np.ndarray:
        """Drop removed rows. Returns the kept rows' old positions (new row i = old row out[i])."""

    def vectors(self, rows: np.ndarray) -> Optional[np.ndarray]:
        """The vectors of ``rows`` as added, or None if the index does not keep them (read them from the store)."""
        return None

    def stats(self) -> dict[str, Any]:
        return {"spec": self.spec, "dim": self.dim, "ntotal": self.ntotal, "alive": self.n_alive,
                "exact": self.is_exact, "trained": self.is_trained}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, rows={self.ntotal}, alive={self.n_alive})"


class LocalIndex(Index):
    """An `Index` held in this process, so it can be written as bytes and read back.

    (A `visual_memory.distributed.shards.ShardedIndex` lives in Ray actors instead;
    its state saves it one part per shard.)
    """

    @abc.abstractmethod
    def to_bytes(self) -> bytes:
        """The whole index as bytes (what `visual_memory.index.saved` writes beside the records)."""

    @classmethod
    @abc.abstractmethod
    def from_bytes(cls, blob: bytes, dim: int, spec: str) -> "Index":
        """Read bytes written by `to_bytes`."""

    def save(self, path: Path) -> None:
        """Write `to_bytes` to a local file (atomically replaced, fsync'd)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, dim: int, spec: str = "Flat") -> "Index":
        """Read a file written by `save`."""
        return cls.from_bytes(Path(path).read_bytes(), dim, spec)


def pad_results(sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (n, k') results to (n, k) with -inf / -1, or cut them to k."""
    if rows.shape[1] < k:
        pad = k - rows.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return sims[:, :k], rows[:, :k]


def merge_topk(sims: list[np.ndarray], rows: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k of per-shard top-k lists: similarity descending, ties by row ascending, -1 last.

    Parameters
    ----------
    sims, rows : lists of arrays of shape (n, k_s), one pair per shard (rows global; -1 pads)

    Examples
    --------
    >>> s, r = merge_topk([np.array([[0.9, 0.5]]), np.array([[0.7, 0.5]])],
    ...                   [np.array([[4, 0]]), np.array([[2, 1]])], 3)
    >>> r.tolist(), [round(float(x), 2) for x in s[0]]
    ([[4, 2, 0]], [0.9, 0.7, 0.5])
    """
    s = np.concatenate([np.asarray(x, np.float32) for x in sims], axis=1)
    r = np.concatenate([np.asarray(x, np.int64) for x in rows], axis=1)
    s = np.where(r < 0, -np.inf, s).astype(np.float32)
    tie = np.where(r < 0, np.iinfo(np.int64).max, r)
    order = np.lexsort((tie, -s), axis=1)[:, :k]
    return pad_results(np.take_along_axis(s, order, axis=1), np.take_along_axis(r, order, axis=1), k)


def drop_dead(sims: np.ndarray, rows: np.ndarray, alive: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first k live rows of over-fetched results (stable: order kept)."""
    ok = rows >= 0
    ok[ok] = alive[rows[ok]]
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(sims, order, axis=1)
    rows = np.take_along_axis(rows, order, axis=1)
    kept = np.take_along_axis(ok, order, axis=1)
    sims[~kept] = -np.inf
    rows[~kept] = -1
    return sims, rows
