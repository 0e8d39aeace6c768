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
from ..index import EXACT, MAX_K, FaissIndex, Index, make_index
from ..index import auto
from ..index import saved as index_saved
from ..index.auto import AUTO
from ..index.faiss_ann import min_train_size
from ..progress import progress_bar
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
TRAIN_SAMPLE = 100_000  # vectors drawn at random to train an approximate index (at least its minimum)
SAVE_AFTER_APPENDS = 0.10  # appended share of rows after which an add saves the index (else open catches up)
RERANK = 4  # a compressed index fetches RERANK x k candidates, re-ranked with the stored vectors
RERANK_ROWS = 65_536  # candidate vectors read at once when re-ranking a batch (~100 MB at d=384)


class MemoryState:
    """Store + `RowTable` + `Index` of one memory (not thread-safe; the server adds a lock).

    Attributes
    ----------
    store : Store
    rows : RowTable
    index : Index
    """

    def __init__(self, store: Store, *, progress: bool | str | None = None) -> None:
        self.store = store
        self._saved_version: Optional[int] = None
        self._saved_meta: Optional[dict] = None
        self.waiting_to_train = False  # exact search stands in for an index that cannot train yet
        self._appends_checked = 0  # versions up to this one were checked to be appends (`_only_appends_since_save`)
        self._may_hold_stale_index = True  # a saved index this state does not keep may be on storage
        self._index_dirty = True  # the in-RAM index differs from the saved index file (beyond removals)
        self._appended_since_save = 0
        self.load_note = ""
        self.load(progress=progress)

    # -- loading -------------------------------------------------------------------------

    @property
    def spec(self) -> str:
        """The index the manifest asks for (``"Flat"``, a factory string, or ``"auto"``)."""
        return self.store.manifest.get("index", EXACT)

    def target_spec(self) -> str:
        """The factory string this memory should search with now (``auto`` resolved by its size)."""
        spec = self.spec
        if spec != AUTO:
            return spec
        return auto.resolve(self.store.count(), self.store.dim, budget=self.store.manifest.get("index_budget"))

    def load(self, *, use_saved: bool = True, progress: bool | str | None = None) -> None:
        """(Re)build the row table and the index from the store, or load the saved index.

        An approximate index is used once the memory holds enough records to
        train it (`min_train_size`); until then search is exact. It is trained
        on a random sample of the records, then every record is streamed into
        it; the result is saved beside the records (`visual_memory.index.saved`).
        """
        st = self.store
        self._may_hold_stale_index = True
        target = self.target_spec()
        self.waiting_to_train = target != EXACT and st.count() < min_train_size(target)
        if self.waiting_to_train:
            target = EXACT  # until there are enough records to train it (`index_note` says so)
        if target == EXACT:
            self._rebuild(EXACT, progress=progress)
            return
        if use_saved and self._load_saved(target):
            return
        why = self.load_note
        self._rebuild(target, progress=progress)
        self.load_note = f"built from the records ({why})" if why else self.load_note
        self.save_index(force=True, opportunistic=True)

    def _load_saved(self, target: str) -> bool:
        st = self.store
        found, why = index_saved.load(st.storage, spec=target, dim=st.dim, fingerprint=self._fingerprint(),
                                      index_class=FaissIndex)
        if found is None:
            if why != "no saved index":
                log.warning("%s: %s; rebuilding the index from the records", st.path, why)
            self.load_note = why
            return False
        appended = self._appended_since_saved(found.version)
        if appended is None:
            return False
        self.rows, self.index = found.rows, found.index
        self._known_frags = set(found.fragments)
        self._saved_version, self._appended_since_save = found.version, 0
        self._saved_meta, self._index_dirty = found.meta, False
        if appended:
            scan = st.dataset.scanner(columns=list(INDEX_COLUMNS), with_row_address=True, fragments=appended)
            self._append_batches(scan.to_batches())
            self._known_frags |= {f.fragment_id for f in appended}
        self.rows.version = st.version
        self.load_note = f"loaded the saved index of version {found.version}" + (
            f" and {len(appended)} appended fragment(s)" if appended else "")
        return True

    def _appended_since_saved(self, version: int) -> Optional[list]:
        """Fragments appended since a saved index of ``version`` ([] if none); None if it cannot catch up."""
        st = self.store
        appended = [] if version == st.version else self._appended_fragments(version)
        if version > st.version or appended is None:
            self.load_note = f"saved index is of version {version}, the memory {st.version}"
            log.info("%s: %s (not only appends since); rebuilding", st.path, self.load_note)
            return None
        return appended

    def _rebuild(self, target: str, *, progress: bool | str | None = None) -> None:
        """Row table and index from a scan of the records (training ``target`` on a sample first)."""
        st = self.store
        index: Index = make_index(target, st.dim)
        if not index.is_trained:
            index.train(self._training_sample(target, progress=progress))
        rows = RowTable()
        frags = set(st.fragment_ids())
        total = st.count()
        with progress_bar(progress if target != EXACT else False, total=total, unit="records",
                          description=f"indexing ({target})") as bar:
            for batch in st.iter_batches(list(INDEX_COLUMNS), with_row_address=True):
                index.add(vectors_from_column(batch.column("vector"), st.dim))
                rows.append(batch.column("id").to_pylist(), batch.column("label").to_pylist(),
                            batch.column("weight").to_numpy(zero_copy_only=False),
                            batch.column("_rowaddr").to_numpy().astype(np.uint64))
                bar.advance(batch.num_rows)
        # Swapped in only when whole: a failure above leaves the previous index serving.
        self.rows, self.index, self._known_frags = rows, index, frags
        self.rows.version = st.version
        self._saved_version, self._appended_since_save = None, 0
        self._saved_meta, self._index_dirty = None, True
        self.load_note = "built from the records"

    def _training_sample(self, target: str, *, size: int = 0, progress: bool | str | None = None) -> np.ndarray:
        """A random sample of the stored vectors: ``size`` (default `TRAIN_SAMPLE`), at least what ``target`` needs."""
        st = self.store
        n = st.count()
        size = min(n, max(min_train_size(target), size or TRAIN_SAMPLE))
        take = np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))
        out = np.empty((size, st.dim), np.float32)
        with progress_bar(progress, total=size, unit="vectors", description="sampling to train the index") as bar:
            for lo in range(0, size, 65_536):
                part = st.dataset.take(take[lo : lo + 65_536].tolist(), columns=["vector"])
                out[lo : lo + len(part)] = vectors_from_column(part.column("vector"), st.dim)
                bar.advance(len(part))
        return out

    def _fingerprint(self) -> Optional[str]:
        return self.store.manifest["encoder"].get("fingerprint")

    def _append_batches(self, batches) -> None:
        for batch in batches:
            self.append_rows(
                batch.column("id").to_pylist(),
                batch.column("label").to_pylist(),
                batch.column("weight").to_numpy(zero_copy_only=False),
                vectors_from_column(batch.column("vector"), self.store.dim),
                batch.column("_rowaddr").to_numpy().astype(np.uint64),
            )

    def index_note(self) -> str:
        """One line on the index in use: why it is exact, or where it came from."""
        spec = self.spec
        now = self.index.spec
        if now == EXACT and spec != EXACT:
            target = self.target_spec()
            if target == EXACT:
                return f"auto: exact search at {len(self.rows)} records"
            need = min_train_size(target)
            return f"{target!r} trains at {need} records ({self.rows.n_alive} now); exact search until then"
        head = f"auto chose {now!r}; " if spec == AUTO else ""
        return head + (self.load_note or "")

    # -- the saved index -----------------------------------------------------------------

    @property
    def saves_index(self) -> bool:
        """Only trained approximate indexes are saved (an exact one is the vectors themselves)."""
        return isinstance(self.index, FaissIndex) and self.index.is_trained

    def save_index(self, *, force: bool = False, opportunistic: bool = False) -> bool:
        """Write the index beside the records if it changed (inside the writer lock); True if written.

        Appends alone are not saved every time (`open` reads the appended
        fragments and adds them) until `SAVE_AFTER_APPENDS` of the rows are
        new; any other change is saved at once. ``opportunistic``: take the
        lock only if it is free (after a rebuild on open), else skip.
        """
        st = self.store
        if st.read_only:
            return False
        if not self.saves_index:
            # A saved index this state does not keep up (another spec, a sharded session) would go
            # stale, and could hold bytes of records forgotten since: drop it (inside the lock).
            if not opportunistic and self._may_hold_stale_index:
                if st.storage.exists(index_saved.META):
                    index_saved.remove(st.storage)
                self._may_hold_stale_index = False  # checked once per load, not at every edit
            return False
        if not force and self._saved_version == self.rows.version:
            return False
        if not force and self._only_appends_since_save() and \
                self._appended_since_save <= SAVE_AFTER_APPENDS * max(1, len(self.rows)):
            return False
        if opportunistic:
            from ..errors import MemoryLockedError

            try:
                with st.writing(timeout=0.0):
                    if st.version != self.rows.version:
                        return False
                    return self._write_index()
            except MemoryLockedError:
                return False
        return self._write_index()

    def _write_index(self) -> bool:
        st = self.store
        self.addresses(np.zeros(0, np.int64))  # learn the addresses of fragments written since (compaction)
        keep = (not self._index_dirty and self._saved_meta is not None
                and self._saved_meta.get("spec") == self.index.spec and self._saved_meta.get("rows") == len(self.rows))
        self._saved_meta = index_saved.save(
            st.storage, self.rows, None if keep else self.index, version=self.rows.version, spec=self.index.spec,
            dim=st.dim, fingerprint=self._fingerprint(), fragments=sorted(self._known_frags),
            reuse=self._saved_meta if keep else None)
        self._saved_version, self._appended_since_save, self._index_dirty = self.rows.version, 0, False
        return True

    def _only_appends_since_save(self) -> bool:
        """True if every commit since the last save appended (each version's transaction is read once)."""
        if self._saved_version is None:
            return False
        ds = self.store.dataset
        try:
            for v in range(max(self._saved_version, self._appends_checked) + 1, ds.version + 1):
                txn = ds.read_transaction(v)
                if txn is None or type(txn.operation).__name__ != "Append":
                    return False
        except Exception:  # noqa: BLE001 - a version erased meanwhile: not provably appends only
            return False
        self._appends_checked = ds.version
        return True

    def append_rows(self, ids, labels, weights, vectors, addresses=None) -> None:
        """Rows already committed to the store, into the row table and the index."""
        self.index.add(vectors)
        self.rows.append(ids, labels, weights, addresses)
        self._appended_since_save += len(ids)
        self._index_dirty = True

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
            self.save_index()

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
        held = self.index.vectors(rows)
        if held is not None:
            return np.array(held)
        out = np.zeros((len(rows), self.store.dim), np.float32)
        if not len(rows):
            return out
        if self.rows.alive[rows].all():
            # By row address: a random-access read of just these rows (about 1.5 ms per 100 here).
            addrs = self.addresses(rows)
            order = np.argsort(addrs, kind="stable")
            for lo in range(0, len(order), 65_536):
                part = order[lo : lo + 65_536]
                table = self.store.dataset._take_rows(addrs[part].tolist(), columns=["vector"])
                out[part] = vectors_from_column(table.column("vector"), self.store.dim)
            return out
        ids = [self.rows.ids[r] for r in rows.tolist()]
        from ..store import sql_in

        pos = {rid: i for i, rid in enumerate(ids)}
        for lo in range(0, len(ids), 4096):
            chunk = ids[lo : lo + 4096]
            table = self.store.dataset.to_table(columns=["id", "vector"], filter=sql_in("id", chunk))
            vecs = vectors_from_column(table.column("vector"), self.store.dim)
            for rid, v in zip(table.column("id").to_pylist(), vecs):
                out[pos[rid]] = v
        return out

    def search(self, queries: np.ndarray, k: int, *, params: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
        """The index's top-k; a compressed index's candidates re-ranked with the stored vectors.

        ``params`` may hold ``rerank`` (candidates per neighbour, default
        `RERANK`, 2 for SQ8; 0 turns re-ranking off) besides the index's own knobs. With
        re-ranking, similarities are exact and the top-k is exact among the
        ``rerank x k`` candidates.
        """
        params = dict(params or {})
        factor = params.pop("rerank", None)
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 0):
            raise ValueError(f"search parameter rerank must be a non-negative integer; got {factor!r}")
        ix = self.index
        if not (isinstance(ix, FaissIndex) and ix.compressed):
            return ix.search(queries, k, params=params or None)
        # SQ8 codes are near-lossless: 2 x k candidates re-rank to the same recall as 4 x k (bench_ann).
        factor = (2 if ix.code_size >= ix.dim else RERANK) if factor is None else int(factor)
        if factor == 0:
            return ix.search(queries, k, params=params or None)
        fetch = max(k, min(k * factor, MAX_K))
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_r = np.full((len(queries), k), -1, np.int64)
        # Chunks of queries bound the candidates' vectors held at once (queries x rerank x k x dim floats).
        step = max(1, RERANK_ROWS // fetch)
        for lo in range(0, len(queries), step):
            q = queries[lo : lo + step]
            _, rows = ix.search(q, fetch, params=params or None)
            found = rows >= 0
            uniq = np.unique(rows[found])
            if not len(uniq):
                continue
            vecs = self.vectors(uniq)
            pos = np.searchsorted(uniq, np.where(found, rows, uniq[0]))
            exact = np.einsum("qd,qkd->qk", q, vecs[pos])
            exact[~found] = -np.inf
            order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            out_s[lo : lo + len(q), : order.shape[1]] = np.take_along_axis(exact, order, axis=1)
            out_r[lo : lo + len(q), : order.shape[1]] = np.take_along_axis(np.where(found, rows, -1), order, axis=1)
        return out_s, out_r

    def index_codes(self, vectors: Optional[dict]) -> Optional[dict[bytes, str]]:
        """{code bytes: id} a compressed index holds for these stored vectors (forget's extra needles)."""
        if not vectors or not (isinstance(self.index, FaissIndex) and self.index.compressed and self.index.is_trained):
            return None
        ids = list(vectors)
        return dict(zip(self.index.codes(np.stack([vectors[i] for i in ids])), ids))

    def drop_shared_codes(self, codes: Optional[dict[bytes, str]]) -> None:
        """Drop needles that a record still in the index also has (a near-duplicate's code proves nothing)."""
        if codes and isinstance(self.index, FaissIndex):
            for code in self.index.live_codes_among(list(codes)):
                codes.pop(code, None)

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
        if not erase:  # the saved index file stays valid: the row table's alive column removes them on load
            self.index.remove(rows)
            self.rows.remove(rows)
            return
        self._index_dirty = True
        keep = self.index.erase(rows)
        self.rows.erase(rows)
        if keep is not None:
            self.rows.keep(keep)

    def compact_ram(self) -> None:
        """Rebuild the index without removed rows, keeping row order."""
        self.rows.keep(self.index.compact())
        self._index_dirty = True

    def after_mutation(self) -> None:
        """Compact when fragments or tombstones pile up (inside the writer lock)."""
        st = self.store
        if self.waiting_to_train:
            self._train_if_grown()
        too_many_fragments = sum(1 for rows in st.fragment_sizes() if rows < AUTO_MERGE_ROWS) > AUTO_OPTIMIZE_FRAGMENTS
        too_many_tombstones = self.index.n_dead > AUTO_OPTIMIZE_TOMBSTONES * max(1, self.index.ntotal)
        if too_many_fragments:
            self.optimize_locked(cleanup_older_than=None, auto=True)
        elif too_many_tombstones:
            self.compact_ram()

    def _train_if_grown(self) -> None:
        """Switch from exact search to the approximate index once there are enough records to train it."""
        target = self.target_spec()
        if target == EXACT or self.store.count() < min_train_size(target):
            return
        try:
            self._rebuild(target)
        except Exception:  # noqa: BLE001 - the records are committed; exact search goes on serving
            log.exception("%s: training index %r failed; search stays exact (retry: vismem index build)",
                          self.store.path, target)
            return
        self.waiting_to_train = False
        self.store.audit("index", action="trained", spec=target, records=len(self.rows))

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
