"""The memory directory: manifest, Lance records table, audit log, writer lock.

Layout::

    MEMORY/
      manifest.json   format version, encoder spec, dim, index factory string
      records.lance/  Lance dataset, one row per record (schema below)
      audit.jsonl     one JSON line per mutation, fsync'd, append-only
      .lock           advisory writer lock (fcntl.flock); holds the writer's pid

The store is the truth; the search index is a cache rebuilt from it. The
memory's version is the Lance dataset version: each committed mutation makes
exactly one. A crash between a Lance commit and its audit line is repaired on
the next write by diffing versions (`Store.reconcile_audit`), so the audit log
always agrees with the records.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from .errors import MemoryExistsError, MemoryLockedError, NotAMemoryError, VisualMemoryError

FORMAT = "visual-memory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECORDS = "records.lance"
AUDIT = "audit.jsonl"
LOCK = ".lock"


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


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Store:
    """Durable records of one memory. Not thread-safe; one per process.

    Use `Store.create` / `Store.open`; every write goes through `writing()`.
    """

    def __init__(self, path: Path, manifest: dict, dataset, *, read_only: bool) -> None:
        self.path = path
        self.manifest = manifest
        self.dataset = dataset
        self.read_only = read_only
        self._lock_fd: Optional[int] = None

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, *, encoder: dict, index: str = "Flat") -> "Store":
        import lance

        path = Path(path)
        if (path / MANIFEST).exists():
            raise MemoryExistsError(f"{path}: a memory already exists here; open it with visual_memory.open()")
        if path.exists() and any(path.iterdir()):
            raise MemoryExistsError(f"{path}: directory is not empty; choose a new path for the memory")
        path.mkdir(parents=True, exist_ok=True)
        dim = int(encoder["dim"])
        lance.write_dataset(record_schema(dim).empty_table(), str(path / RECORDS), mode="create")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "encoder": encoder,
            "dim": dim,
            "index": index,
            "vector_dtype": "float32",
            "created_at": now_utc().isoformat(),
        }
        (path / AUDIT).touch()
        # The manifest is written last: its presence marks a complete memory.
        write_json_atomic(path / MANIFEST, manifest)
        store = cls.open(path)
        with store.writing():
            store.audit("create", encoder=encoder["name"], fingerprint=encoder.get("fingerprint"), index=index)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, *, version: Optional[int] = None, read_only: bool = False) -> "Store":
        import lance

        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            what = "does not exist" if not path.exists() else "is not a visual-memory directory (no manifest.json)"
            raise NotAMemoryError(f"{path}: {what}; create one with `vismem create {path}`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise NotAMemoryError(f"{manifest_path}: corrupt manifest ({exc})") from exc
        if manifest.get("format") != FORMAT:
            raise NotAMemoryError(f"{path}: manifest is not a visual-memory manifest")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise VisualMemoryError(
                f"{path}: memory format {manifest['format_version']} is newer than this visual-memory "
                f"supports ({FORMAT_VERSION}); upgrade visual-memory"
            )
        try:
            ds = lance.dataset(str(path / RECORDS), version=version)
        except Exception as exc:
            if version is not None:
                raise VisualMemoryError(f"{path}: cannot open version {version} ({exc})") from exc
            raise NotAMemoryError(f"{path}: records table is missing or unreadable ({exc})") from exc
        return cls(path, manifest, ds, read_only=read_only or version is not None)

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
        self.dataset = self.dataset.checkout_version(self.dataset.latest_version)
        return self.version != before

    def count(self) -> int:
        return int(self.dataset.count_rows())

    def read_columns(self, columns: list[str], *, where: Optional[str] = None) -> pa.Table:
        return self.dataset.to_table(columns=columns, filter=where)

    def iter_batches(self, columns: list[str], *, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        yield from self.dataset.to_batches(columns=columns, batch_size=batch_size)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # -- writing -------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, *, timeout: float = 0.0) -> Iterator["Store"]:
        """Hold the cross-process writer lock; move to the latest version first.

        ``timeout`` seconds to wait for another writer (0: fail at once).

        Raises
        ------
        MemoryLockedError
            Naming the process that holds the lock.
        """
        if self.read_only:
            raise VisualMemoryError(f"{self.path}: opened read-only (or at an old version); cannot write")
        if self._lock_fd is not None:  # re-entrant within one process
            yield self
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise MemoryLockedError(
                        f"{self.path}: another writer holds the lock ({holder}); "
                        "wait for it to finish or pass a longer lock timeout"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _actor().encode(), 0)
        self._lock_fd = fd
        try:
            self.refresh()
            self.reconcile_audit()
            yield self
        finally:
            self._lock_fd = None
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError("store writes must happen inside `with store.writing():`")

    def append(self, table: pa.Table) -> int:
        """Append rows (one commit). Returns the new version."""
        import lance

        self._require_lock()
        self.dataset = lance.write_dataset(table, self.dataset, mode="append")
        return self.version

    def delete(self, where: str) -> int:
        """Logically delete rows matching a Lance SQL predicate. Returns the new version."""
        self._require_lock()
        self.dataset.delete(where)
        self.dataset = self.dataset.checkout_version(self.dataset.latest_version)
        return self.version

    # -- audit log -----------------------------------------------------------------

    def audit(self, op: str, **fields: Any) -> dict:
        """Append one fsync'd line to the audit log (inside `writing()`)."""
        self._require_lock()
        entry = {"ts": now_utc().isoformat(), "op": op, "version": self.version, "actor": _actor(), **fields}
        line = json.dumps(entry, sort_keys=True, default=str)
        with open(self.path / AUDIT, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def audit_entries(self) -> list[dict]:
        path = self.path / AUDIT
        if not path.exists():
            return []
        out = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    # A torn last line from a crash mid-write: the commit it
                    # described is re-derived by reconcile_audit.
                    continue
        return out

    def reconcile_audit(self) -> list[dict]:
        """Audit versions committed without an audit line (a crash in between).

        Diffs the ids of each unaudited version against the one before, so the
        recovered line says exactly what changed. Returns the lines written.
        """
        self._require_lock()
        path = self.path / AUDIT
        # Drop a torn trailing line so the log stays one JSON object per line.
        if path.exists() and path.stat().st_size:
            data = path.read_bytes()
            if not data.endswith(b"\n"):
                keep = data[: data.rfind(b"\n") + 1]
                with open(path, "wb") as f:
                    f.write(keep)
                    f.flush()
                    os.fsync(f.fileno())
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
            with open(path, "a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            written.append(entry)
            prev_ids = ids
        return written

    def _ids_at(self, version: int, versions: set[int]) -> Optional[set[str]]:
        if version not in versions:
            return None
        ds = self.dataset.checkout_version(version)
        return set(ds.to_table(columns=["id"]).column("id").to_pylist())


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
