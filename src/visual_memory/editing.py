"""The editing verbs of `Memory`: remove, forget, relabel, reweight, tags, versions, optimize.

A mixin so the facade stays one class while editing lives in its own room.
Every verb follows one protocol: take the writer lock, catch up with other
writers (`_sync`), validate and select *before* changing anything, commit one
Lance version (forget: two), update the in-RAM index so `classify` honours the
change at once, append one audit line.

Selectors
---------
``ids``, ``label``, ``source``, ``where`` and ``images`` may be combined; a
record is selected when it matches **all** of those given (AND). Giving none,
or an empty list, is refused (`SelectorError`): an edit never empties a memory
by accident (say ``where="true"`` to mean everything). Ids and images must all
exist (`UnknownIdError` lists the missing ones and nothing changes); a label
with no records is a `SelectorError` (a typo, most likely); a ``source`` or
``where`` filter that matches nothing selects nothing.
"""

from __future__ import annotations

import logging
import math
import re
from datetime import timedelta
from typing import Optional, Sequence, Union

import numpy as np

from . import erasure
from .errors import MemoryLockedError, SelectorError, UnknownIdError, VisualMemoryError
from .results import EditResult, ForgetReceipt, OptimizeResult, RemoveResult
from .store import sql_quote

log = logging.getLogger(__name__)

UNKNOWN_ADDR = np.uint64(np.iinfo(np.uint64).max)
AUTO_OPTIMIZE_FRAGMENTS = 64  # fragments under AUTO_MERGE_ROWS before an automatic compaction
# Automatic compaction merges only fragments under this many rows (left by small
# adds), never bulk-sized ones, so its rewrites stay small however large the memory.
AUTO_MERGE_ROWS = 1024
AUTO_OPTIMIZE_TOMBSTONES = 0.10  # share of removed rows in the in-RAM index before it is rebuilt
_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,99}$")

IdsLike = Union[str, Sequence[str]]


def _id_list(ids: IdsLike, what: str = "ids") -> list[str]:
    if isinstance(ids, str):
        ids = [ids]
    elif isinstance(ids, np.ndarray):
        ids = ids.tolist()
    try:
        out = [str(i) for i in ids]
    except TypeError:
        raise TypeError(f"{what} must be a string or a sequence of strings; got {type(ids).__name__}") from None
    if not out:
        raise SelectorError(f"{what} is empty: nothing selected (an edit never applies to everything by default)")
    return list(dict.fromkeys(out))


