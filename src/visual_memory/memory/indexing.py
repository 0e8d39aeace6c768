"""Changing and checking a memory's search index: ``vismem index build`` and ``vismem index check``.

`build` retrains (or changes) the index from the records, under the writer
lock: the new index is built beside the old one, which serves until the new
one is whole; only then are the manifest, the saved index and the audit log
written. `check` measures the index against exact search on a sample of the
memory's own records: recall@k of the neighbour ids, the share of queries
whose voted label agrees, and the single-query speed-up.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Union

import numpy as np

from ..index import EXACT, ExactIndex, drop_self, exact_knn, validate_spec
from ..index.base import merge_topk
from ..index import auto
from ..index import saved as index_saved
from ..index.auto import AUTO
from ..index.faiss_ann import min_train_size
from ..progress import progress_bar
from ..store import vectors_from_column
from ..vote import contributions, tally
from .state import MemoryState


def build(state: MemoryState, index: Optional[str] = None, *, budget: Union[str, int, None] = None,
          lock_timeout: float = 0.0, progress: bool | str | None = None) -> dict[str, Any]:
    """Rebuild the index from the records (``index`` None: the manifest's), or switch to ``index``.

    Returns {"spec", "resolved", "records", "seconds", "exact_until"}.
    """
    budget = auto.parse_bytes(budget)
    with state.writing(timeout=lock_timeout):
        st = state.store
        spec = state.spec if index is None else (index.strip() if isinstance(index, str) else index)
        if spec != AUTO:
            spec = validate_spec(spec, st.dim)
        if budget is None:
            budget = st.manifest.get("index_budget") if index is None or spec == AUTO else None
        n = st.count()
        target = auto.resolve(n, st.dim, budget=budget) if spec == AUTO else spec
        exact_until = min_train_size(target) if target != EXACT and n < min_train_size(target) else None
        t0 = time.perf_counter()
        state._rebuild(EXACT if exact_until else target, progress=progress if progress is not None else True)
        seconds = time.perf_counter() - t0
        state.waiting_to_train = bool(exact_until)
        manifest = dict(st.manifest, index=spec)
        manifest.pop("index_budget", None)
        if budget is not None:
            manifest["index_budget"] = int(budget)
        if manifest != st.manifest:
            st.write_manifest(manifest)
        if not state.saves_index:
            index_saved.remove(st.storage)
        st.audit("index", action="build", spec=spec, resolved=state.index.spec, records=len(state.rows),
                 seconds=round(seconds, 3), **({"budget": int(budget)} if budget is not None else {}))
    return {"spec": spec, "resolved": state.index.spec, "records": len(state.rows), "seconds": seconds,
            "exact_until": exact_until}


def check(state: MemoryState, *, queries: int = 200, k: int = 50, params: Optional[dict] = None, seed: int = 0,
          vote: str = "rank", progress: bool | str | None = None) -> dict[str, Any]:
    """The index against exact search, on ``queries`` of the memory's records used as queries (self excluded).

    Returns {"recall_at_k", "agreement", "k", "queries", "speedup", "index", "exact_ms", "index_ms"}:
    recall@k is the share of the exact k nearest ids the index returns;
    agreement the share of queries whose ``vote`` label is the same; times
    are medians of single-query searches.
    """
    rows = state.rows
    alive = rows.alive_rows()
    if len(alive) < 2:
        raise ValueError(f"the memory has {len(alive)} record(s); checking an index needs at least 2")
    k = int(min(k, len(alive) - 1))
    take = np.sort(np.random.default_rng(seed).choice(alive, size=min(int(queries), len(alive)), replace=False))
    q = state.vectors(take)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)

    exact_one = _exact_searcher(state, progress=progress)
    times_ix, times_ex = [], []
    got = np.full((len(q), k + 1), -1, np.int64)
    got_s = np.full((len(q), k + 1), -np.inf, np.float32)
    exact = np.full((len(q), k + 1), -1, np.int64)
    exact_s = np.full((len(q), k + 1), -np.inf, np.float32)
    with progress_bar(progress, total=len(q), unit="queries", description="index vs exact search") as bar:
        for i in range(len(q)):  # alternating, so a change in the machine's load hits both alike
            t0 = time.perf_counter()
            s, r = state.search(q[i : i + 1], k + 1, params=params)
            times_ix.append(time.perf_counter() - t0)
            got_s[i], got[i] = s[0], r[0]
            if exact_one is not None:
                t0 = time.perf_counter()
                s, r = exact_one(q[i : i + 1], k + 1)
                times_ex.append(time.perf_counter() - t0)
                exact_s[i], exact[i] = s[0], r[0]
            bar.advance()
    if exact_one is None:
        exact_s, exact, times_ex = exact_streamed(state, q, k + 1, progress=progress)
    got_s, got = drop_self(got_s, got, take, k)
    exact_s, exact = drop_self(exact_s, exact, take, k)
    recall = float(np.mean([len(set(a[a >= 0].tolist()) & set(b[b >= 0].tolist())) / max(1, (b >= 0).sum())
                            for a, b in zip(got, exact)]))
    agree = float(np.mean(_labels(state, got_s, got, vote) == _labels(state, exact_s, exact, vote)))
    ex_ms, ix_ms = 1e3 * float(np.median(times_ex)), 1e3 * float(np.median(times_ix))
    return {"recall_at_k": recall, "agreement": agree, "k": k, "queries": len(q),
            "speedup": ex_ms / ix_ms if ix_ms > 0 else float("inf"), "index": state.index.spec,
            "exact_ms": ex_ms, "index_ms": ix_ms, "params": dict(params or {})}


def _labels(state: MemoryState, sims: np.ndarray, nbrs: np.ndarray, vote: str) -> np.ndarray:
    codes, weights = state.rows.codes_weights(nbrs)
    return tally(codes, contributions(sims, vote, weights), len(state.rows.labels)).winners


def _exact_searcher(state: MemoryState, *, progress):
    """One-query exact search over the stored vectors held in RAM, answering in the state's rows; None if they
    do not fit (then `exact_streamed`)."""
    if state.index.is_exact:
        return state.index.search
    st = state.store
    if st.count() * st.dim * 4 > auto.default_budget():
        return None
    exact = ExactIndex(st.dim)
    row_of = []
    with progress_bar(progress, total=st.count(), unit="records", description="reading vectors for exact search") as bar:
        for batch in st.iter_batches(["id", "vector"]):
            exact.add(vectors_from_column(batch.column("vector"), st.dim))
            row_of.extend(state.rows.row(i) for i in batch.column("id").to_pylist())
            bar.advance(batch.num_rows)
    row_of = np.array([-1 if r is None else r for r in row_of], np.int64)

    def search(q: np.ndarray, k: int):
        s, r = exact.search(q, k)
        return s, np.where(r >= 0, row_of[np.maximum(r, 0)], -1)

    return search


def exact_streamed(state: MemoryState, q: np.ndarray, k: int, *, progress):
    """Exact top-k reading the records block by block (vectors larger than RAM); one time per query, IO included."""
    st = state.store
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_r = np.full((len(q), k), -1, np.int64)
    t0 = time.perf_counter()
    with progress_bar(progress, total=st.count(), unit="records", description="exact search over the records") as bar:
        for batch in st.iter_batches(["id", "vector"]):
            s, r = exact_knn(vectors_from_column(batch.column("vector"), st.dim), q, min(k, batch.num_rows))
            ids = batch.column("id").to_pylist()
            rows = np.array([-1 if (x := state.rows.row(ids[j])) is None else x for j in r.ravel().tolist()],
                            np.int64).reshape(r.shape)
            best_s, best_r = merge_topk([best_s, s], [best_r, rows], k)
            bar.advance(batch.num_rows)
    per_query = (time.perf_counter() - t0) / max(1, len(q))
    return best_s, best_r, [per_query]
