"""The memory: manifest, Lance records table, audit log, writer lock, on any `storage`.

Layout (a local directory, or the same names under an object-store prefix)::

    MEMORY/
      manifest.json   format version, encoder spec, dim, index factory string, audit salt
      records.lance/  Lance dataset, one row per record (schema below)
      audit.jsonl     one JSON line per mutation, fsync'd, append-only
                      (object storage: audit/<seq>.json, one object per entry)
      .lock           advisory writer lock (fcntl.flock); holds the writer's pid
                      (object storage: _lease.json, a lease; see `visual_memory.storage`)

The store is the truth; the search index is a cache rebuilt from it. The
memory's version is the Lance dataset version: each committed mutation makes
exactly one. A crash between a Lance commit and its audit line is repaired on
the next write by diffing versions (`Store.reconcile_audit`), so the audit log
always agrees with the records.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from .errors import MemoryExistsError, MemoryLockedError, NotAMemoryError, VisualMemoryError
from .storage import AUDIT, LOCK, Storage, actor as _actor, open_storage

FORMAT = "visual-memory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECORDS = "records.lance"
DERIVED_CACHE = "cache"  # rebuildable derived data (e.g. self-neighbours); dropped by forget
SAVED_INDEX = "index/"  # the saved approximate index (visual_memory.index.saved); rewritten by forget
# Rewritten (a new random epoch) just before any old version is deleted (forget,
# optimize's cleanup): a reader that sees a new epoch moves to the newest version
# before it answers, so no process returns a forgotten record after the forget
# returned, and none reads a version whose files are going away.
ERASURES = "erasures.json"
__all__ = ["AUDIT", "LOCK", "MANIFEST", "RECORDS", "Store", "record_schema"]


def record_schema(dim: int) -> pa.Schema:
    """Arrow schema of the records table for vectors of dimension ``dim``."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("label", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("source", pa.string()),
            pa.field("weight", pa.float32(), nullable=False),
            pa.field("added_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("metadata", pa.string()),  # JSON object or null
            pa.field("thumbnail", pa.binary()),  # small JPEG for explanations, or null
        ]
    )


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


