"""Physical erasure for `Memory.forget`: journal, rewrite, version cleanup, audit scrub, proof.

Lance deletes are logical: a deletion file masks the row while its bytes stay
in the data file and in every older version. To erase records for real::

    1. journal   MEMORY/.forget-journal.json (fsync'd): the ids, the version
                 before, the first version that could hold them
    2. delete    by row address (the predicate names no id)
    3. rewrite   every fragment holding a deleted row
                 (compaction with materialize_deletions_threshold=0)
    4. cleanup   delete every version from the first one that held any of the
                 records up to (not including) the new one, with the files only
                 they reference; tags on those versions are dropped and reported
    5. scrub     rewrite audit.jsonl with each id replaced by a salted hash
    6. verify    scan every file under MEMORY for the ids' and vectors' bytes
    7. audit     one "forget" line (the receipt, hashes only); drop the journal

A crash anywhere leaves the journal; the next writer (or `visual_memory.open`)
finishes steps 2-7, which are all idempotent. The journal holds the ids in
plain text until the erasure completes, because finishing it needs them.

Versions from before the first one that held a forgotten record stay readable:
their files never contained its bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .errors import ErasureError
from .results import ForgetReceipt
from .store import AUDIT, DERIVED_CACHE, LOCK, Store, _fsync_dir, now_utc, sql_in, sql_quote, vectors_from_column, write_json_atomic

log = logging.getLogger(__name__)

JOURNAL = ".forget-journal.json"
MIN_SCAN_BYTES = 8  # shorter ids occur by chance (in numbers, timestamps); they are counted, not scanned
_SCRUB_TMP = AUDIT + ".scrub.tmp"


def salted_hash(salt: str, record_id: str) -> str:
    """SHA-256 of salt, a NUL, and the id: what the audit log and receipts keep of a forgotten id."""
    return hashlib.sha256(f"{salt}\0{record_id}".encode()).hexdigest()


def crash_point(name: str) -> None:
    """Die like kill -9 here when VISMEM_CRASH_AT names this point (crash-safety tests)."""
    if os.environ.get("VISMEM_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def pending(path: Path) -> bool:
    return (Path(path) / JOURNAL).exists()


# -- audit log ---------------------------------------------------------------------


def _mentions(entry: dict, ids: set[str]) -> set[str]:
    found: set[str] = set()
    for value in entry.values():
        if isinstance(value, str):
            if value in ids:
                found.add(value)
        elif isinstance(value, list):
            found.update(x for x in value if isinstance(x, str) and x in ids)
    return found


def first_version_holding(entries: list[dict], ids: Iterable[str]) -> int:
    """The earliest version whose audit line names any of ``ids`` (0 if some id is never named).

    A record's bytes are written by the commit that added it, so no version
    before its first add line can hold them. An id the log does not know
    (a log from an older format) makes every old version suspect.
    """
    want = set(ids)
    seen: set[str] = set()
    first: Optional[int] = None
    for e in entries:
        hit = _mentions(e, want)
        if hit:
            seen |= hit
            v = int(e.get("version", 0))
            first = v if first is None else min(first, v)
    return first if first is not None and seen == want else 0


def scrub_audit(path: Path, ids: Iterable[str], salt: str) -> int:
    """Rewrite the audit log atomically with every forgotten id replaced by ``erased:<salted hash>``.

    Whole string values equal to an id are replaced anywhere in a line; inside
    ``where`` filters, quoted SQL literals of an id are. Returns lines changed.
    """
    ids = set(ids)
    if not ids or not path.exists():
        return 0
    token = {i: "erased:" + salted_hash(salt, i) for i in ids}
    quoted = {sql_quote(i): sql_quote(token[i]) for i in ids}

    def fix(obj, key=None):
        if isinstance(obj, str):
            if obj in token:
                return token[obj]
            if key == "where":
                for q, r in quoted.items():
                    if q in obj:
                        obj = obj.replace(q, r)
            return obj
        if isinstance(obj, list):
            return [fix(x, key) for x in obj]
        if isinstance(obj, dict):
            return {k: fix(v, k) for k, v in obj.items()}
        return obj

    out, changed = [], 0
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a torn last line from a crash; reconcile_audit re-derives what it described
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            fixed = fix(entry)
            if fixed != entry:
                changed += 1
                line = json.dumps(fixed, sort_keys=True, default=str)
            out.append(line)
    if changed:
        tmp = path.with_name(_SCRUB_TMP)
        with open(tmp, "w") as f:
            f.write("".join(x + "\n" for x in out))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    return changed


# -- verification scan -------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_LONG = 15  # a needle this long holds an 8-aligned 8-byte window wherever it starts


def _bucket(words: np.ndarray, bits: int) -> np.ndarray:
    return (words * _GOLDEN) >> np.uint64(64 - bits)


class _WindowFilter:
    """Candidate positions of many needles in a buffer, from 8-byte windows.

    Long needles (>= 15 bytes) are keyed by all 8 of their windows at
    offsets 0-7, so one pass over the buffer's 8-aligned windows finds every
    occurrence; shorter ones are keyed by their last 8 bytes and need all 8
    alignments. A bitmap of hashed keys (small enough for the CPU cache)
    rejects almost every window before any Python runs.
    """

    def __init__(self, needles: list[bytes]) -> None:
        self.keys: dict[int, list[tuple[bytes, int]]] = {}  # key -> (needle, offset of the key's window in it)
        self.short = any(len(n) < _LONG for n in needles)
        for n in needles:
            offsets = range(8) if len(n) >= _LONG else [len(n) - 8]
            for o in offsets:
                key = int(np.frombuffer(n[o : o + 8], dtype="<u8")[0])
                self.keys.setdefault(key, []).append((n, o))
        self.bits = int(min(26, max(16, np.ceil(np.log2(max(1, len(self.keys)))) + 8)))
        self.bitmap = np.zeros(1 << self.bits, dtype=bool)
        self.bitmap[_bucket(np.fromiter(self.keys, dtype=np.uint64, count=len(self.keys)), self.bits)] = True

    def find(self, buf: bytes, found: set[bytes]) -> None:
        for a in range(8) if self.short else (0,):
            count = (len(buf) - a) // 8
            if count <= 0:
                continue
            words = np.frombuffer(buf, dtype="<u8", count=count, offset=a)
            cand = np.flatnonzero(self.bitmap[_bucket(words, self.bits)])
            for j, w in zip(cand.tolist(), words[cand].tolist()):
                for n, o in self.keys.get(w, ()):
                    if a and len(n) >= _LONG:
                        continue  # long needles are all found at alignment 0
                    start = a + 8 * j - o
                    if n not in found and start >= 0 and buf[start : start + len(n)] == n:
                        found.add(n)


def scan_files(
    root: Path, needles: Iterable[bytes], *, exclude: Iterable[str] = (), chunk_bytes: int = 32 << 20
) -> tuple[list[tuple[bytes, str]], int, int]:
    """Find which needles (each >= 8 bytes) occur in which files under ``root``.

    Few needles: `bytes.find`. Many: `_WindowFilter`, so 1,000 needles cost
    about what a few do.

    Returns
    -------
    hits : list of (needle, file path relative to root)
    files_scanned, bytes_scanned : int
    """
    needles = list(dict.fromkeys(needles))
    if any(len(n) < MIN_SCAN_BYTES for n in needles):
        raise ValueError(f"needles must be at least {MIN_SCAN_BYTES} bytes")
    exclude = set(exclude)
    files = sorted(p for p in root.rglob("*") if p.is_file() and str(p.relative_to(root)) not in exclude)
    hits: list[tuple[bytes, str]] = []
    if not needles:
        return hits, len(files), 0
    overlap = max(len(n) for n in needles) - 1
    window = _WindowFilter(needles) if len(needles) > 16 else None
    total = 0
    for path in files:
        rel = str(path.relative_to(root))
        found: set[bytes] = set()
        tail = b""
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk_bytes)
                if not block:
                    break
                total += len(block)
                # Keep 8-alignment relative to the file across chunks: pad the carried tail to a multiple of 8.
                keep = overlap + (-overlap) % 8 if overlap else 0
                buf = tail + block
                if window is None:
                    found.update(n for n in needles if n not in found and n in buf)
                else:
                    window.find(buf, found)
                tail = buf[-keep:] if keep and len(buf) >= keep else (buf if keep else b"")
        hits.extend((n, rel) for n in found)
    return hits, len(files), total


def verify(
    root: Path,
    ids: list[str],
    vectors: Optional[dict[str, np.ndarray]],
    *,
    salt: str,
    live: Optional[Callable[[], Iterable[str]]] = None,
) -> dict:
    """Scan every file under ``root`` (but the journal and lock) for the ids' and vectors' bytes.

    An id found only as part of a string the memory still holds (``img1``
    inside ``img10``) is reported under ``shadowed``, not as a failure.
    """
    needles: dict[bytes, tuple[str, str]] = {}
    short = 0
    for rid in ids:
        b = rid.encode()
        if len(b) < MIN_SCAN_BYTES:
            short += 1
        else:
            needles[b] = ("id", rid)
    for rid, vec in (vectors or {}).items():
        needles[np.ascontiguousarray(vec, dtype=np.float32).tobytes()] = ("vector", rid)
    hits, n_files, n_bytes = scan_files(root, needles, exclude={JOURNAL, LOCK})
    found, shadowed = [], []
    live_strings = None
    for needle, rel in hits:
        kind, rid = needles[needle]
        item = {"file": rel, "kind": kind, "id_hash": salted_hash(salt, rid)}
        if kind == "id" and live is not None:
            if live_strings is None:
                live_strings = list(live())
            if any(rid in s for s in live_strings):
                shadowed.append(item)
                continue
        found.append(item)
    return {
        "ok": not found,
        "files_scanned": n_files,
        "bytes_scanned": n_bytes,
        "ids_scanned": sum(1 for k, _ in needles.values() if k == "id"),
        "vectors_scanned": sum(1 for k, _ in needles.values() if k == "vector"),
        "ids_too_short": short,
        "found": found,
        "shadowed": shadowed,
    }


# -- the erasure -------------------------------------------------------------------


def begin(store: Store, ids: list[str], *, selector: list[str]) -> dict:
    """Write the journal (under the writer lock, before anything changes)."""
    store.salt()  # made now, so a crash cannot leave a journal without a salt
    journal = {
        "token": uuid.uuid4().hex,
        "ids": list(ids),
        "version_before": store.version,
        "first_version": first_version_holding(store.audit_entries(), ids),
        "started_at": now_utc().isoformat(),
        "selector": selector,
    }
    write_json_atomic(store.path / JOURNAL, journal)
    return journal


def vectors_at(store: Store, ids: list[str], version: int) -> dict[str, np.ndarray]:
    """Vectors of ``ids`` as stored at ``version`` (empty if that version is gone)."""
    if not ids:
        return {}
    try:
        table = store.dataset.checkout_version(int(version)).to_table(columns=["id", "vector"], filter=sql_in("id", ids))
    except Exception:  # the version was cleaned up: its bytes are gone with it
        return {}
    vecs = vectors_from_column(table.column("vector"), store.dim)
    return dict(zip(table.column("id").to_pylist(), vecs))


def run(
    store: Store,
    journal: dict,
    *,
    addresses: Optional[np.ndarray] = None,
    vectors: Optional[dict[str, np.ndarray]] = None,
    verify_scan: bool = True,
    live: Optional[Callable[[], Iterable[str]]] = None,
    on_deleted: Optional[Callable[[], None]] = None,
    recovered: bool = False,
) -> ForgetReceipt:
    """Steps 2-7 (see the module docstring). ``addresses`` None: find the ids' rows by query (recovery)."""
    ids = list(journal["ids"])
    if addresses is None:
        table = store.dataset.to_table(columns=["id"], with_row_address=True, filter=sql_in("id", ids)) if ids else None
        addresses = table.column("_rowaddr").to_numpy() if table is not None else np.zeros(0, np.uint64)
    if len(addresses):
        store.delete_rows(addresses)
    if on_deleted is not None:
        on_deleted()
    crash_point("forget:deleted")
    store.compact(materialize_deletions_threshold=0.0)
    crash_point("forget:compacted")
    latest = store.version
    doomed = [v for v in store.version_numbers() if v >= int(journal["first_version"]) and v != latest]
    tags_dropped = [name for name, v in store.tags().items() if v in doomed]
    for name in tags_dropped:
        store.delete_tag(name)
    if doomed:
        store.cleanup_versions(doomed)
    crash_point("forget:cleaned")
    salt = store.salt()
    stale = store.path / _SCRUB_TMP
    stale.unlink(missing_ok=True)
    scrub_audit(store.path / AUDIT, ids, salt)
    store._audit_state = None  # the log was rewritten: the next reconcile must re-read it
    # Derived caches (self-neighbour rows and similarities) describe the forgotten
    # records too; they are rebuilt on demand, so drop them rather than patch them.
    shutil.rmtree(store.path / DERIVED_CACHE, ignore_errors=True)
    crash_point("forget:scrubbed")
    if verify_scan:
        verification = verify(store.path, ids, vectors, salt=salt, live=live)
    else:
        verification = {"ok": None, "skipped": True}
    receipt = ForgetReceipt(
        erased=len(ids),
        id_hashes=sorted(salted_hash(salt, i) for i in ids),
        started_at=journal["started_at"],
        finished_at=now_utc().isoformat(),
        version_before=int(journal["version_before"]),
        version_after=store.version,
        versions_erased=doomed,
        tags_dropped=tags_dropped,
        verification=verification,
        recovered=recovered,
    )
    entries = store.audit_entries()
    if not (entries and entries[-1].get("token") == journal["token"]):
        fields = receipt.to_dict()
        fields.pop("version_after")
        store.audit("forget", n=len(ids), token=journal["token"], selector=journal.get("selector"), **fields)
    crash_point("forget:audited")
    (store.path / JOURNAL).unlink(missing_ok=True)
    _fsync_dir(store.path)
    if verification.get("ok") is False:
        raise ErasureError(
            f"{store.path}: forget verification found bytes of {len(verification['found'])} forgotten item(s) "
            f"in {sorted({h['file'] for h in verification['found']})}; the records no longer vote. "
            "Run `vismem optimize` and forget again, and report this as a bug.",
            receipt,
        )
    return receipt


def finish_if_pending(store: Store) -> Optional[ForgetReceipt]:
    """`finish_pending` if a journal is there (the ``on_lock`` hook of `Store.writing`)."""
    return finish_pending(store) if pending(store.path) else None


def finish_pending(store: Store) -> Optional[ForgetReceipt]:
    """Complete an interrupted forget (inside `Store.writing`). A failed verification is logged, not raised."""
    journal = json.loads((store.path / JOURNAL).read_text())
    log.warning("%s: completing a forget of %d record(s) interrupted at version %s",
                store.path, len(journal["ids"]), journal["version_before"])
    vectors = vectors_at(store, journal["ids"], journal["version_before"])

    def live() -> list[str]:
        return store.dataset.to_table(columns=["id"]).column("id").to_pylist()

    try:
        return run(store, journal, vectors=vectors, live=live, recovered=True)
    except ErasureError as exc:
        log.error("%s", exc)
        return exc.receipt
