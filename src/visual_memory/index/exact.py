"""Exact inner-product search: the reference every approximate index is measured against.

`exact_knn` is the one exact kNN of the package (classify, self-neighbours,
evaluations, index checks all use it). `ExactIndex` keeps the vectors in one
growing float32 matrix and searches it with `exact_knn`.

The kernel is chosen per batch, for the CPU it runs on:

* FAISS's exhaustive search, told when to switch from its SIMD scan to its
  blocked GEMM. FAISS 1.15 switches when ``n_queries * d`` reaches
  ``distance_compute_blas_threshold`` (128000 by default: at d=384 every batch
  under ~330 queries scanned, 4-12x slower than the GEMM at 16-128 queries).
  We switch at `BLAS_MIN_QUERIES` queries whatever d is.
* On CPUs with native bfloat16 (AVX-512 BF16 or AMX; detected, never
  assumed: on AVX2 a bf16 product is ~3x *slower* than float32), batches of
  `BF16_MIN_QUERIES` or more run the product in bfloat16 over a bf16 copy of
  the matrix, keep every candidate that a proven error bound cannot rule out,
  and re-rank those with the float32 vectors, so the top-k is the float32
  top-k (`bf16_knn`).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from ..progress import progress_bar
from .base import LocalIndex, check_k, checked, drop_dead, pad_results

BATCH = 4096  # queries per search call: bounds the (batch x n) similarity block
BLAS_MIN_QUERIES = int(os.environ.get("VISMEM_BLAS_MIN_QUERIES", 8))  # measured: benchmarks/bench_search.py
BF16_MIN_QUERIES = int(os.environ.get("VISMEM_BF16_MIN_QUERIES", 1))  # measured: bf16 wins from one query (half the bytes)
BF16_MIN_ROWS = 50_000
TIE_MARGIN = 8  # below this the float32 product is quick anyway; no bf16 copy is made


def faiss_knn(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS exhaustive inner-product search, GEMM from `BLAS_MIN_QUERIES` queries up."""
    import faiss

    # A process-wide knob read at call time; concurrent calls at other d only
    # shift each other's switch point (speed, never results).
    faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * queries.shape[1]
    return faiss.knn(queries, db, k, metric=faiss.METRIC_INNER_PRODUCT)


class Bf16Copy:
    """A bfloat16 copy of a float32 matrix, with what the error bound needs.

    ``err`` is each row's rounding error norm ``||x - bf16(x)||`` and ``norm``
    its bf16 norm; `bf16_knn` uses their maxima.
    """

    def __init__(self, x: np.ndarray) -> None:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        self._buf = t.to(torch.bfloat16)
        self._n = len(t)
        back = self._buf.to(torch.float32)
        self.err = float(torch.linalg.vector_norm(t - back, dim=1).max()) if len(t) else 0.0
        self.norm = float(torch.linalg.vector_norm(back, dim=1).max()) if len(t) else 0.0

    @property
    def x(self):
        """The bf16 rows (a view of a buffer that grows by doubling)."""
        return self._buf[: self._n]

    def append(self, x: np.ndarray) -> None:
        import torch

        other = Bf16Copy(x)
        n = self._n + other._n
        if n > len(self._buf):  # doubling: a single add costs O(1) amortised, not a copy of the matrix
            grown = torch.zeros((max(n, 2 * len(self._buf), 1024), self._buf.shape[1]), dtype=torch.bfloat16)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : n] = other._buf
        self._n = n
        self.err, self.norm = max(self.err, other.err), max(self.norm, other.norm)

    def zero(self, rows: np.ndarray) -> None:
        self._buf[np.asarray(rows, np.int64)] = 0