class Store:
    """Durable records of one memory. Not thread-safe; one per process.

    Use `Store.create` / `Store.open`; every write goes through `writing()`.
    ``path`` is a `pathlib.Path` for a local memory and the URI string for one
    on object storage; ``storage`` reaches its files either way.
    """

    def __init__(self, storage: Storage, manifest: dict, dataset, *, read_only: bool) -> None:
        self.storage = storage
        self.path = storage.location
        self.manifest = manifest
        self.dataset = dataset
        self.read_only = read_only
        self.pinned = False  # opened at a fixed version: never moves
        self._epoch: Optional[str] = None  # the erasure marker when this store last moved (set by `open`)
        self._locked = False
        self._audit_state: Optional[tuple[Any, int]] = None  # (storage audit state, version) after our last line

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def create(cls, path, *, encoder: dict, index: str = "Flat", storage_options: Optional[dict] = None) -> "Store":
        import lance

        storage = open_storage(path, storage_options=storage_options)
        if storage.exists(MANIFEST):
            raise MemoryExistsError(f"{storage.location}: a memory already exists here; open it with visual_memory.open()")
        if storage.walk():
            raise MemoryExistsError(f"{storage.location}: directory is not empty; choose a new path for the memory")
        if not storage.remote:
            storage.root.mkdir(parents=True, exist_ok=True)
        dim = int(encoder["dim"])
        ds = lance.write_dataset(record_schema(dim).empty_table(), storage.url(RECORDS), mode="create",
                                 storage_options=storage.lance_options)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "encoder": encoder,
            "dim": dim,
            "index": index,
            "vector_dtype": "float32",
            "created_at": now_utc().isoformat(),
        }
        # Written before the manifest (so before anyone can open the memory) and not
        # through `writing()`, whose reconcile step would find version 1 unaudited.
        entry = {"ts": now_utc().isoformat(), "op": "create", "version": int(ds.version), "actor": _actor(),
                 "encoder": encoder["name"], "fingerprint": encoder.get("fingerprint"), "index": index}
        storage.audit_append(json.dumps(entry, sort_keys=True, default=str))
        # The manifest is written last: its presence marks a complete memory.
        storage.write(MANIFEST, _json_bytes(manifest))
        return cls.open(path, storage_options=storage_options)

    @classmethod
    def open(cls, path, *, version: Optional[int] = None, read_only: bool = False,
             storage_options: Optional[dict] = None) -> "Store":
        import lance

        storage = path if isinstance(path, Storage) else open_storage(path, storage_options=storage_options)
        where = storage.location
        manifest = _read_manifest(storage)
        epoch = _read_epoch(storage)  # before the dataset: a later erasure then shows as a new epoch
        try:
            ds = lance.dataset(storage.url(RECORDS), version=version, storage_options=storage.lance_options)
        except Exception as exc:
            if version is not None:
                raise VisualMemoryError(_version_gone_message(storage, version, exc)) from exc
            raise NotAMemoryError(f"{where}: records table is missing or unreadable ({exc})") from exc
        store = cls(storage, manifest, ds, read_only=read_only or version is not None)
        store._epoch, store.pinned = epoch, version is not None
        return store

    # -- reading -------------------------------------------------------------------

    @property
    def version(self) -> int:
        return int(self.dataset.version)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def latest_version(self) -> int:
        return int(self.dataset.latest_version)

    def refresh(self) -> bool:
        """Move to the newest committed version; True if it changed."""
        before = self.version
        self._epoch = _read_epoch(self.storage)
        self.dataset = self.dataset.checkout_version(self.dataset.latest_version)
        return self.version != before

    def erased_since_loaded(self) -> bool:
        """Whether another process deleted old versions (forget, optimize) since this one last moved.

        One small read (a file, or a GET on object storage); never touches the
        dataset object, so it is safe beside concurrent reads.
        """
        return not self.pinned and _read_epoch(self.storage) != self._epoch

    def read_table(self, columns: list[str], *, where: Optional[str] = None, offset: Optional[int] = None,
                   limit: Optional[int] = None) -> pa.Table:
        """Rows of the current version; the newest one if an erasure removed this one's files mid-read.

        The fallback opens a fresh dataset object (it never moves this store),
        so it is safe beside concurrent readers of this store.
        """
        try:
            return self.dataset.to_table(columns=columns, filter=where, offset=offset, limit=limit)
        except Exception:
            if not self.erased_since_loaded():
                raise
            import lance

            latest = lance.dataset(self.storage.url(RECORDS), storage_options=self.storage.lance_options)
            return latest.to_table(columns=columns, filter=where, offset=offset, limit=limit)

    def count(self) -> int:
        return int(self.dataset.count_rows())

    def read_columns(self, columns: list[str], *, where: Optional[str] = None) -> pa.Table:
        return self.dataset.to_table(columns=columns, filter=where)

    def iter_batches(
        self, columns: list[str], *, batch_size: int = 65536, with_row_address: bool = False
    ) -> Iterator[pa.RecordBatch]:
        """Batches in table order; ``with_row_address`` adds ``_rowaddr`` (fragment id << 32 | offset)."""
        yield from self.dataset.to_batches(columns=columns, batch_size=batch_size, with_row_address=with_row_address)

    def size_bytes(self) -> int:
        return sum(size for _, size in self.storage.walk())

    # -- writing -------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, *, timeout: float = 0.0, on_lock: Optional[Callable[["Store"], Any]] = None) -> Iterator["Store"]:
        """Hold the cross-process writer lock; move to the latest version first.

        ``timeout`` seconds to wait for another writer (0: fail at once). On
        entry the manifest is re-read (another process may have changed it,
        e.g. a first forget writing the audit salt); then ``on_lock(store)``
        runs (the memory finishes an interrupted forget there), and the audit
        log is reconciled with the versions.

        Raises
        ------
        MemoryLockedError
            Naming the process that holds the lock.
        """
        if self.read_only:
            raise VisualMemoryError(f"{self.path}: opened read-only (or at an old version); cannot write")
        if self._locked:  # re-entrant within one process
            yield self
            return
        with self.storage.lock(timeout=timeout):
            self._locked = True
            try:
                self.manifest = _read_manifest(self.storage)
                self.refresh()
                if on_lock is not None:
                    on_lock(self)
                self.reconcile_audit()
                yield self
            finally:
                self._locked = False

    def _require_lock(self) -> None:
        if not self._locked:
            raise RuntimeError("store writes must happen inside `with store.writing():`")
        lost = self.storage.lock_lost()
        if lost:
            raise MemoryLockedError(f"{self.path}: this process no longer holds the writer lease ({lost}); "
                                    "nothing more was written; retry the operation")

    def write_manifest(self, manifest: dict) -> None:
        self._require_lock()
        self.storage.write(MANIFEST, _json_bytes(manifest))
        self.manifest = manifest

    def append(self, table: pa.Table) -> int:
        """Append rows (one commit). Returns the new version."""
        import lance

        self._require_lock()
        self.dataset = lance.write_dataset(table, self.dataset, mode="append", max_rows_per_file=self.fragment_rows,
                                           storage_options=self.storage.lance_options)
        return self.version

    def commit_fragments(self, fragments: Sequence) -> int:
        """Append data files written elsewhere (Lance's distributed write, e.g. by Ray workers) as one commit.

        ``fragments`` are `lance.FragmentMetadata` from `lance.fragment.write_fragments`
        into this dataset's URI. Returns the new version.
        """
        import lance

        self._require_lock()
        op = lance.LanceOperation.Append(list(fragments))
        self.dataset = lance.LanceDataset.commit(self.dataset.uri, op, read_version=self.version,
                                                 storage_options=self.storage.lance_options)
        return self.version

    def data_files(self) -> set[str]:
        """Paths (relative to the dataset's ``data/``) of the data files the current version references."""
        return {f.path for frag in self.dataset.get_fragments() for f in frag.metadata.files}

    def delete(self, where: str) -> int:
        """Logically delete rows matching a Lance SQL predicate. Returns the new version."""
        self._require_lock()
        self.dataset.delete(where)
        self.dataset = self.dataset.checkout_version(self.dataset.latest_version)
        return self.version

    # -- audit log -----------------------------------------------------------------

    def audit(self, op: str, **fields: Any) -> dict:
        """Append one durable line to the audit log (inside `writing()`)."""
        self._require_lock()
        entry = {"ts": now_utc().isoformat(), "op": op, "version": self.version, "actor": _actor(), **fields}
        self.storage.audit_append(json.dumps(entry, sort_keys=True, default=str))
        self._audit_state = (self.storage.audit_state(), self.version)
        return entry

    def audit_entries(self) -> list[dict]:
        out = []
        for line in self.storage.audit_lines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                # A damaged line (the torn last line of a crash is already left out):
                # the commit it described is re-derived by reconcile_audit.
                continue
        return out

    def reconcile_audit(self) -> list[dict]:
        """Audit versions committed without an audit line (a crash in between).

        Diffs the ids of each unaudited version against the one before, so the
        recovered line says exactly what changed. Returns the lines written.
        """
        self._require_lock()
        # Drop a torn trailing line (cut off in place) so the log stays one JSON object per line.
        self.storage.audit_repair()
        # Skip re-parsing the whole log when nobody else appended since our last line.
        state = self._audit_state
        if state is not None and self.storage.audit_state() == state[0]:
            audited = state[1]
        else:
            audited = max((int(e.get("version", 0)) for e in self.audit_entries()), default=0)
        latest = self.version
        if audited >= latest:
            return []
        versions = {int(v["version"]) for v in self.dataset.versions()}
        written = []
        prev_ids = self._ids_at(audited, versions)
        for v in range(audited + 1, latest + 1):
            if v not in versions:
                continue
            ids = self._ids_at(v, versions)
            fields: dict[str, Any] = {"recovered": True, "version": v}
            if prev_ids is not None and ids is not None:
                added, removed = sorted(ids - prev_ids), sorted(prev_ids - ids)
                op = "add" if added and not removed else "remove" if removed and not added else "update"
                fields.update(op=op, n=len(added) or len(removed), ids=added or None, removed=len(removed))
            else:
                fields.update(op="unknown", n=None)
            entry = {"ts": now_utc().isoformat(), "actor": _actor(), **fields}
            self.storage.audit_append(json.dumps(entry, sort_keys=True))
            written.append(entry)
            prev_ids = ids
        return written

    def _ids_at(self, version: int, versions: set[int]) -> Optional[set[str]]:
        if version not in versions:
            return None
        ds = self.dataset.checkout_version(version)
        return set(ds.to_table(columns=["id"]).column("id").to_pylist())

    # -- editing support: row addresses, compaction, version cleanup, tags -----------
    # Records are addressed by Lance row address (fragment id << 32 | offset), so a
    # delete or update touches one fragment and its predicate names no record id
    # (Lance keeps predicates in its transaction files).

    @property
    def fragment_rows(self) -> int:
        """Rows per data file: about 64 MB of vectors, the most one erasure rewrites per file it touches."""
        return max(1024, FRAGMENT_BYTES // (4 * self.dim + 64))

    def fragment_ids(self) -> list[int]:
        return [f.fragment_id for f in self.dataset.get_fragments()]

    def fragment_sizes(self) -> list[int]:
        """Physical rows of each fragment (from the manifest; no I/O)."""
        return [int(f.metadata.physical_rows) for f in self.dataset.get_fragments()]

    def row_addresses(self, fragment_ids: Optional[Iterable[int]] = None) -> tuple[list[str], np.ndarray]:
        """Ids and row addresses (uint64) of the live rows in these fragments (default: all)."""
        frags = None
        if fragment_ids is not None:
            want = set(fragment_ids)
            frags = [f for f in self.dataset.get_fragments() if f.fragment_id in want]
            if not frags:
                return [], np.zeros(0, np.uint64)
        table = self.dataset.scanner(columns=["id"], with_row_address=True, fragments=frags).to_table()
        return table.column("id").to_pylist(), table.column("_rowaddr").to_numpy().astype(np.uint64)

    def _checkout_latest(self) -> int:
        self.dataset = self.dataset.checkout_version(self.dataset.latest_version)
        return self.version

    def delete_rows(self, addresses: Sequence[int]) -> int:
        """Logically delete rows by address (one commit). Returns the new version."""
        self._require_lock()
        self.dataset.delete(_addr_in(addresses))
        return self._checkout_latest()

    def update_rows(self, addresses: Sequence[int], updates: dict[str, str]) -> int:
        """Set columns to SQL expressions on rows by address (one commit; Lance moves the rows to a new fragment)."""
        self._require_lock()
        self.dataset.update(updates, where=_addr_in(addresses))
        return self._checkout_latest()

    def update_weights(self, ids: Sequence[str], weights: np.ndarray) -> int:
        """Give each record its own weight, in one commit (a merge on ``id``)."""
        self._require_lock()
        table = pa.table({"id": pa.array(list(ids), pa.string()), "weight": pa.array(np.asarray(weights, np.float32))})
        self.dataset.merge_insert("id").when_matched_update_all().execute(table)
        return self._checkout_latest()

    def compact(self, *, materialize_deletions_threshold: float = 0.1, target_rows: Optional[int] = None) -> int:
        """Merge small fragments and rewrite those whose deleted share exceeds the threshold.

        ``materialize_deletions_threshold=0.0`` rewrites every fragment holding
        any deleted row: the step of `forget` that drops the bytes from the
        newest version. Only fragments under ``target_rows`` (default
        `fragment_rows`) are merged. Returns the number of fragments rewritten.
        """
        self._require_lock()
        metrics = self.dataset.optimize.compact_files(
            target_rows_per_fragment=int(target_rows or self.fragment_rows),
            materialize_deletions_threshold=materialize_deletions_threshold,
        )
        self._checkout_latest()
        return int(metrics.fragments_removed)

    def version_numbers(self) -> list[int]:
        """Versions that can still be opened, oldest first."""
        return sorted(int(v["version"]) for v in self.dataset.versions())

    def cleanup_versions(self, versions: Optional[list[int]] = None, *, older_than: Optional[timedelta] = None) -> int:
        """Delete old versions and every file only they reference (never the current one).

        Either the given ``versions`` or all untagged ones ``older_than``.
        Safe only under the writer lock (``delete_unverified`` would otherwise
        race a writer's uncommitted files). Returns the versions removed.
        """
        self._require_lock()
        if versions is not None:
            versions = [int(v) for v in versions if int(v) != self.version]
            if not versions:
                return 0
        self._mark_erasure()
        if versions is not None:
            stats = self.dataset.cleanup_old_versions(versions=versions, delete_unverified=True)
        else:
            stats = self.dataset.cleanup_old_versions(
                older_than=older_than, delete_unverified=True, error_if_tagged_old_versions=False
            )
        self._checkout_latest()
        return int(stats.old_versions)

    def _mark_erasure(self) -> None:
        """Announce that old versions are about to go (see `ERASURES`)."""
        import uuid

        self._epoch = uuid.uuid4().hex
        self.storage.write(ERASURES, json.dumps({"epoch": self._epoch, "version": self.version, "actor": _actor(),
                                                 "ts": now_utc().isoformat()}).encode())

    def tags(self) -> dict[str, int]:
        """Tag name -> version."""
        return {name: int(info["version"]) for name, info in sorted(self.dataset.tags.list().items())}

    def create_tag(self, name: str, version: int) -> None:
        self._require_lock()
        self.dataset.tags.create(name, int(version))

    def delete_tag(self, name: str) -> None:
        self._require_lock()
        self.dataset.tags.delete(name)

    def salt(self) -> str:
        """The memory's secret for salted id hashes in the audit log (made on first use, under the lock).

        Read from the manifest as `writing()` re-read it on entry, so a process
        that opened the memory before another one's first forget uses the salt
        that forget wrote rather than making (and writing over it) a new one.
        """
        salt = self.manifest.get("audit_salt")
        if salt is None:
            import secrets

            self._require_lock()
            manifest = _read_manifest(self.storage)
            salt = manifest.get("audit_salt")
            if salt is None:
                salt = manifest["audit_salt"] = secrets.token_hex(16)
                self.write_manifest(manifest)
            self.manifest = manifest
        return salt


FRAGMENT_BYTES = 64 * 1024 * 1024


def _addr_in(addresses: Sequence[int]) -> str:
    return "_rowaddr IN (" + ", ".join(str(int(a)) for a in addresses) + ")"


def _read_epoch(storage: Storage) -> Optional[str]:
    raw = storage.read(ERASURES)
    try:
        return json.loads(raw)["epoch"] if raw else None
    except (ValueError, KeyError, TypeError):
        return raw.hex() if raw else None  # unreadable: still a token that changes when the file does


def _read_manifest(storage: Storage) -> dict:
    where = storage.location
    raw = storage.read(MANIFEST)
    if raw is None:
        missing = not storage.remote and not Path(where).exists()
        what = "does not exist" if missing else "is not a visual-memory directory (no manifest.json)"
        raise NotAMemoryError(f"{where}: {what}; create one with `vismem create {where}`")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NotAMemoryError(f"{where}/{MANIFEST}: corrupt manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NotAMemoryError(f"{where}: manifest is not a visual-memory manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise VisualMemoryError(
            f"{where}: memory format {manifest['format_version']} is newer than this visual-memory "
            f"supports ({FORMAT_VERSION}); upgrade visual-memory"
        )
    return manifest


def _version_gone_message(storage: Storage, version, exc: Exception) -> str:
    """Why ``version`` cannot be opened: a forget erased it, or it never existed."""
    path = storage.location
    entries = []
    for line in storage.audit_lines():
        with contextlib.suppress(json.JSONDecodeError):
            entries.append(json.loads(line))
    for e in entries:
        if e.get("op") == "forget" and version in (e.get("versions_erased") or []):
            return (
                f"{path}: version {version} was erased by the forget at version {e.get('version')} "
                f"({e.get('ts')}): it held forgotten records. `vismem history {path}` lists the readable versions."
            )
    return f"{path}: cannot open version {version!r} ({str(exc).splitlines()[0][:200]}); `vismem history {path}` lists versions"


def sql_quote(value: str) -> str:
    """A Lance SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_in(column: str, values) -> str:
    """``column IN ('a', 'b', ...)`` with every value quoted."""
    return f"{column} IN ({', '.join(sql_quote(v) for v in values)})"


def vectors_from_column(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """Fixed-size-list column -> contiguous float32 array of shape (n, dim)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if len(col) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    flat = col.flatten() if col.offset else col.values
    return np.ascontiguousarray(flat.to_numpy(zero_copy_only=False).reshape(-1, dim), dtype=np.float32)
