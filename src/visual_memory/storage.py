"""Where a memory's files live: a local directory or an object-store prefix.

`Store` and `erasure` reach the memory's own files (manifest, audit log,
journal, writer lock) only through the small interface below, and hand
`Storage.url` plus `Storage.lance_options` to Lance for the records table, so
one code path serves both kinds of location:

========================  ==============================  ====================================
location                  backend                         writer lock
========================  ==============================  ====================================
``/dir``, ``file:///dir``  `LocalStorage` (files, fsync)   ``.lock``: ``fcntl.flock``
``s3://bucket/prefix``     `ObjectStorage` (``obstore``)   ``_lease.json``: a lease (below)
``gs://``, ``az://``       `ObjectStorage` (``obstore``)   ``_lease.json``
========================  ==============================  ====================================

Credentials and endpoints come from the usual environment (``AWS_*``,
``GOOGLE_*``, ``AZURE_*``, read by both Lance and obstore, which share Rust's
``object_store``) or from ``storage_options``, in Lance's key format (e.g.
``{"aws_endpoint": "http://127.0.0.1:9000", "allow_http": "true"}``); the
same dict goes to Lance unchanged.

Object storage has no append and no advisory lock, so:

* **Audit log**: one object per entry, ``audit/<seq>.json`` (12 digits),
  written with a conditional PUT (``If-None-Match: *``). An append is one
  small PUT whatever the log's length (rewriting one ``audit.jsonl`` object
  per mutation would cost the whole log each time), an entry can never be
  torn, and two writers can never both write entry ``<seq>`` (the loser's PUT
  fails: a fence behind the lease). Reading lists ``audit/`` and GETs the
  entries (in parallel; unchanged ETags are not fetched twice).
* **Writer lock**: a lease object ``_lease.json`` (owner, token, ttl,
  heartbeat), taken with a conditional PUT (create if absent, or replace the
  exact ETag that was seen), renewed every ``ttl / 3`` by a heartbeat thread,
  released by a conditional overwrite that marks it free. Another process
  takes it over only when it is released, when its owner is a dead pid on
  the same host, or when its ETag has not changed for ``ttl`` seconds of the
  waiter's own clock (no clock skew enters). What it guarantees: at most one
  holder at a time as long as a holder that stops renewing (paused, cut off)
  stops writing within ``ttl``; the holder checks before every write and
  raises once its lease is lost, and its next audit entry would be refused.
  What it cannot: fence a Lance commit already in flight when a holder
  stalls past ``ttl`` (Lance's own commit protocol still keeps the table
  consistent: concurrent commits are serialised by conditional PUTs).
* **Erasure**: deleting an object removes its current version only. A bucket
  with versioning keeps every older object version (and a provider's soft
  delete, backups or replicas keep copies): `ObjectStorage.versioning` reports
  what a PUT tells (S3 returns a version id only when versioning is on), and
  the forget receipt carries it.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import MemoryLockedError, VisualMemoryError

AUDIT = "audit.jsonl"  # local: one fsync'd JSON line per mutation
AUDIT_PREFIX = "audit/"  # object storage: one object per entry
LOCK = ".lock"
LEASE = "_lease.json"
REMOTE_SCHEMES = ("s3", "gs", "az", "abfs", "abfss")
LEASE_TTL = float(os.environ.get("VISMEM_LEASE_TTL", "30"))


def actor() -> str:
    """``user@host:pid``: who holds a lock or wrote an audit line."""
    import getpass

    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_storage(location, *, storage_options: Optional[dict] = None) -> "Storage":
    """The storage for a memory location: a path, ``file://``, ``s3://``, ``gs://`` or ``az://`` URI.

    Raises
    ------
    ValueError
        For an unknown URI scheme (naming the supported ones).
    """
    text = os.fspath(location)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("", "file"):
        if storage_options:
            raise ValueError(f"{text}: storage_options apply to object storage (s3://, gs://, az://), not a local path")
        return LocalStorage(Path(text[len("file://"):] if scheme else text))
    if scheme in REMOTE_SCHEMES:
        return ObjectStorage(text, storage_options=storage_options)
    raise ValueError(f"{text}: unsupported location scheme {scheme!r}; use a local path, file://, "
                     + ", ".join(f"{s}://" for s in REMOTE_SCHEMES[:3]))


class Storage(abc.ABC):
    """What `Store` needs of a location. Names are relative, ``/``-separated."""

    location: Path | str  # what users see (`Memory.path`)
    remote: bool
    lance_options: Optional[dict]

    @abc.abstractmethod
    def url(self, name: str) -> str:
        """URI (or path) of ``name`` for Lance."""

    # Small whole files: manifest, journal.
    @abc.abstractmethod
    def read(self, name: str) -> Optional[bytes]:
        """Contents of ``name``, or None if it does not exist."""

    @abc.abstractmethod
    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` atomically and durably (readers see old or new, never half)."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name`` if present."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every file under ``prefix``; returns how many."""

    def exists(self, name: str) -> bool:
        return self.read(name) is not None

    @abc.abstractmethod
    def walk(self) -> list[tuple[str, int]]:
        """(name, size) of every file under the location, sorted by name."""

    @abc.abstractmethod
    def read_chunks(self, name: str, chunk_bytes: int) -> Iterator[bytes]:
        """The bytes of ``name`` in pieces of at most ``chunk_bytes`` (the erasure scan reads files this way)."""

    # Audit log: a sequence of JSON lines.
    @abc.abstractmethod
    def audit_append(self, line: str) -> None:
        """Append one entry durably (it is on storage when this returns)."""

    @abc.abstractmethod
    def audit_lines(self) -> list[str]:
        """Complete entries, oldest first (a torn last line is left out)."""

    @abc.abstractmethod
    def audit_rewrite(self, fix: Callable[[str], str]) -> int:
        """Replace each entry by ``fix(entry)``, durably; returns entries changed."""

    def audit_repair(self) -> int:
        """Drop a torn trailing entry (a crash mid-append); returns bytes dropped."""
        return 0

    @abc.abstractmethod
    def audit_state(self):
        """A cheap token that changes whenever the log changes."""

    # Writer lock.
    @abc.abstractmethod
    def lock(self, *, timeout: float) -> contextlib.AbstractContextManager:
        """Hold the cross-process writer lock; `MemoryLockedError` (naming the holder) after ``timeout`` s."""

    def lock_lost(self) -> Optional[str]:
        """Why the held lock is no longer ours (a lease that expired), else None."""
        return None

    @abc.abstractmethod
    def versioning(self) -> dict:
        """What the location keeps after a delete (for the forget receipt)."""


