"""The store, the row table and the index of one memory, kept in step.

Every change to a memory goes through `MemoryState`: it commits to the store
first (the truth), then updates the row table and the index so `classify`
honours the change at once. Commits made by other processes are picked up by
`sync` (appends incrementally, anything else by a reload).
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from .. import erasure
from ..errors import VisualMemoryError
from ..index import Index, make_index
from ..results import OptimizeResult
from ..rows import UNKNOWN_ADDR, RowTable
from ..store import Store, vectors_from_column

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("id", "label", "weight", "vector")
AUTO_OPTIMIZE_FRAGMENTS = 64  # fragments under AUTO_MERGE_ROWS before an automatic compaction
# Automatic compaction merges only fragments under this many rows (left by small
# adds), never bulk-sized ones, so its rewrites stay small however large the memory.
AUTO_MERGE_ROWS = 1024
AUTO_OPTIMIZE_TOMBSTONES = 0.10  # share of removed rows in the in-RAM index before it is rebuilt


class MemoryState:
    """Store + `RowTable` + `Index` of one memory (not thread-safe; the server adds a lock).

    Attributes
    ----------
    store : Store
    rows : RowTable
    index : Index
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.load()

    # -- loading -------------------------------------------------------------------------

    def load(self) -> None:
        """(Re)build the row table and the index from the store."""
        st = self.store
        self.rows = RowTable()
        self.index: Index = make_index(st.manifest.get("index", "Flat"), st.dim)
        self._known_frags = set(st.fragment_ids())
        self._append_batches(st.iter_batches(list(INDEX_COLUMNS), with_row_address=True))
        self.rows.version = st.version

    def _append_batches(self, batches) -> None:
        for batch in batches:
            self.append_rows(
                batch.column("id").to_pylist(),
                batch.column("label").to_pylist(),
                batch.column("weight").to_numpy(zero_copy_only=False),
                vectors_from_column(batch.column("vector"), self.store.dim),
                batch.column("_rowaddr").to_numpy().astype(np.uint64),
            )

    def append_rows(self, ids, labels, weights, vectors, addresses=None) -> None:
        """Rows already committed to the store, into the row table and the index."""
        self.index.add(vectors)
        self.rows.append(ids, labels, weights, addresses)

    @property
    def version(self) -> int:
        return self.store.version

    def close(self) -> None:
        """Release what this state holds beyond RAM (a sharded state stops its actors); nothing here."""

    def sync(self) -> None:
        """Catch up with commits made by other processes.

        Appends (the common case: another process adding images) are read
        incrementally, fragment by fragment; any other change reloads.
        """
        st = self.store
        if st.version == self.rows.version:
            return
        appended = self._appended_fragments(self.rows.version)
        if appended is None:
            self.load()
            return
        # scanner(), not to_batches(): the latter silently ignores `fragments=`.
        scan = st.dataset.scanner(columns=list(INDEX_COLUMNS), with_row_address=True, fragments=appended)
        self._append_batches(scan.to_batches())
        self._known_frags |= {f.fragment_id for f in appended}
        self.rows.version = st.version

    def _appended_fragments(self, since: int) -> Optional[list]:
        """Fragments added after version ``since`` if every commit since was a pure append, else None."""
        ds = self.store.dataset
        try:
            for v in range(since + 1, ds.version + 1):
                txn = ds.read_transaction(v)
                if txn is None or type(txn.operation).__name__ != "Append":
                    return None
            before = {f.fragment_id for f in ds.checkout_version(since).get_fragments()}
        except Exception:  # e.g. the old version was erased by forget: reload instead
            return None
        return [f for f in ds.get_fragments() if f.fragment_id not in before]

    def follow_erasures(self) -> bool:
        """Move to the newest version if another process erased old ones (forget, optimize); True if it did.

        Checked before every read, so no read answers from a version that a
        finished forget erased (its records would still be in RAM).
        """
        if not self.store.erased_since_loaded():
            return False
        self.store.refresh()
        self.sync()
        return True

    @contextlib.contextmanager
    def writing(self, *, timeout: float = 0.0) -> Iterator["MemoryState"]:
        """Hold the writer lock, finish an interrupted forget, and catch up with other writers."""
        with self.store.writing(timeout=timeout, on_lock=erasure.finish_if_pending):
            self.sync()
            yield self

    @contextlib.contextmanager
    def peeking(self) -> Iterator["MemoryState"]:
        """Catch up with the newest version *without* the writer lock, for a dry run.

        Reads only: no lock file, no finishing of an interrupted forget, no
        audit repair. What a dry run then computes describes ``rows.version``.
        """
        if self.store.read_only:
            raise VisualMemoryError(f"{self.store.path}: opened read-only (or at an old version); it cannot be edited, "
                                    "so there is no edit to preview")
        self.store.refresh()
        self.sync()
        yield self

    def committed(self) -> None:
        """Record that the row table and index now describe the store's current version."""
        self.rows.version = self.store.version

    # -- reading -------------------------------------------------------------------------

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of these rows (float32 (n, dim)): from a lossless index, else from the store."""
        rows = np.asarray(rows, np.int64)
        if self.index.lossless:
            return np.array(self.index.vectors(rows))
        ids = [self.rows.ids[r] for r in rows.tolist()]
        from ..store import sql_in

        out = np.zeros((len(rows), self.store.dim), np.float32)
        pos = {rid: i for i, rid in enumerate(ids)}
        for lo in range(0, len(ids), 4096):
            chunk = ids[lo : lo + 4096]
            table = self.store.dataset.to_table(columns=["id", "vector"], filter=sql_in("id", chunk))
            vecs = vectors_from_column(table.column("vector"), self.store.dim)
            for rid, v in zip(table.column("id").to_pylist(), vecs):
                out[pos[rid]] = v
        return out

    # -- row addresses -------------------------------------------------------------------

    def appended_addresses(self, n: int) -> Optional[np.ndarray]:
        """Row addresses of the ``n`` rows just appended (in order), from the new fragments; None if unsure.

        Right after an append under the lock, the fragments we have not seen
        are exactly the appended ones, rows in order; knowing this avoids
        scanning ids for addresses at the first edit after a large add.
        """
        frags = sorted((f for f in self.store.dataset.get_fragments() if f.fragment_id not in self._known_frags),
                       key=lambda f: f.fragment_id)
        sizes = [int(f.metadata.physical_rows) for f in frags]
        if sum(sizes) != n or any(f.metadata.deletion_file is not None for f in frags):
            return None
        self._known_frags |= {f.fragment_id for f in frags}
        if not frags:
            return np.zeros(0, np.uint64)
        return np.concatenate([(np.uint64(f.fragment_id) << np.uint64(32)) | np.arange(k, dtype=np.uint64)
                               for f, k in zip(frags, sizes)])

    def addresses(self, rows: np.ndarray) -> np.ndarray:
        """Lance row addresses of live rows, learning those of fragments written since we last looked."""
        current = set(self.store.fragment_ids())
        new = current - self._known_frags
        if new:
            ids, addrs = self.store.row_addresses(new)
            found, _ = self.rows.rows_of(ids)
            live = np.fromiter((self.rows.row(i) is not None for i in ids), dtype=bool, count=len(ids))
            self.rows.set_addresses(found, addrs[live])
        self._known_frags = current
        out = self.rows.addresses[np.asarray(rows, np.int64)]
        if (out == UNKNOWN_ADDR).any():  # cannot happen unless the table and RAM disagree: rebuild RAM
            log.warning("%s: in-RAM row addresses out of step with the records table; reloading", self.store.path)
            self.load()
            raise VisualMemoryError(f"{self.store.path}: the in-RAM index was out of step and has been reloaded; retry the edit")
        return out

    # -- upkeep --------------------------------------------------------------------------

    def commit_table(self, table: pa.Table, vectors: np.ndarray) -> None:
        """Append a table of new records (one commit), then the same rows to RAM."""
        self.store.append(table)
        ids = table.column("id").to_pylist()
        self.append_rows(ids, table.column("label").to_pylist(), table.column("weight").to_numpy(zero_copy_only=False),
                         vectors, self.appended_addresses(len(ids)))
        self.committed()

    def remove_rows(self, rows: np.ndarray, *, erase: bool = False) -> None:
        """Drop rows from RAM (after the store deleted them); ``erase`` also overwrites their vectors."""
        if not erase:
            self.index.remove(rows)
            self.rows.remove(rows)
            return
        keep = self.index.erase(rows)
        self.rows.erase(rows)
        if keep is not None:
            self.rows.keep(keep)

    def compact_ram(self) -> None:
        """Rebuild the index without removed rows, keeping row order."""
        self.rows.keep(self.index.compact())

    def after_mutation(self) -> None:
        """Compact when fragments or tombstones pile up (inside the writer lock)."""
        st = self.store
        too_many_fragments = sum(1 for rows in st.fragment_sizes() if rows < AUTO_MERGE_ROWS) > AUTO_OPTIMIZE_FRAGMENTS
        too_many_tombstones = self.index.n_dead > AUTO_OPTIMIZE_TOMBSTONES * max(1, self.index.ntotal)
        if too_many_fragments:
            self.optimize_locked(cleanup_older_than=None, auto=True)
        elif too_many_tombstones:
            self.compact_ram()

    def optimize_locked(self, *, cleanup_older_than: Optional[timedelta], auto: bool) -> OptimizeResult:
        """Compact the store's fragments and the in-RAM index (inside the writer lock)."""
        st = self.store
        frags_before = len(st.fragment_ids())
        bytes_before = st.size_bytes()
        v0 = st.version
        st.compact(target_rows=AUTO_MERGE_ROWS if auto else None)
        erasure.crash_point("optimize:compacted")
        dropped = self.index.n_dead
        if dropped:
            self.compact_ram()
        removed_versions = st.cleanup_versions(older_than=cleanup_older_than) if cleanup_older_than is not None else 0
        self.committed()
        result = OptimizeResult(
            version=st.version,
            fragments_before=frags_before,
            fragments_after=len(st.fragment_ids()),
            tombstones_dropped=int(dropped),
            versions_removed=removed_versions,
            bytes_before=bytes_before,
            bytes_after=st.size_bytes(),
        )
        if st.version != v0 or removed_versions:
            st.audit("optimize", auto=auto, **{k: v for k, v in result.to_dict().items() if k != "version"})
        return result