def _missing_message(missing: list[str], what: str = "id") -> str:
    shown = ", ".join(repr(m) for m in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return f"{len(missing)} unknown {what}(s): {shown}{more}; nothing was changed"


class EditingMixin:
    """Editing verbs of `visual_memory.Memory` (see the module docstring for selectors)."""

    # -- selecting -----------------------------------------------------------------

    def _rows_of_ids(self, ids: list[str]) -> tuple[np.ndarray, list[str]]:
        """Rows of live ids, and the ids that are not live."""
        rows, missing = [], []
        alive = self._index._alive
        for rid in ids:
            r = self._row_of.get(rid)
            if r is None or not alive[r]:
                missing.append(rid)
            else:
                rows.append(r)
        return np.asarray(rows, dtype=np.int64), missing

    def _select(
        self, *, ids=None, label=None, source=None, where=None, images=None, historic: bool = False
    ) -> tuple[np.ndarray, list[str], list[str]]:
        """Resolve selectors to live rows (AND).

        Returns (rows, historic_ids, kinds): ``historic_ids`` are requested ids
        that are no longer live but that the audit log still names (only with
        ``historic=True``, for `forget`); ``kinds`` names the selectors given.
        """
        given = {k: v for k, v in (("ids", ids), ("label", label), ("source", source), ("where", where), ("images", images)) if v is not None}
        if not given:
            raise SelectorError(
                "no selector given: pass ids=, label=, source=, where= or images= "
                "(an edit never applies to everything by accident; say where=\"true\" to mean every record)"
            )
        selections: list[np.ndarray] = []
        past: list[str] = []
        wanted: list[str] = []
        if ids is not None:
            wanted += _id_list(ids, "ids")
        if images is not None:
            from .images import as_list, describe, sha256_of

            items = as_list(images)
            if not items:
                raise SelectorError("images is empty: nothing selected")
            hashes = [sha256_of(item) for item in items]
            unknown = [f"{describe(it)} (sha256 {h[:12]}...)" for it, h in zip(items, hashes) if h not in self]
            if unknown and not historic:
                raise UnknownIdError(
                    f"{len(unknown)} image(s) not in the memory (no record has their content hash as id): "
                    f"{', '.join(unknown[:5])}; nothing was changed"
                )
            wanted += hashes
        if wanted:
            wanted = list(dict.fromkeys(wanted))
            rows, missing = self._rows_of_ids(wanted)
            if missing:
                if not historic:
                    raise UnknownIdError(_missing_message(missing))
                known = self._ids_in_history(missing)
                unknown = [m for m in missing if m not in known]
                if unknown:
                    raise UnknownIdError(_missing_message(unknown) + " (they are neither in the memory nor in its history)")
                past = missing
            selections.append(rows)
        if label is not None:
            labels = _id_list(label, "label")
            alive = self._index._alive
            codes = []
            for lab in labels:
                c = self._code_of.get(lab)
                if c is None or not np.any(alive & (self._codes == c)):
                    have = ", ".join(repr(x) for x in list(self.labels)[:10])
                    raise SelectorError(f"label {lab!r} has no records in {self.path} (labels: {have}); nothing was changed")
                codes.append(c)
            selections.append(np.flatnonzero(alive & np.isin(self._codes, codes)))
        if source is not None or where is not None:
            filters = []
            if source is not None:
                filters.append(f"source = {sql_quote(str(source))}")
            if where is not None:
                if not isinstance(where, str) or not where.strip():
                    raise SelectorError(f"where must be a non-empty SQL filter string; got {where!r}")
                filters.append(f"({where})")
            flt = " AND ".join(filters)
            try:
                table = self._store.dataset.to_table(columns=["id"], filter=flt)
            except Exception as exc:  # Lance raises ValueError/OSError/its own types for parse and plan errors
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise SelectorError(
                    f"malformed filter {where if where is not None else flt!r}: {first}. Columns: id, label, source, "
                    "weight, added_at, metadata (a JSON string); e.g. \"label = 'cat' AND weight < 0.5\""
                ) from None
            rows, _ = self._rows_of_ids(table.column("id").to_pylist())
            selections.append(rows)
        rows = selections[0]
        for other in selections[1:]:
            rows = np.intersect1d(rows, other)
        return np.unique(rows), past, sorted(given)

    def _ids_in_history(self, ids: list[str]) -> set[str]:
        want = set(ids)
        seen: set[str] = set()
        for entry in self._store.audit_entries():
            seen |= erasure._mentions(entry, want)
        return seen

    # -- row addresses -------------------------------------------------------------

    def _appended_addresses(self, n: int) -> Optional[np.ndarray]:
        """Row addresses of the ``n`` rows just appended (in order), from the new fragments; None if unsure.

        Right after an append under the lock, the fragments we have not seen
        are exactly the appended ones, rows in order; knowing this avoids
        scanning ids for addresses at the first edit after a large add.
        """
        frags = sorted((f for f in self._store.dataset.get_fragments() if f.fragment_id not in self._known_frags),
                       key=lambda f: f.fragment_id)
        sizes = [int(f.metadata.physical_rows) for f in frags]
        if sum(sizes) != n or any(f.metadata.deletion_file is not None for f in frags):
            return None
        self._known_frags |= {f.fragment_id for f in frags}
        if not frags:
            return np.zeros(0, np.uint64)
        return np.concatenate([(np.uint64(f.fragment_id) << np.uint64(32)) | np.arange(k, dtype=np.uint64)
                               for f, k in zip(frags, sizes)])

    def _addresses(self, rows: np.ndarray) -> np.ndarray:
        """Lance row addresses of live rows, learning those of fragments written since we last looked."""
        current = set(self._store.fragment_ids())
        new = current - self._known_frags
        if new:
            ids, addrs = self._store.row_addresses(new)
            row_of = self._row_of
            idx = np.fromiter((row_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
            ok = idx >= 0
            self._addr[idx[ok]] = addrs[ok]
        self._known_frags = current
        out = self._addr[rows]
        if (out == UNKNOWN_ADDR).any():  # cannot happen unless the table and RAM disagree: rebuild RAM
            log.warning("%s: in-RAM row addresses out of step with the records table; reloading", self.path)
            self._load_index()
            raise VisualMemoryError(f"{self.path}: the in-RAM index was out of step and has been reloaded; retry the edit")
        return out

    # -- remove ----------------------------------------------------------------------

    def remove(
        self,
        *,
        ids: Optional[IdsLike] = None,
        label: Optional[IdsLike] = None,
        source: Optional[str] = None,
        where: Optional[str] = None,
        images=None,
        lock_timeout: float = 0.0,
    ) -> RemoveResult:
        """Remove records: they stop voting at once (one new version; bytes stay until `forget`/`optimize`).

        Parameters
        ----------
        ids : str or sequence of str, optional
            Record ids; all must exist.
        label : str or sequence of str, optional
            Every record with (one of) these labels.
        source : str, optional
            Every record with exactly this ``source``.
        where : str, optional
            A Lance SQL filter over the columns id, label, source, weight,
            added_at, metadata, e.g. ``"weight < 0.5"``.
        images : image or sequence of images, optional
            Records whose id is the image's content hash (the default id).
        lock_timeout : float, default 0.0
            Seconds to wait for another writer (`MemoryLockedError` after).

        Selectors combine with AND; at least one is required.

        Returns
        -------
        RemoveResult(version, removed, ids)

        Raises
        ------
        SelectorError
            No selector, an empty list, a label with no records, a malformed filter.
        UnknownIdError
            Listing ids (or images) not in the memory; nothing is removed.

        Examples
        --------
        >>> import numpy as np, tempfile, visual_memory as vm
        >>> mem = vm.create(tempfile.mkdtemp() + "/m", encoder=None, dim=2)
        >>> _ = mem.add_embeddings(np.eye(2), labels=["cat", "dog"], ids=["a", "b"])
        >>> mem.remove(ids="a").removed, mem.ids()
        (1, ['b'])
        """
        with self._store.writing(timeout=lock_timeout):
            self._sync()
            rows, _, kinds = self._select(ids=ids, label=label, source=source, where=where, images=images)
            if not len(rows):
                return RemoveResult(self.version, 0, [])
            removed = [self._ids[r] for r in rows]
            self._store.delete_rows(self._addresses(rows))
            self._index.remove(rows)
            for rid in removed:
                self._row_of.pop(rid, None)
            self._loaded_version = self._store.version
            selector = {k: v for k, v in (("label", label), ("source", source), ("where", where)) if v is not None}
            self._store.audit("remove", n=len(removed), ids=removed, selector=selector or None)
            self._after_mutation()
            return RemoveResult(self.version, len(removed), removed)

    # -- forget ----------------------------------------------------------------------

    def forget(
        self,
        *,
        ids: Optional[IdsLike] = None,
        label: Optional[IdsLike] = None,
        source: Optional[str] = None,
        where: Optional[str] = None,
        images=None,
        verify: bool = True,
        lock_timeout: float = 0.0,
    ) -> ForgetReceipt:
        """Remove records, then erase every byte of them from the memory directory.

        Same selectors as `remove`; ``ids``/``images`` may also name records
        removed earlier whose bytes are still on disk. When this returns, no
        file under the memory directory holds the records' vectors, ids,
        labels-with-ids, sources, metadata or thumbnails: not the records
        table, its older versions or deletion files, nor the audit log (which
        keeps a salted hash of each id). Versions that held the records are
        deleted (opening one names the forget that erased it); tags on them
        are dropped. The in-RAM vectors are zeroed too.

        Cost: one rewrite of each ~64 MB data file that held a record, plus a
        scan of every file for the proof (``verify=False`` skips the scan).
        A crash part-way is finished by the next writer or `visual_memory.open`.

        Returns
        -------
        ForgetReceipt
            ``.to_dict()`` is JSON: what was erased (salted id hashes), when,
            versions before/after, erased versions, dropped tags, and the
            verification scan.

        Raises
        ------
        SelectorError, UnknownIdError
            As `remove`; nothing is changed.
        ErasureError
            If the verification scan still finds bytes of the records (with the receipt).
        """
        with self._store.writing(timeout=lock_timeout):
            self._sync()
            rows, past, kinds = self._select(ids=ids, label=label, source=source, where=where, images=images, historic=True)
            if not len(rows) and not past:
                raise SelectorError(f"the selector ({', '.join(kinds)}) matches no records; nothing to forget")
            live_ids = [self._ids[r] for r in rows]
            vectors = dict(zip(live_ids, self._index.reconstruct(rows))) if verify else None
            if verify and past:
                for v in sorted({int(e["version"]) for e in self._store.audit_entries() if erasure._mentions(e, set(past))}):
                    vectors.update({k: x for k, x in erasure.vectors_at(self._store, past, v).items() if k not in vectors})
            addrs = self._addresses(rows)
            journal = erasure.begin(self._store, live_ids + past, selector=kinds)

            # Rows removed earlier still hold their vectors in RAM (tombstoned): zero them too.
            past_set = set(past)
            dead_rows = [r for r, i in enumerate(self._ids) if i in past_set] if past else []
            ram_rows = np.concatenate([rows, np.asarray(dead_rows, np.int64)])

            def drop_from_ram() -> None:
                if not self._index.erase(ram_rows):
                    self._compact_ram()
                    return
                for r in ram_rows.tolist():
                    self._row_of.pop(self._ids[r], None)
                    self._ids[r] = ""

            def live() -> list[str]:
                return self.ids() + list(self._labels)

            try:
                receipt = erasure.run(
                    self._store, journal, addresses=addrs, vectors=vectors, verify_scan=verify, live=live, on_deleted=drop_from_ram
                )
            finally:
                self._loaded_version = self._store.version
            self._after_mutation()
            return receipt

    def _finish_pending_forget(self) -> Optional[ForgetReceipt]:
        """Finish a forget a crash interrupted, if the lock is free (else leave it to the next writer)."""
        if not erasure.pending(self.path):
            return None
        try:
            with self._store.writing(timeout=0.0):
                self._sync()
        except MemoryLockedError:
            log.warning("%s: a forget is unfinished and another process holds the lock; the next writer finishes it", self.path)
        return None

    # -- relabel / reweight ----------------------------------------------------------

    def _live_rows(self, ids: IdsLike) -> tuple[list[str], np.ndarray]:
        ids = _id_list(ids)
        rows, missing = self._rows_of_ids(ids)
        if missing:
            raise UnknownIdError(_missing_message(missing))
        return ids, rows

    def relabel(self, ids: IdsLike, label: str, *, lock_timeout: float = 0.0) -> EditResult:
        """Give records a new label (one version; votes use it at once).

        Parameters
        ----------
        ids : str or sequence of str
            Records to relabel; all must exist.
        label : str
            The new label (non-empty).

        Returns
        -------
        EditResult(version, changed)
            ``changed`` counts records whose label differed; 0 changes nothing
            and makes no version.

        Examples
        --------
        >>> import numpy as np, tempfile, visual_memory as vm
        >>> mem = vm.create(tempfile.mkdtemp() + "/m", encoder=None, dim=2)
        >>> _ = mem.add_embeddings(np.eye(2), labels=["cat", "dog"], ids=["a", "b"])
        >>> mem.relabel("b", "cat").changed, mem.labels
        (1, {'cat': 2})
        """
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"label must be a non-empty string; got {label!r}")
        with self._store.writing(timeout=lock_timeout):
            self._sync()
            ids, rows = self._live_rows(ids)
            code = self._code_of.get(label)
            change = rows if code is None else rows[self._codes[rows] != code]
            if not len(change):
                return EditResult(self.version, 0)
            old = sorted({self._labels[c] for c in self._codes[change]})
            self._store.update_rows(self._addresses(change), {"label": sql_quote(label)})
            if code is None:
                code = self._code_of[label] = len(self._labels)
                self._labels.append(label)
            self._codes[change] = code
            self._loaded_version = self._store.version
            self._store.audit("relabel", n=len(change), ids=[self._ids[r] for r in change], label=label, old_labels=old)
            self._after_mutation()
            return EditResult(self.version, len(change))

    def reweight(self, ids: IdsLike, weight: Union[float, Sequence[float]], *, lock_timeout: float = 0.0) -> EditResult:
        """Set records' vote weight (one version; votes use it at once).

        Parameters
        ----------
        ids : str or sequence of str
            Records to reweight; all must exist.
        weight : float or sequence of float
            One weight for all, or one per id; finite and >= 0. A record's
            neighbour contribution is multiplied by it: 0 means the record
            never votes but is still retrieved and inspectable, 1 is the default.

        Returns
        -------
        EditResult(version, changed)
        """
        raw = [ids] if isinstance(ids, str) else [str(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        if not raw:
            raise SelectorError("ids is empty: nothing selected (an edit never applies to everything by default)")
        if np.ndim(weight) == 0:
            if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)):
                raise TypeError(f"weight must be a number or a sequence of numbers; got {weight!r}")
            w = np.full(len(raw), float(weight))
        else:
            w = np.asarray(list(weight), dtype=np.float64)
            if len(w) != len(raw):
                raise ValueError(f"got {len(raw)} ids but {len(w)} weights (give one weight, or one per id)")
        bad = [(i, x) for i, x in zip(raw, w.tolist()) if not math.isfinite(x) or x < 0]
        if bad:
            raise ValueError(f"weights must be finite and >= 0; got {bad[0][1]!r} for id {bad[0][0]!r}"
                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        per_id: dict[str, float] = {}
        for rid, x in zip(raw, w.tolist()):
            if per_id.setdefault(rid, x) != x:
                raise ValueError(f"id {rid!r} is given twice with different weights ({per_id[rid]} and {x})")
        ids_l, w = list(per_id), np.fromiter(per_id.values(), dtype=np.float64, count=len(per_id))
        w32 = w.astype(np.float32)
        with self._store.writing(timeout=lock_timeout):
            self._sync()
            ids_l, rows = self._live_rows(ids_l)
            mask = self._weights[rows] != w32
            change, new = rows[mask], w32[mask]
            if not len(change):
                return EditResult(self.version, 0)
            changed_ids = [self._ids[r] for r in change]
            uniform = bool(np.all(new == new[0]))
            if uniform:
                self._store.update_rows(self._addresses(change), {"weight": f"CAST({float(new[0])!r} AS FLOAT)"})
            else:
                self._store.update_weights(changed_ids, new)
            self._weights[change] = new
            self._loaded_version = self._store.version
            fields = {"weight": float(new[0])} if uniform else {"weights": new.tolist()}
            self._store.audit("reweight", n=len(change), ids=changed_ids, **fields)
            self._after_mutation()
            return EditResult(self.version, len(change))

    # -- versions and tags -----------------------------------------------------------

    def tags(self) -> dict[str, int]:
        """Named versions: tag -> version."""
        return self._store.tags()

    def tag(self, name: str, *, version: Optional[int] = None, lock_timeout: float = 0.0) -> dict:
        """Name a version (default: the current one) so `visual_memory.open(path, version=name)` reads it.

        A name starts with a letter and holds letters, digits, ``.``, ``_``,
        ``-`` (so it never looks like a version number). A `forget` that
        erases the tagged version drops the tag and says so in its receipt.
        """
        if not isinstance(name, str) or not _TAG_NAME.match(name):
            raise ValueError(f"tag name must start with a letter and use letters, digits, '.', '_', '-' (max 100); got {name!r}")
        with self._store.writing(timeout=lock_timeout):
            self._sync()
            v = self.version if version is None else int(version)
            existing = self._store.tags()
            if name in existing:
                raise ValueError(f"tag {name!r} already names version {existing[name]}; remove it first (`untag`)")
            if v not in self._store.version_numbers():
                raise VisualMemoryError(f"{self.path}: version {v} does not exist (or was erased by a forget); cannot tag it")
            self._store.create_tag(name, v)
            self._store.audit("tag", tag=name, tagged_version=v)
        return {"tag": name, "version": v}

    def untag(self, name: str, *, lock_timeout: float = 0.0) -> None:
        """Remove a tag (the version itself stays)."""
        with self._store.writing(timeout=lock_timeout):
            if name not in self._store.tags():
                raise SelectorError(f"no tag {name!r} in {self.path} (tags: {sorted(self._store.tags())})")
            self._store.delete_tag(name)
            self._store.audit("untag", tag=name)

    def versions(self) -> list[dict]:
        """One row per audited mutation, oldest first.

        Each: ``version``, ``op``, ``ts``, ``n`` (records touched, if known),
        ``readable`` (the version can still be opened), ``tags`` (names on it).
        """
        readable = set(self._store.version_numbers())
        by_version: dict[int, list[str]] = {}
        for name, v in self._store.tags().items():
            by_version.setdefault(v, []).append(name)
        rows = []
        for e in self._store.audit_entries():
            v = int(e.get("version", 0))
            rows.append({
                "version": v,
                "op": e.get("op"),
                "ts": e.get("ts"),
                "n": e.get("n"),
                "readable": v in readable,
                "tags": by_version.get(v, []) if e.get("op") not in ("tag", "untag") else [],
                "recovered": bool(e.get("recovered")),
            })
        return rows

    # -- compaction ------------------------------------------------------------------

    def optimize(self, *, cleanup_older_than: Optional[timedelta] = None, lock_timeout: float = 0.0) -> OptimizeResult:
        """Compact the records table and the in-RAM index.

        Merges small fragments (many small adds leave one per add), rewrites
        fragments with over 10% removed rows, and rebuilds the in-RAM index
        without removed rows. Runs by itself after a mutation when more than
        64 fragments under 1,024 rows pile up (merging only those) or over
        10% of the in-RAM rows are removed (rebuilding the in-RAM index).

        Parameters
        ----------
        cleanup_older_than : timedelta, optional
            Also delete versions older than this (untagged ones; their files
            with them), which is what shrinks the directory. Default: keep
            every version (history stays readable).

        Returns
        -------
        OptimizeResult
        """
        with self._store.writing(timeout=lock_timeout):
            self._sync()
            return self._optimize_locked(cleanup_older_than=cleanup_older_than, auto=False)

    def _optimize_locked(self, *, cleanup_older_than: Optional[timedelta], auto: bool) -> OptimizeResult:
        st = self._store
        frags_before = len(st.fragment_ids())
        bytes_before = st.size_bytes()
        v0 = st.version
        st.compact(target_rows=AUTO_MERGE_ROWS if auto else None)
        erasure.crash_point("optimize:compacted")
        dropped = self._index.n_dead
        if dropped:
            self._compact_ram()
        removed_versions = st.cleanup_versions(older_than=cleanup_older_than) if cleanup_older_than is not None else 0
        self._loaded_version = st.version
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

    def _compact_ram(self) -> None:
        """Rebuild the in-RAM index without removed rows, keeping row order."""
        keep = self._index.compact()
        self._ids = [self._ids[i] for i in keep.tolist()]
        self._codes = self._codes[keep]
        self._weights = self._weights[keep]
        self._addr = self._addr[keep]
        self._row_of = {rid: i for i, rid in enumerate(self._ids)}

    def _after_mutation(self) -> None:
        """Compact when fragments or tombstones pile up (inside the writer lock)."""
        st = self._store
        too_many_fragments = sum(1 for rows in st.fragment_sizes() if rows < AUTO_MERGE_ROWS) > AUTO_OPTIMIZE_FRAGMENTS
        too_many_tombstones = self._index.n_dead > AUTO_OPTIMIZE_TOMBSTONES * max(1, self._index.ntotal)
        if too_many_fragments:
            self._optimize_locked(cleanup_older_than=None, auto=True)
        elif too_many_tombstones:
            self._compact_ram()