# -- local directory ------------------------------------------------------------------


class LocalStorage(Storage):
    remote = False
    lance_options = None

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = self.root
        self._lock_fd: Optional[int] = None

    def url(self, name: str) -> str:
        return str(self.root / name)

    def read(self, name: str) -> Optional[bytes]:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        import shutil

        path = self.root / prefix
        n = sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
        shutil.rmtree(path, ignore_errors=True)
        return n

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def walk(self) -> list[tuple[str, int]]:
        out = []
        for p in self.root.rglob("*") if self.root.is_dir() else ():
            try:
                if p.is_file():
                    out.append((p.relative_to(self.root).as_posix(), p.stat().st_size))
            except FileNotFoundError:  # deleted meanwhile (another process's cleanup)
                continue
        return sorted(out)

    def read_chunks(self, name: str, chunk_bytes: int) -> Iterator[bytes]:
        with open(self.root / name, "rb") as f:
            while block := f.read(chunk_bytes):
                yield block

    def audit_append(self, line: str) -> None:
        with open(self.root / AUDIT, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def audit_lines(self) -> list[str]:
        try:
            data = (self.root / AUDIT).read_text()
        except FileNotFoundError:
            return []
        lines = data.split("\n")
        return [x for x in lines[:-1] if x.strip()]  # the last piece is "" or a torn line

    def audit_rewrite(self, fix: Callable[[str], str]) -> int:
        lines = self.audit_lines()
        out = [fix(x) for x in lines]
        changed = sum(a != b for a, b in zip(lines, out))
        if changed:  # a new file renamed over the old: a crash leaves one or the other
            self.write(AUDIT, "".join(x + "\n" for x in out).encode())
        return changed

    def audit_repair(self) -> int:
        """Cut a torn last line off in place (``os.truncate``): the complete lines are never rewritten."""
        from .erasure import crash_point

        path = self.root / AUDIT
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0
        if not size:
            return 0
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return 0
            # Find the last newline, reading backwards in blocks (a torn line is short).
            end, keep = size, 0
            while end > 0:
                start = max(0, end - 65536)
                f.seek(start)
                cut = f.read(end - start).rfind(b"\n")
                if cut >= 0:
                    keep = start + cut + 1
                    break
                end = start
        crash_point("audit:repair")
        os.truncate(path, keep)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return size - keep

    def audit_state(self):
        try:
            return (self.root / AUDIT).stat().st_size
        except FileNotFoundError:
            return 0

    @contextlib.contextmanager
    def lock(self, *, timeout: float):
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
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
                        f"{self.root}: another writer holds the lock ({holder}); "
                        "wait for it to finish or pass a longer lock timeout"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, actor().encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def versioning(self) -> dict:
        return {"kind": "local", "keeps_deleted_versions": False}


# -- object storage -------------------------------------------------------------------

# object_store keys that obstore takes as client options, not store config.
_CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "connect_timeout", "timeout", "pool_idle_timeout",
                "pool_max_idle_per_host", "proxy_url", "proxy_ca_certificate", "proxy_excludes", "user_agent",
                "http1_only", "http2_only", "http2_keep_alive_interval", "http2_keep_alive_timeout",
                "http2_keep_alive_while_idle", "default_content_type"}