def bf16_knn(x: np.ndarray, copy: Bf16Copy, queries: np.ndarray, k: int,
             alive: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """The float32 top-k of ``queries @ x.T``, found through a bfloat16 product.

    For a query q and row x, with q' and x' their bf16 roundings and s' the
    product as computed (float32 accumulation, then rounded to bf16)::

        |q.x - s'| <= ||q|| ||x - x'|| + ||q - q'|| ||x'|| + 2^-8 |s'|  =: B(s')

    (the last term is bf16's rounding of the output, relative to the value).
    A row whose upper bound s' + B(s') is below the k-th best lower bound
    cannot be in the float32 top-k. Candidates are widened (doubling) until
    that holds for the first candidate left out, then re-ranked with the
    float32 vectors.

    Returns
    -------
    sims : float32 (n_queries, k'), idx : int64 (n_queries, k'), k' = min(k, live rows)
    """
    import torch

    q32 = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    qb = q32.to(torch.bfloat16)
    q_err = torch.linalg.vector_norm(q32 - qb.to(torch.float32), dim=1)
    q_norm = torch.linalg.vector_norm(q32, dim=1)
    s = qb @ copy.x[: len(x)].T  # (Q, N) bfloat16: selecting in bf16 skips a float32 copy of the block
    n = len(x)
    if alive is not None and not alive[:n].all():
        s[:, torch.from_numpy(~alive[:n])] = -torch.inf
        n_live = int(alive[:n].sum())
    else:
        n_live = n
    k = min(int(k), n_live)
    inputs = (q_norm * copy.err + q_err * copy.norm).numpy()  # (Q,): rounding of the two operands
    u = 2.0**-8  # bf16 unit roundoff: the output's relative error
    out_s = np.empty((len(queries), k), np.float32)
    out_i = np.empty((len(queries), k), np.int64)
    todo = np.arange(len(queries))
    width = min(n_live, 2 * k + 16)
    while len(todo):
        vals, idx = torch.topk(s if len(todo) == len(queries) else s[todo], width, dim=1)  # no copy on the first pass
        vals, idx = vals.to(torch.float32).numpy(), idx.numpy()
        if width < n_live:
            left_out, kth, b = vals[:, width - 1], vals[:, k - 1], inputs[todo]
            ok = left_out + u * np.abs(left_out) + b < kth - u * np.abs(kth) - b
        else:
            ok = np.ones(len(todo), bool)
        done = todo[ok]
        if len(done):
            es, ei = rescore(x, queries[done], idx[ok])
            out_s[done], out_i[done] = es[:, :k], ei[:, :k]
        todo = todo[~ok]
        width = min(n_live, 2 * width)
    return out_s, out_i


def rescore(db: np.ndarray, queries: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recompute the similarities of found rows one way and order them by (-similarity, row).

    Every kernel ends here, so they agree to the last bit and break ties alike
    (different kernels sum in different orders, which moves ties of ~1e-7).
    """
    out_s = np.empty(idx.shape, np.float32)
    out_i = np.empty(idx.shape, np.int64)
    for lo in range(0, len(idx), 64):  # bounds the gathered (64, k, d) block
        cand = idx[lo : lo + 64]
        exact = np.einsum("qd,qkd->qk", queries[lo : lo + 64], db[cand]).astype(np.float32)
        order = np.lexsort((cand, -exact), axis=1)
        out_s[lo : lo + 64] = np.take_along_axis(exact, order, axis=1)
        out_i[lo : lo + 64] = np.take_along_axis(cand, order, axis=1)
    return out_s, out_i


def bf16_wanted(n_queries: int, n_rows: int) -> bool:
    """Whether a batch should take the bfloat16 path on this CPU."""
    from ..cpu import native_bf16

    return n_queries >= BF16_MIN_QUERIES and n_rows >= BF16_MIN_ROWS and native_bf16()


def exact_knn(
    db: np.ndarray, queries: np.ndarray, k: int, *, batch_size: int = BATCH, progress: bool | str = False,
    alive: Optional[np.ndarray] = None, bf16: "Bf16Copy | bool | None" = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``db`` for each query, by inner product.

    Parameters
    ----------
    db : float32 array of shape (n, d)
    queries : float32 array of shape (q, d)
    k : int
        Capped at the number of live rows.
    batch_size : int, default 4096
    progress : bool or str
    alive : bool array of shape (n,), optional
        Rows that may be returned (default all).
    bf16 : Bf16Copy, bool or None, default None
        A bfloat16 copy of ``db`` to search through (results stay exact);
        True makes one, False never uses one, None decides by batch size and CPU.

    Returns
    -------
    sims : float32 array of shape (q, k'), descending, k' = min(k, live rows)
    idx : int64 array of shape (q, k')

    Examples
    --------
    >>> db = np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype="float32")
    >>> exact_knn(db, db[[2]], 2)[1].tolist()
    [[2, 1]]
    """
    db = np.ascontiguousarray(db, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n_dead = 0 if alive is None else int(len(db) - alive[: len(db)].sum())
    k = min(check_k(k), len(db) - n_dead)
    sims = np.empty((len(q), k), np.float32)
    idx = np.empty((len(q), k), np.int64)
    if k == 0 or len(q) == 0:
        return sims, idx
    copy = bf16 if isinstance(bf16, Bf16Copy) else None
    if copy is None and (bf16 is True or (bf16 is None and bf16_wanted(len(q), len(db)))):
        copy = Bf16Copy(db)
    if copy is not None:  # the (block x n) float32 product stays under ~256 MB
        batch_size = max(1, min(batch_size, (64 << 20) // max(1, len(db))))
    with progress_bar(progress, total=len(q), unit="query") as bar:
        for lo in range(0, len(q), batch_size):
            hi = min(lo + batch_size, len(q))
            if copy is not None:
                sims[lo:hi], idx[lo:hi] = bf16_knn(db, copy, q[lo:hi], k, alive)
            else:
                # A few extra rows, rescored, so a tie at the k-th place is broken the same way.
                kk = min(k + TIE_MARGIN, len(db) - n_dead)
                s, r = faiss_knn(db, q[lo:hi], min(kk + n_dead, len(db)))
                if n_dead:
                    s, r = drop_dead(s, r, alive, kk)
                es, ei = rescore(db, q[lo:hi], r)
                sims[lo:hi], idx[lo:hi] = es[:, :k], ei[:, :k]
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
    if search is None:
        copy = Bf16Copy(db) if bf16_wanted(min(batch_size, len(positions)), n) else False

        def search(q, kk):
            return exact_knn(db, q, kk, batch_size=len(q), bf16=copy)
    with progress_bar(progress, total=len(positions), unit="rec") as bar:
        for lo in range(0, len(positions), batch_size):
            hi = min(lo + batch_size, len(positions))
            s, r = search(db[positions[lo:hi]], k + 1)
            sims[lo:hi], nbrs[lo:hi] = drop_self(s, r, positions[lo:hi], k)
            bar.advance(hi - lo)
    return sims, nbrs


class ExactIndex(LocalIndex):
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
        self._bf16: Optional[Bf16Copy] = None  # made on the first batch that wants it (see `bf16_wanted`)

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
        if self._bf16 is not None:
            self._bf16.append(v)

    def remove(self, rows: np.ndarray) -> None:
        rows = np.unique(np.asarray(rows, np.int64))
        self._n_alive -= int(self._alive[rows].sum())
        self._alive[rows] = False

    def erase(self, rows: np.ndarray) -> None:
        self.remove(rows)
        self._x[np.asarray(rows, np.int64)] = 0.0
        if self._bf16 is not None:
            self._bf16.zero(rows)
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
        if self._bf16 is None and bf16_wanted(len(q), self._n):
            self._bf16 = Bf16Copy(self._x[: self._n])
        bf16 = self._bf16 if self._bf16 is not None and bf16_wanted(len(q), self._n) else False
        alive = self._alive[: self._n] if self._n_alive < self._n else None
        sims, rows = exact_knn(self._x[: self._n], q, k, alive=alive, bf16=bf16)
        return pad_results(sims, rows, k)

    def compact(self) -> np.ndarray:
        keep = np.flatnonzero(self._alive[: self._n])
        self._bf16 = None
        self._x = np.ascontiguousarray(self._x[keep])
        self._alive = np.ones(len(keep), bool)
        self._n = self._n_alive = len(keep)
        return keep

    def to_bytes(self) -> bytes:
        import io

        buf = io.BytesIO()
        np.savez(buf, x=self._x[: self._n], alive=self._alive[: self._n])
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, dim: int, spec: str = "Flat") -> "ExactIndex":
        import io

        ix = cls(dim, spec)
        with np.load(io.BytesIO(blob)) as z:
            x, alive = z["x"], z["alive"]
        ix._x, ix._alive = np.ascontiguousarray(x, np.float32), alive.astype(bool)
        ix._n, ix._n_alive = len(x), int(alive.sum())
        return ix
