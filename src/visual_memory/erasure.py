"""Physical erasure for `Memory.forget`: journal, rewrite, version cleanup, audit scrub, proof.

Lance deletes are logical: a deletion file masks the row while its bytes stay
in the data file and in every older version. To erase records for real::

    1. journal   MEMORY/.forget-journal.json: the ids, their labels and sources,
                 the version before, the first version that could hold them
    2. delete    by row address (the predicate names no id)
    3. rewrite   every fragment holding a deleted row
                 (compaction with materialize_deletions_threshold=0)
    4. cleanup   delete every version from the first one that held any of the
                 records up to (not including) the new one, with the files only
                 they reference; tags on those versions are dropped and reported
    5. scrub     rewrite the audit log (see "What the audit log keeps" below);
                 drop derived caches; purge the user's embedding cache
    6. verify    scan every file (object) of the memory and of the embedding
                 cache for the ids', vectors', labels' and sources' bytes
    7. audit     one "forget" line (the receipt, hashes only); drop the journal

A crash anywhere leaves the journal; the next writer (or `visual_memory.open`)
finishes steps 2-7, which are all idempotent. The journal holds the ids,
labels and sources in plain text until the erasure completes, because
finishing it needs them.

Versions from before the first one that held a forgotten record stay readable:
their files never contained its bytes.

What the audit log keeps
------------------------
An audit line stays useful after a forget: its ``op``, ``version``, ``ts``,
``actor``, counts (``n``, ``removed``, list lengths) and the ids of records
that stay, in clear; each forgotten id becomes ``erased:<salted SHA-256>`` (so
the memory's owner, who holds the salt, can still check whether an id was
forgotten, and when it was added). Free text is personal data of a forgotten
record when it describes it, so:

* in a line that names a forgotten id, every label, source and ``where``
  value (``label``, ``labels``, ``old_labels``, ``source``, ``selector``) is
  replaced by ``"erased"``: a label shared with live records is no secret by
  itself, but beside the record's (hashed) id it tells that record's label;
* in every other line, a label or source that no live record holds (it
  belonged only to forgotten records) is replaced by ``"erased"``, and so is
  its quoted literal inside a ``where`` filter.

Labels and sources are dropped, not hashed: a hash of a short label is
reversed by trying the label vocabulary.

The embedding cache
-------------------
`visual_memory.cache` keys vectors by the image's SHA-256, a record's default
id, in the cache of the user running the forget (``$VISMEM_CACHE_DIR`` or
``~/.cache/visual-memory``). Every cached vector under a forgotten id is
purged (under every encoder), and the cache's files are scanned with the
memory's. Caches of other users or machines are out of reach; the receipt
names the folder it purged.

Object storage
--------------
The same steps run on an ``s3://`` (``gs://``, ``az://``) memory; deletes
remove an object's current version, and the scan reads every object under the
prefix. A bucket with versioning keeps the older versions of every deleted or
rewritten object: the receipt's ``verification.storage`` says what the bucket
reported (see `visual_memory.storage`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .errors import ErasureError
from .results import ForgetReceipt
from .storage import LEASE, LOCK, LocalStorage, Storage
from .store import DERIVED_CACHE, SAVED_INDEX, Store, now_utc, sql_in, sql_quote, vectors_from_column

log = logging.getLogger(__name__)

JOURNAL = ".forget-journal.json"
MIN_SCAN_BYTES = 8  # shorter strings occur by chance (in numbers, timestamps); they are counted, not scanned
ERASED = "erased"
_TEXT_KEYS = {"label", "labels", "old_labels", "source", "sources", "where"}
_SCAN_EXCLUDE = {JOURNAL, LOCK, LEASE}


def salted_hash(salt: str, record_id: str) -> str:
    """SHA-256 of salt, a NUL, and the id: what the audit log and receipts keep of a forgotten id."""
    return hashlib.sha256(f"{salt}\0{record_id}".encode()).hexdigest()


def crash_point(name: str) -> None:
    """Die like kill -9 here when VISMEM_CRASH_AT names this point (crash-safety tests)."""
    if os.environ.get("VISMEM_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def pending(storage: Storage) -> bool:
    return storage.exists(JOURNAL)


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


def scrub_entry(entry: dict, token: dict[str, str], text: set[str]) -> dict:
    """One audit entry as it is kept after a forget (module docstring: "What the audit log keeps").

    ``token`` maps each forgotten id to its ``erased:<hash>``; ``text`` holds
    the labels and sources that no live record has.
    """
    names_forgotten = bool(_mentions(entry, set(token)))
    quoted = {sql_quote(i): sql_quote(t) for i, t in token.items()} | {sql_quote(t): sql_quote(ERASED) for t in text}

    def fix(obj, key=None):
        if isinstance(obj, str):
            if obj in token:
                return token[obj]
            if key in _TEXT_KEYS:
                if names_forgotten or obj in text:
                    return ERASED
                if key == "where":
                    for q, r in quoted.items():
                        obj = obj.replace(q, r)
            return obj
        if isinstance(obj, list):
            return [fix(x, key) for x in obj]
        if isinstance(obj, dict):
            return {k: fix(v, k if k in _TEXT_KEYS or key not in _TEXT_KEYS else key) for k, v in obj.items()}
        return obj

    return fix(entry)


def scrub_audit(storage: Storage, ids: Iterable[str], salt: str, *, text: Iterable[str] = ()) -> int:
    """Rewrite the audit log with forgotten ids hashed and their labels and sources erased.

    Returns entries changed. Locally the log is replaced by a new file renamed
    over it (a crash leaves the old or the new log, whole); on object storage
    each changed entry object is rewritten.
    """
    token = {i: "erased:" + salted_hash(salt, i) for i in ids}
    text = set(text)
    if not token and not text:
        return 0

    def fix(line: str) -> str:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return line
        fixed = scrub_entry(entry, token, text)
        return line if fixed == entry else json.dumps(fixed, sort_keys=True, default=str)

    return storage.audit_rewrite(fix)


# -- verification scan -------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class _WindowFilter:
    """Every occurrence of many needles in a buffer, in one vectorised pass per word width.

    A needle of length L >= 2w - 1 holds a ``w``-byte window at each of the
    ``w`` residues of its start modulo ``w``, so whatever the needle's
    alignment, one of those windows lands on an aligned word of the buffer:
    scanning the buffer's aligned ``w``-byte words finds it. Needles of 15
    bytes or more use 8-byte words; shorter ones (8-14 bytes) 4-byte words.
    Per needle and residue the *rarest* window is the key (fewest zero bytes,
    fewest needles sharing it): real embeddings are 40% exact zeros (ReLU),
    and keying a vector by a zero word made every zero word of the files a
    candidate. A bitmap of hashed keys (small enough for the CPU cache)
    rejects almost every word in numpy; each surviving word is checked with
    one set lookup per (offset, length) group.
    """

    def __init__(self, needles: list[bytes]) -> None:
        self.passes = []
        for width, dtype, fits in ((8, "<u8", lambda n: len(n) >= 15), (4, "<u4", lambda n: 8 <= len(n) < 15)):
            group = [n for n in needles if fits(n)]
            if not group:
                continue
            # Candidate windows: the first 64 positions of each residue, for all needles of one length at once.
            from numpy.lib.stride_tricks import sliding_window_view

            by_len: dict[int, list[bytes]] = {}
            for n in group:
                by_len.setdefault(len(n), []).append(n)
            cands = []
            for length, same in by_len.items():
                arr = np.frombuffer(b"".join(same), dtype=np.uint8).reshape(len(same), length)
                win = sliding_window_view(arr, width, axis=1)[:, : 64 * width]  # (needles, positions, width)
                words = np.ascontiguousarray(win).view(dtype)[..., 0]
                cands.append((same, words, (win == 0).sum(axis=2)))
            uniq, counts = np.unique(np.concatenate([w.ravel() for _, w, _ in cands]), return_counts=True)
            keys: dict[int, dict[tuple[int, int], set[bytes]]] = {}
            for same, words, zeros in cands:
                # Fewest zero bytes first, then fewest needles sharing the window.
                score = zeros.astype(np.int64) * (1 << 32) + counts[np.searchsorted(uniq, words)]
                for r in range(width):
                    offs = np.arange(r, words.shape[1], width)
                    best = offs[np.argmin(score[:, offs], axis=1)]
                    for n, o, key in zip(same, best.tolist(), words[np.arange(len(same)), best].tolist()):
                        keys.setdefault(int(key), {}).setdefault((o, len(n)), set()).add(n)
            bits = int(min(26, max(16, np.ceil(np.log2(max(1, len(keys)))) + 8)))
            bitmap = np.zeros(1 << bits, dtype=bool)
            bitmap[self._bucket(np.fromiter(keys, dtype=np.uint64, count=len(keys)), bits)] = True
            self.passes.append((width, dtype, bits, bitmap, keys))

    @staticmethod
    def _bucket(words: np.ndarray, bits: int) -> np.ndarray:
        return (words.astype(np.uint64, copy=False) * _GOLDEN) >> np.uint64(64 - bits)

    def find(self, buf: bytes, found: set[bytes]) -> None:
        """Add to ``found`` every needle occurring in ``buf`` (``len(buf)`` need not be aligned)."""
        for width, dtype, bits, bitmap, keys in self.passes:
            count = len(buf) // width
            if not count:
                continue
            words = np.frombuffer(buf, dtype=dtype, count=count)
            cand = np.flatnonzero(bitmap[self._bucket(words, bits)])
            for j, w in zip(cand.tolist(), words[cand].tolist()):
                groups = keys.get(w)
                if groups is None:
                    continue
                for (o, length), group in groups.items():
                    start = width * j - o
                    if start >= 0:
                        piece = buf[start : start + length]
                        if piece in group:
                            found.add(piece)


def scan(
    sources: list[tuple],
    needles: Iterable[bytes],
    *,
    exclude: Iterable[str] = (),
    chunk_bytes: int = 32 << 20,
    progress: bool | str | None = None,
) -> tuple[list[tuple[bytes, str]], int, int]:
    """Find which needles (each >= 8 bytes) occur in which files of ``sources``.

    ``sources`` are (label, storage) or (label, storage, names) tuples; every
    file (object) of each (or the ``names`` given) is read once, in chunks,
    and searched for all needles at once
    (`_WindowFilter`; `bytes.find` for a handful). ``exclude`` names files
    of the first source to skip (the journal, the lock).

    Returns
    -------
    hits : list of (needle, "label:name" or "name" for the first source)
    files_scanned, bytes_scanned : int
    """
    from .progress import progress_bar

    needles = list(dict.fromkeys(needles))
    if any(len(n) < MIN_SCAN_BYTES for n in needles):
        raise ValueError(f"needles must be at least {MIN_SCAN_BYTES} bytes")
    exclude = set(exclude)
    files = []
    for i, (label, storage, *names) in enumerate(sources):
        only = set(names[0]) if names else None
        for name, size in storage.walk():
            if (i == 0 and name in exclude) or (only is not None and name not in only):
                continue
            files.append((name if i == 0 else f"{label}:{name}", storage, name, size))
    hits: list[tuple[bytes, str]] = []
    total = 0
    if not needles:
        return hits, len(files), 0
    overlap = max(len(n) for n in needles) - 1
    keep = overlap + (-overlap) % 8  # an 8-aligned tail keeps every word width aligned across chunks
    window = _WindowFilter(needles) if len(needles) > 16 else None
    with progress_bar(progress, total=sum(f[3] for f in files), unit="B", description="verifying erasure") as bar:
        for shown, storage, name, _ in files:
            found: set[bytes] = set()
            tail = b""
            for block in storage.read_chunks(name, chunk_bytes):
                total += len(block)
                bar.advance(len(block))
                buf = tail + block
                if window is None:
                    found.update(n for n in needles if n not in found and n in buf)
                else:
                    window.find(buf, found)
                cut = len(buf) - keep - (len(buf) - keep) % 8 if len(buf) > keep else 0
                tail = buf[cut:] if keep else b""
            hits.extend((n, shown) for n in found)
    return hits, len(files), total


def scan_files(root: Path, needles: Iterable[bytes], *, exclude: Iterable[str] = (), chunk_bytes: int = 32 << 20):
    """`scan` over one local folder (see there)."""
    return scan([("", LocalStorage(Path(root)))], needles, exclude=exclude, chunk_bytes=chunk_bytes)


def verify(
    storage: Storage,
    ids: list[str],
    vectors: Optional[dict[str, np.ndarray]],
    *,
    salt: str,
    codes: Optional[dict[bytes, str]] = None,
    text: Iterable[str] = (),
    live: Optional[Callable[[], Iterable[str]]] = None,
    cache: Optional[dict] = None,
    progress: bool | str | None = None,
) -> dict:
    """Scan every file of the memory (but the journal and lock), and check the embedding cache.

    ``cache`` is what `visual_memory.cache.purge` returned: the shards it
    wrote are byte-scanned with the memory's files, and every shard's key
    list is read for the ids (scanning the whole cache, which may hold
    gigabytes of other vectors, would prove no more: a vector is only ever
    cached under its image's hash).

    Needles: each id (UTF-8; UTF-32 too, as the cache's numpy key arrays
    store it), each vector's float32 bytes, and each label or source in
    ``text`` (those no live record holds). A string found only as part of one
    the memory still holds (``img1`` inside ``img10``, a label inside another)
    is reported under ``shadowed``, not as a failure.
    """
    needles: dict[bytes, tuple[str, str]] = {}
    short = {"id": 0, "text": 0}
    for rid in ids:
        b = rid.encode()
        if len(b) < MIN_SCAN_BYTES:
            short["id"] += 1
            continue
        needles[b] = ("id", rid)
        needles[rid.encode("utf-32-le")] = ("id", rid)
    for t in text:
        b = t.encode()
        if len(b) < MIN_SCAN_BYTES:
            short["text"] += 1
        else:
            needles.setdefault(b, ("text", t))
    for rid, vec in (vectors or {}).items():
        needles[np.ascontiguousarray(vec, dtype=np.float32).tobytes()] = ("vector", rid)
    for code, rid in (codes or {}).items():  # what a compressed index stores (PQ/SQ codes)
        if len(code) >= MIN_SCAN_BYTES:
            needles.setdefault(code, ("code", rid))
    sources = [("", storage)]
    if cache is not None:
        sources.append(("embedding-cache", LocalStorage(Path(cache["dir"])), cache["new_shards"]))
    hits, n_files, n_bytes = scan(sources, needles, exclude=_SCAN_EXCLUDE, progress=progress)
    found, shadowed = [], []
    if cache is not None:
        from .cache import holding

        still = holding(ids, root=Path(cache["dir"]))
        found += [{"file": f"embedding-cache:{name}", "kind": "cache-key", "hash": None} for name in still]
    live_strings = None
    for needle, rel in sorted(hits, key=lambda h: h[1]):
        kind, value = needles[needle]
        item = {"file": rel, "kind": kind, "hash": salted_hash(salt, value)}
        if kind in ("id", "text") and live is not None:
            if live_strings is None:
                live_strings = list(live())
            if any(value in s for s in live_strings):
                shadowed.append(item)
                continue
        found.append(item)
    kinds = [k for k, _ in needles.values()]
    return {
        "ok": not found,
        "files_scanned": n_files,
        "bytes_scanned": n_bytes,
        "ids_scanned": len({v for k, v in needles.values() if k == "id"}),
        "vectors_scanned": kinds.count("vector"),
        "codes_scanned": kinds.count("code"),
        "texts_scanned": kinds.count("text"),
        "ids_too_short": short["id"],
        "texts_too_short": short["text"],
        "found": found,
        "shadowed": shadowed,
        "storage": storage.versioning(),
    }


# -- the erasure -------------------------------------------------------------------


def _texts_of(store: Store, ids: list[str], versions: Iterable[int]) -> tuple[set[str], set[str]]:
    """Labels and sources of ``ids`` in the given versions (those still readable)."""
    labels: set[str] = set()
    sources: set[str] = set()
    for v in versions:
        try:
            ds = store.dataset if int(v) == store.version else store.dataset.checkout_version(int(v))
            table = ds.to_table(columns=["label", "source"], filter=sql_in("id", ids))
        except Exception:  # the version was cleaned up
            continue
        labels.update(x for x in table.column("label").to_pylist() if x)
        sources.update(x for x in table.column("source").to_pylist() if x)
    return labels, sources


def begin(store: Store, ids: list[str], *, selector: list[str], past_versions: Iterable[int] = ()) -> dict:
    """Write the journal (under the writer lock, before anything changes).

    ``past_versions``: versions that still hold ids removed earlier (their
    labels and sources are read from there).
    """
    store.salt()  # made now, so a crash cannot leave a journal without a salt
    labels, sources = _texts_of(store, ids, [store.version, *past_versions])
    journal = {
        "token": uuid.uuid4().hex,
        "ids": list(ids),
        "labels": sorted(labels),
        "sources": sorted(sources),
        "version_before": store.version,
        "first_version": first_version_holding(store.audit_entries(), ids),
        "started_at": now_utc().isoformat(),
        "selector": selector,
    }
    store.storage.write(JOURNAL, json.dumps(journal, sort_keys=True).encode())
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


def _live_text(store: Store) -> tuple[set[str], set[str], set[str]]:
    """Ids, labels and sources of the records at the current version."""
    table = store.dataset.to_table(columns=["id", "label", "source"])
    return (set(table.column("id").to_pylist()), set(table.column("label").to_pylist()),
            {x for x in table.column("source").to_pylist() if x})


def run(
    store: Store,
    journal: dict,
    *,
    addresses: Optional[np.ndarray] = None,
    vectors: Optional[dict[str, np.ndarray]] = None,
    codes: Optional[dict[bytes, str]] = None,
    verify_scan: bool = True,
    on_deleted: Optional[Callable[[], None]] = None,
    recovered: bool = False,
    progress: bool | str | None = None,
) -> ForgetReceipt:
    """Steps 2-7 (see the module docstring). ``addresses`` None: find the ids' rows by query (recovery)."""
    ids = list(journal["ids"])
    storage = store.storage
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
    live_ids, live_labels, live_sources = _live_text(store)
    # Labels and sources that only forgotten records had: erased everywhere, and scanned for.
    text = (set(journal.get("labels", ())) - live_labels) | (set(journal.get("sources", ())) - live_sources)
    scrub_audit(storage, ids, salt, text=text)
    store._audit_state = None  # the log was rewritten: the next reconcile must re-read it
    # Derived caches (self-neighbour rows and similarities) describe the forgotten
    # records too; they are rebuilt on demand, so drop them rather than patch them.
    storage.delete_prefix(DERIVED_CACHE)
    if recovered:  # a crash may have left the saved index holding them: the next open rebuilds it
        storage.delete_prefix(SAVED_INDEX)
    storage.delete(JOURNAL + ".tmp")  # left by a crash while an earlier journal was being written
    from .cache import purge

    cache = purge(ids)
    crash_point("forget:scrubbed")
    if verify_scan:
        old = [v for v in store.version_numbers() if v != store.version]

        def live() -> list[str]:
            # Strings the memory legitimately keeps: its records now, and those of
            # the versions older than the forgotten records (never erased).
            held_labels, held_sources = _all_texts(store, old)
            return list(live_ids | live_labels | live_sources | held_labels | held_sources)

        verification = verify(storage, ids, vectors, salt=salt, codes=codes, text=text, live=live, cache=cache,
                              progress=progress)
    else:
        verification = {"ok": None, "skipped": True, "storage": storage.versioning()}
    verification["embedding_cache"] = {k: v for k, v in cache.items() if k != "new_shards"}
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
    storage.delete(JOURNAL)
    if not storage.remote:
        from .storage import fsync_dir

        fsync_dir(storage.root)
    if verification.get("ok") is False:
        raise ErasureError(
            f"{store.path}: forget verification found bytes of {len(verification['found'])} forgotten item(s) "
            f"in {sorted({h['file'] for h in verification['found']})}; the records no longer vote. "
            "Run `vismem optimize` and forget again, and report this as a bug.",
            receipt,
        )
    return receipt


def _all_texts(store: Store, versions: list[int]) -> tuple[set[str], set[str]]:
    labels: set[str] = set()
    sources: set[str] = set()
    for v in versions:
        try:
            table = store.dataset.checkout_version(int(v)).to_table(columns=["label", "source"])
        except Exception:
            continue
        labels.update(table.column("label").to_pylist())
        sources.update(x for x in table.column("source").to_pylist() if x)
    return labels, sources


def finish_if_pending(store: Store, *, progress: bool | str | None = None) -> Optional[ForgetReceipt]:
    """`finish_pending` if a journal is there (the ``on_lock`` hook of `Store.writing`)."""
    return finish_pending(store, progress=progress) if pending(store.storage) else None


def finish_pending(store: Store, *, progress: bool | str | None = None) -> Optional[ForgetReceipt]:
    """Complete an interrupted forget (inside `Store.writing`). A failed verification is logged, not raised."""
    journal = json.loads(store.storage.read(JOURNAL))
    log.warning("%s: completing a forget of %d record(s) interrupted at version %s",
                store.path, len(journal["ids"]), journal["version_before"])
    vectors = vectors_at(store, journal["ids"], journal["version_before"])
    try:
        return run(store, journal, vectors=vectors, recovered=True, progress=progress)
    except ErasureError as exc:
        log.error("%s", exc)
        return exc.receipt