_PREFIXES = ("aws_", "google_", "azure_")


def _obstore_options(options: dict) -> tuple[dict, dict]:
    """Lance-style storage options -> obstore (config, client_options)."""
    config, client = {}, {}
    for key, value in options.items():
        bare = key.lower()
        for p in _PREFIXES:
            if bare.startswith(p) and bare[len(p):] in _CLIENT_KEYS:
                bare = bare[len(p):]
        if bare in _CLIENT_KEYS:
            client[bare] = value.lower() in ("1", "true", "yes") if isinstance(value, str) and value.lower() in (
                "1", "0", "true", "false", "yes", "no") else value
        else:
            config[key] = value
    return config, client


class ObjectStorage(Storage):
    remote = True

    def __init__(self, uri: str, *, storage_options: Optional[dict] = None) -> None:
        try:
            from obstore.store import from_url
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise VisualMemoryError(f"{uri}: object storage needs obstore: pip install 'visual-memory[cloud]'") from exc
        self.uri = uri.rstrip("/")
        self.location = self.uri
        self.lance_options = dict(storage_options) if storage_options else None
        config, client = _obstore_options(storage_options or {})
        try:
            self._store = from_url(self.uri, config=config or None, client_options=client or None)
        except BaseException as exc:  # obstore reports bad options as a Rust panic (a BaseException)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise ValueError(f"{self.uri}: cannot configure object storage ({exc}); check storage_options") from None
        self._audit_cache: dict[str, tuple[str, str]] = {}  # key -> (etag, text)
        self._lease: Optional[_Lease] = None
        self._next_seq: Optional[int] = None  # the next audit entry's number while holding the lease
        self._versioned: Optional[bool] = None

    def url(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def read(self, name: str) -> Optional[bytes]:
        import obstore as obs
        from obstore.exceptions import NotFoundError

        try:
            return bytes(obs.get(self._store, name).bytes())
        except (NotFoundError, FileNotFoundError):
            return None

    def write(self, name: str, data: bytes) -> None:  # a PUT is atomic
        import obstore as obs

        self._note_version(obs.put(self._store, name, data))

    def delete(self, name: str) -> None:
        import obstore as obs
        from obstore.exceptions import NotFoundError

        try:
            obs.delete(self._store, name)
        except (NotFoundError, FileNotFoundError):
            pass

    def _list(self, prefix: Optional[str] = None) -> list[dict]:
        import obstore as obs

        return [meta for batch in obs.list(self._store, prefix=prefix) for meta in batch]

    def delete_prefix(self, prefix: str) -> int:
        import obstore as obs

        paths = [m["path"] for m in self._list(prefix.rstrip("/") + "/")]
        if paths:
            obs.delete(self._store, paths)
        return len(paths)

    def walk(self) -> list[tuple[str, int]]:
        return sorted((m["path"], int(m["size"])) for m in self._list())

    def read_chunks(self, name: str, chunk_bytes: int) -> Iterator[bytes]:
        import obstore as obs

        for chunk in obs.get(self._store, name).stream(min_chunk_size=chunk_bytes):
            yield bytes(chunk)

    def _audit_keys(self) -> list[dict]:
        return sorted(self._list(AUDIT_PREFIX), key=lambda m: m["path"])

    def audit_append(self, line: str) -> None:
        import obstore as obs
        from obstore.exceptions import AlreadyExistsError

        # Under the lease the sequence is this writer's own count from when it took the
        # lease, so an entry written by anyone else since makes this PUT fail.
        seq = self._next_seq if self._next_seq is not None else self._scan_next_seq()
        key = f"{AUDIT_PREFIX}{seq:012d}.json"
        try:
            result = obs.put(self._store, key, line.encode(), mode="create")
        except AlreadyExistsError:
            raise MemoryLockedError(f"{self.uri}: audit entry {key} was written by another writer meanwhile; "
                                    "this process's lease was lost (it paused longer than the lease ttl)") from None
        self._note_version(result)
        self._audit_cache[key] = (result["e_tag"], line)
        if self._next_seq is not None:
            self._next_seq = seq + 1

    def _scan_next_seq(self) -> int:
        keys = self._audit_keys()
        return int(keys[-1]["path"][len(AUDIT_PREFIX):].split(".")[0]) + 1 if keys else 0

    def audit_lines(self) -> list[str]:
        import obstore as obs

        metas = self._audit_keys()
        stale = [m for m in metas if self._audit_cache.get(m["path"], ("",))[0] != m["e_tag"]]

        def fetch(meta):
            res = obs.get(self._store, meta["path"])
            return meta["path"], res.meta["e_tag"], bytes(res.bytes()).decode()

        if stale:
            with ThreadPoolExecutor(max_workers=min(16, len(stale))) as pool:
                for key, etag, text in pool.map(fetch, stale):
                    self._audit_cache[key] = (etag, text)
        live = {m["path"] for m in metas}
        for key in [k for k in self._audit_cache if k not in live]:
            del self._audit_cache[key]
        return [self._audit_cache[m["path"]][1].strip() for m in metas if self._audit_cache[m["path"]][1].strip()]

    def audit_rewrite(self, fix: Callable[[str], str]) -> int:
        import obstore as obs

        self.audit_lines()
        changed = 0
        for key, (_, text) in sorted(self._audit_cache.items()):
            new = fix(text.strip())
            if new != text.strip():
                result = obs.put(self._store, key, new.encode())
                self._audit_cache[key] = (result["e_tag"], new)
                changed += 1
        return changed

    def audit_state(self):
        metas = self._audit_keys()
        return (len(metas), metas[-1]["path"], metas[-1]["e_tag"]) if metas else (0,)

    @contextlib.contextmanager
    def lock(self, *, timeout: float):
        lease = _Lease(self, ttl=LEASE_TTL)
        lease.acquire(timeout)
        self._lease = lease
        try:
            self._next_seq = self._scan_next_seq()
            yield
        finally:
            self._lease, self._next_seq = None, None
            lease.release()

    def lock_lost(self) -> Optional[str]:
        return self._lease.lost() if self._lease is not None else None

    def _note_version(self, result: dict) -> None:
        self._versioned = result.get("version") is not None

    def versioning(self) -> dict:
        if self._versioned is None:  # no PUT yet in this process: the lease write tells
            self.write(f"{LEASE}.probe", b"{}")
            self.delete(f"{LEASE}.probe")
        scheme = self.uri.split("://", 1)[0]
        versioned = bool(self._versioned) if scheme == "s3" else None
        note = ("deleted objects keep their older versions in this bucket (versioning is on): expire noncurrent "
                "versions with a lifecycle rule, or delete them by version id, to erase them"
                if versioned else
                "S3 returned no version id, so versioning is off now; versions kept while it was once on, "
                "soft delete, backups and replicas are beyond this scan" if versioned is False else
                "this provider may keep deleted objects (object versioning, soft delete, backups); "
                "check the bucket's settings")
        return {"kind": scheme, "bucket_versioning": {True: "enabled", False: "off", None: "unknown"}[versioned],
                "keeps_deleted_versions": versioned, "note": note}


class _Lease:
    """One holding of ``_lease.json`` (see the module docstring)."""

    def __init__(self, storage: ObjectStorage, *, ttl: float) -> None:
        self.storage, self.ttl = storage, float(ttl)
        self.token = uuid.uuid4().hex
        self.etag: Optional[str] = None
        self.beat = 0
        self.renewed = 0.0  # monotonic time of the last successful write
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._mutex = threading.Lock()

    def _body(self, *, released: bool = False) -> bytes:
        return json.dumps({"owner": actor(), "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "ttl_s": self.ttl, "beat": self.beat, "released": released,
                           "written_at": time.time()}).encode()

    def acquire(self, timeout: float) -> None:
        import obstore as obs
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        store = self.storage._store
        deadline = time.monotonic() + max(0.0, timeout)
        seen: dict[str, float] = {}  # etag -> when this process first saw it
        while True:
            try:
                result = obs.put(store, LEASE, self._body(), mode="create")
                break
            except AlreadyExistsError:
                pass
            try:
                cur = obs.get(store, LEASE)
                etag, held = cur.meta["e_tag"], json.loads(bytes(cur.bytes()) or b"{}")
            except (NotFoundError, FileNotFoundError):
                continue
            except json.JSONDecodeError:
                held = {"released": True}  # not ours to read: treat as free, the CAS below still arbitrates
            first = seen.setdefault(etag, time.monotonic())
            free = held.get("released") or _dead_local_pid(held) or time.monotonic() - first > float(held.get("ttl_s", self.ttl))
            if free:
                try:
                    result = obs.put(store, LEASE, self._body(), mode={"e_tag": etag})
                    break
                except (PreconditionError, AlreadyExistsError, NotFoundError, FileNotFoundError):
                    continue  # someone else moved it first
            if time.monotonic() >= deadline:
                raise MemoryLockedError(
                    f"{self.storage.uri}: another writer holds the lease ({held.get('owner', 'unknown')}, "
                    f"renewed every {float(held.get('ttl_s', self.ttl)) / 3:.0f} s); wait for it to finish or pass a "
                    "longer lock timeout (a lease whose owner died is taken over after its ttl)"
                ) from None
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())) or 0.05)
        self.storage._note_version(result)
        self.etag, self.renewed = result["e_tag"], time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat, name="vismem-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        import obstore as obs

        while not self._stop.wait(self.ttl / 3):
            with self._mutex:
                if self._lost or self._stop.is_set():
                    return
                self.beat += 1
                try:
                    result = obs.put(self.storage._store, LEASE, self._body(), mode={"e_tag": self.etag})
                    self.etag, self.renewed = result["e_tag"], time.monotonic()
                except Exception as exc:  # taken over (precondition failed), or the store is unreachable: retry
                    from obstore.exceptions import PreconditionError

                    if isinstance(exc, PreconditionError) or time.monotonic() - self.renewed > self.ttl / 2:
                        self._lost = f"the lease could not be renewed ({type(exc).__name__})"

    def lost(self) -> Optional[str]:
        if self._lost is None and time.monotonic() - self.renewed > self.ttl:
            self._lost = f"the lease was not renewed for over {self.ttl:.0f} s"
        return self._lost

    def release(self) -> None:
        import obstore as obs

        self._stop.set()
        with self._mutex:
            if self._thread is not None:
                self._thread.join(timeout=0)
            if self._lost:
                return
            try:  # a conditional overwrite: never frees a lease someone else took over
                obs.put(self.storage._store, LEASE, self._body(released=True), mode={"e_tag": self.etag})
            except Exception:
                pass


def _dead_local_pid(held: dict) -> bool:
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
