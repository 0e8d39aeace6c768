"""The editing verbs behind `Memory`: remove, forget, relabel, reweight, tags, versions, optimize.

Functions over a `MemoryState`; the facade (`visual_memory.Memory`) documents
each verb for users. Every verb follows one protocol: take the writer lock,
catch up with other writers, validate and select *before* changing anything,
commit one Lance version (forget: two), update the row table and the index so
`classify` honours the change at once, append one audit line.

Selectors
---------
``ids``, ``label``, ``source``, ``where`` and ``images`` may be combined; a
record is selected when it matches **all** of those given (AND). Giving none,
or an empty list, is refused (`SelectorError`): an edit never empties a memory
by accident (say ``where="true"`` to mean everything). Ids and images must all
exist (`UnknownIdError` lists the missing ones and nothing changes); a label
with no records is a `SelectorError` (a typo, most likely); a ``source`` or
``where`` filter that matches nothing selects nothing.

``images`` with ``near=T`` (forget only) also selects every record whose
embedding has cosine similarity >= T with an image's embedding: its copies
(re-encoded, resized, lightly cropped). An image need not be in the memory
itself then, but something must match.

Dry runs
--------
Every verb takes ``dry_run=True``: it selects exactly as the edit would, under
no lock and writing nothing, and returns an `EditPreview` (see `preview`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from datetime import timedelta
from typing import Any, Optional, Sequence, Union

import numpy as np

from .. import erasure
from ..errors import MemoryLockedError, SelectorError, UnknownIdError, VisualMemoryError
from ..images import as_list, sha256_of
from ..index import as_queries
from ..results import EditResult, ForgetReceipt, OptimizeResult, RemoveResult
from ..store import sql_quote
from . import preview
from .preview import EditPreview
from .state import MemoryState

log = logging.getLogger(__name__)

_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,99}$")

IdsLike = Union[str, Sequence[str]]


def id_list(ids: IdsLike, what: str = "ids") -> list[str]:
    """Ids as a de-duplicated list of str; an empty selection is a `SelectorError`."""
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


# -- selecting ---------------------------------------------------------------------------


def select(
    state: MemoryState, *, ids=None, label=None, source=None, where=None, images=None, historic: bool = False,
    near: Optional[float] = None, image_vectors: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Resolve selectors to live rows (AND).

    Returns (rows, historic_ids, kinds): ``historic_ids`` are requested ids
    that are no longer live but that the audit log still names (only with
    ``historic=True``, for `forget`); ``kinds`` names the selectors given.
    With ``near``, ``image_vectors`` are the images' embeddings and the
    images selector also takes every live record within cosine ``near``.
    """
    given = {k: v for k, v in (("ids", ids), ("label", label), ("source", source), ("where", where), ("images", images)) if v is not None}
    if not given:
        raise SelectorError(
            "no selector given: pass ids=, label=, source=, where= or images= "
            "(an edit never applies to everything by accident; say where=\"true\" to mean every record)"
        )
    rows_t = state.rows
    path = state.store.path
    selections: list[np.ndarray] = []
    past: list[str] = []
    wanted: list[str] = []
    if ids is not None:
        wanted += id_list(ids, "ids")
    if images is not None:
        from ..images import describe

        items = as_list(images)
        if not items:
            raise SelectorError("images is empty: nothing selected")
        hashes = [sha256_of(item) for item in items]
        if near is not None:
            # The images' own records (if present) plus every record within the threshold.
            own, gone = rows_t.rows_of(hashes)
            if historic and gone:  # an image's own record removed earlier, its bytes still on disk
                past += sorted(ids_in_history(state, gone))
            rows_near = near_rows(state, image_vectors, near)
            if not len(own) and not len(rows_near) and not past:
                raise SelectorError(f"none of the {len(items)} image(s) is in the memory and no record has cosine "
                                    f"similarity >= {near} with them; nothing was changed")
            selections.append(np.union1d(own, rows_near).astype(np.int64))
        else:
            unknown = [f"{describe(it)} (sha256 {h[:12]}...)" for it, h in zip(items, hashes) if h not in rows_t]
            if unknown and not historic:
                raise UnknownIdError(
                    f"{len(unknown)} image(s) not in the memory (no record has their content hash as id): "
                    f"{', '.join(unknown[:5])}; nothing was changed"
                )
            wanted += hashes
    if wanted:
        wanted = list(dict.fromkeys(wanted))
        rows, missing = rows_t.rows_of(wanted)
        if missing:
            if not historic:
                raise UnknownIdError(_missing_message(missing))
            known = ids_in_history(state, missing)
            unknown = [m for m in missing if m not in known]
            if unknown:
                raise UnknownIdError(_missing_message(unknown) + " (they are neither in the memory nor in its history)")
            past += missing
        selections.append(rows)
    if label is not None:
        labels = id_list(label, "label")
        counts = rows_t.label_counts()
        codes = []
        for lab in labels:
            if lab not in counts:
                have = ", ".join(repr(x) for x in list(counts)[:10])
                raise SelectorError(f"label {lab!r} has no records in {path} (labels: {have}); nothing was changed")
            codes.append(rows_t.labels.code(lab))
        selections.append(np.flatnonzero(rows_t.alive & np.isin(rows_t.codes, codes)))
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
            table = state.store.dataset.to_table(columns=["id"], filter=flt)
        except Exception as exc:  # Lance raises ValueError/OSError/its own types for parse and plan errors
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise SelectorError(
                f"malformed filter {where if where is not None else flt!r}: {first}. Columns: id, label, source, "
                "weight, added_at, metadata (a JSON string); e.g. \"label = 'cat' AND weight < 0.5\""
            ) from None
        rows, _ = rows_t.rows_of(table.column("id").to_pylist())
        selections.append(rows)
    if near is not None:
        if images is None:
            raise SelectorError("near= needs images=: the images whose copies to select")
        given["near"] = near
    rows = selections[0]
    for other in selections[1:]:
        rows = np.intersect1d(rows, other)
    return np.unique(rows).astype(np.int64), list(dict.fromkeys(past)), sorted(given)


def near_rows(state: MemoryState, vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Live rows whose vector has cosine similarity >= ``threshold`` with any of ``vectors`` (exact).

    An exact index is searched with a growing k until every query's last
    neighbour falls below the threshold; an approximate index could miss a
    copy, so the stored vectors are scanned instead.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"near must be a cosine similarity in [-1, 1] (e.g. 0.9); got {threshold!r}")
    q = as_queries(vectors, state.store.dim, what="image vectors")
    index, n = state.index, state.rows.n_alive
    if n == 0:
        return np.zeros(0, np.int64)
    if index.is_exact:
        k = min(64, n)
        while True:
            sims, rows = index.search(q, k)
            if k >= n or (sims[:, -1] < threshold).all():
                break
            k = min(4 * k, n)
        return np.unique(rows[(sims >= threshold) & (rows >= 0)]).astype(np.int64)
    alive = state.rows.alive_rows()
    hits = []
    for lo in range(0, len(alive), 16384):
        chunk = alive[lo : lo + 16384]
        sims = state.vectors(chunk) @ q.T
        hits.append(chunk[(sims >= threshold).any(axis=1)])
    return np.unique(np.concatenate(hits)).astype(np.int64)


def ids_in_history(state: MemoryState, ids: list[str]) -> set[str]:
    want = set(ids)
    seen: set[str] = set()
    for entry in state.store.audit_entries():
        seen |= erasure._mentions(entry, want)
    return seen


def live_rows(state: MemoryState, ids: IdsLike) -> tuple[list[str], np.ndarray]:
    ids = id_list(ids)
    rows, missing = state.rows.rows_of(ids)
    if missing:
        raise UnknownIdError(_missing_message(missing))
    return ids, rows


# -- remove / forget ---------------------------------------------------------------------


def _session(state: MemoryState, dry_run: bool, lock_timeout: float):
    """The writer lock for an edit; for a dry run, a lock-free catch-up that writes nothing."""
    return state.peeking() if dry_run else state.writing(timeout=lock_timeout)


def remove(state: MemoryState, *, ids=None, label=None, source=None, where=None, images=None,
           lock_timeout: float = 0.0, dry_run: bool = False) -> Union[RemoveResult, EditPreview]:
    with _session(state, dry_run, lock_timeout):
        rows, _, _ = select(state, ids=ids, label=label, source=source, where=where, images=images)
        if dry_run:
            return preview.removal(state, rows, op="remove")
        if not len(rows):
            return RemoveResult(state.version, 0, [])
        removed = [state.rows.ids[r] for r in rows.tolist()]
        state.store.delete_rows(state.addresses(rows))
        state.remove_rows(rows)
        state.committed()
        selector = {k: v for k, v in (("label", label), ("source", source), ("where", where)) if v is not None}
        state.store.audit("remove", n=len(removed), ids=removed, selector=selector or None)
        state.after_mutation()
        return RemoveResult(state.version, len(removed), removed)


def forget(state: MemoryState, *, ids=None, label=None, source=None, where=None, images=None, verify: bool = True,
           lock_timeout: float = 0.0, progress: bool | str | None = None, near: Optional[float] = None,
           image_vectors: Optional[np.ndarray] = None, dry_run: bool = False) -> Union[ForgetReceipt, EditPreview]:
    with _session(state, dry_run, lock_timeout):
        st = state.store
        rows, past, kinds = select(state, ids=ids, label=label, source=source, where=where, images=images, historic=True,
                                   near=near, image_vectors=image_vectors)
        if not len(rows) and not past:
            raise SelectorError(f"the selector ({', '.join(kinds)}) matches no records; nothing to forget")
        near_info = None
        if near is not None:
            own = {sha256_of(it) for it in as_list(images)}
            near_info = {"threshold": float(near), "copies": sum(state.rows.ids[r] not in own for r in rows.tolist())}
            kinds = [k if k != "near" else f"near>={float(near):g}" for k in kinds]
        if dry_run:
            return preview.removal(state, rows, op="forget", historic=past, near=near_info)
        live_ids = [state.rows.ids[r] for r in rows.tolist()]
        # The proof scans for the stored vectors' bytes, so they come from the store, never a lossy index.
        vectors = dict(zip(live_ids, state.vectors(rows))) if verify else None
        past_versions = sorted({int(e["version"]) for e in st.audit_entries() if erasure._mentions(e, set(past))}) if past else []
        if verify:
            for v in past_versions:
                vectors.update({k: x for k, x in erasure.vectors_at(st, past, v).items() if k not in vectors})
        addrs = state.addresses(rows)
        journal = erasure.begin(st, live_ids + past, selector=kinds, past_versions=past_versions)

        # Rows removed earlier still hold their vectors in RAM (tombstoned): erase them too.
        past_set = set(past)
        dead_rows = [r for r, i in enumerate(state.rows.ids) if i in past_set] if past else []
        ram_rows = np.concatenate([rows, np.asarray(dead_rows, np.int64)])

        # A compressed index stores codes, not vectors: the scan looks for those bytes too.
        codes = state.index_codes(vectors) if verify else None

        def erase_in_ram() -> None:
            state.remove_rows(ram_rows, erase=True)
            state.drop_shared_codes(codes)
            state.save_index(force=True)  # before the scan, so the scan covers the index file that stays

        try:
            receipt = erasure.run(st, journal, addresses=addrs, vectors=vectors, codes=codes, verify_scan=verify,
                                  progress=progress, on_deleted=erase_in_ram)
        finally:
            state.committed()
        state.after_mutation()
        if near_info is not None:
            receipt = dataclasses.replace(receipt, near_threshold=near_info["threshold"], copies_found=near_info["copies"])
        return receipt


def finish_pending_forget(state: MemoryState) -> None:
    """Finish a forget a crash interrupted, if the lock is free (else leave it to the next writer)."""
    if not erasure.pending(state.store.storage):
        return
    try:
        with state.writing(timeout=0.0):
            pass
    except MemoryLockedError:
        log.warning("%s: a forget is unfinished and another process holds the lock; the next writer finishes it",
                    state.store.path)


# -- relabel / reweight ------------------------------------------------------------------


def relabel(state: MemoryState, ids: IdsLike, label: str, *, lock_timeout: float = 0.0,
            dry_run: bool = False) -> Union[EditResult, EditPreview]:
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"label must be a non-empty string; got {label!r}")
    with _session(state, dry_run, lock_timeout):
        ids, rows = live_rows(state, ids)
        code = state.rows.labels.code(label)
        change = rows if code is None else rows[state.rows.codes[rows] != code]
        if dry_run:
            return preview.relabelling(state, change, label)
        if not len(change):
            return EditResult(state.version, 0)
        old = sorted(set(state.rows.labels.decode(state.rows.codes[change]).tolist()))
        state.store.update_rows(state.addresses(change), {"label": sql_quote(label)})
        state.rows.set_label(change, label)
        state.committed()
        state.store.audit("relabel", n=len(change), ids=[state.rows.ids[r] for r in change.tolist()], label=label, old_labels=old)
        state.after_mutation()
        return EditResult(state.version, len(change))


def parse_weights(ids: IdsLike, weight) -> tuple[list[str], np.ndarray]:
    """Validated (ids, float32 weights), one per distinct id."""
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
    # Weights are stored as float32: a nonzero weight below its smallest normal number would be
    # kept imprecisely or as 0, one above its largest as inf.
    f32 = np.finfo(np.float32)
    bad = [(i, x) for i, x in zip(raw, w.tolist()) if not (x == 0 or float(f32.tiny) <= x <= float(f32.max))]
    if bad:
        raise ValueError(f"weights must be finite and >= 0: 0, or between {float(f32.tiny):.9g} and {float(f32.max):.9g} "
                         f"(stored as float32); got {bad[0][1]!r} for id {bad[0][0]!r}"
                         + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    per_id: dict[str, float] = {}
    for rid, x in zip(raw, w.tolist()):
        if per_id.setdefault(rid, x) != x:
            raise ValueError(f"id {rid!r} is given twice with different weights ({per_id[rid]} and {x})")
    return list(per_id), np.fromiter(per_id.values(), dtype=np.float64, count=len(per_id)).astype(np.float32)


def reweight(state: MemoryState, ids: IdsLike, weight, *, lock_timeout: float = 0.0, op: str = "reweight",
             audit: Optional[dict[str, Any]] = None, dry_run: bool = False) -> Union[EditResult, EditPreview]:
    """Set weights; ``op`` and ``audit`` name the audit line (prune records its parameters there)."""
    ids_l, w32 = parse_weights(ids, weight)
    with _session(state, dry_run, lock_timeout):
        ids_l, rows = live_rows(state, ids_l)
        mask = state.rows.weights[rows] != w32
        change, new = rows[mask], w32[mask]
        if dry_run:
            return preview.reweighting(state, change, new, op=op)
        if not len(change):
            return EditResult(state.version, 0)
        changed_ids = [state.rows.ids[r] for r in change.tolist()]
        version_before = state.version
        uniform = bool(np.all(new == new[0]))
        if uniform:
            state.store.update_rows(state.addresses(change), {"weight": f"CAST({float(new[0])!r} AS FLOAT)"})
        else:
            state.store.update_weights(changed_ids, new)
        state.rows.set_weights(change, new)
        state.committed()
        fields = {"weight": float(new[0])} if uniform else {"weights": new.tolist()}
        state.store.audit(op, n=len(change), ids=changed_ids, version_before=version_before, **fields, **(audit or {}))
        state.after_mutation()
        return EditResult(state.version, len(change))


# -- versions and tags -------------------------------------------------------------------


def tag(state: MemoryState, name: str, *, version: Optional[int] = None, lock_timeout: float = 0.0) -> dict:
    if not isinstance(name, str) or not _TAG_NAME.match(name):
        raise ValueError(f"tag name must start with a letter and use letters, digits, '.', '_', '-' (max 100); got {name!r}")
    with state.writing(timeout=lock_timeout):
        st = state.store
        v = state.version if version is None else int(version)
        existing = st.tags()
        if name in existing:
            raise ValueError(f"tag {name!r} already names version {existing[name]}; remove it first (`untag`)")
        if v not in st.version_numbers():
            raise VisualMemoryError(f"{st.path}: version {v} does not exist (or was erased by a forget); cannot tag it")
        st.create_tag(name, v)
        st.audit("tag", tag=name, tagged_version=v)
    return {"tag": name, "version": v}


def untag(state: MemoryState, name: str, *, lock_timeout: float = 0.0) -> None:
    with state.writing(timeout=lock_timeout):
        st = state.store
        if name not in st.tags():
            raise SelectorError(f"no tag {name!r} in {st.path} (tags: {sorted(st.tags())})")
        st.delete_tag(name)
        st.audit("untag", tag=name)


def versions(state: MemoryState) -> list[dict]:
    st = state.store
    readable = set(st.version_numbers())
    by_version: dict[int, list[str]] = {}
    for name, v in st.tags().items():
        by_version.setdefault(v, []).append(name)
    out = []
    for e in st.audit_entries():
        v = int(e.get("version", 0))
        out.append({
            "version": v,
            "op": e.get("op"),
            "ts": e.get("ts"),
            "n": e.get("n"),
            "readable": v in readable,
            "tags": by_version.get(v, []) if e.get("op") not in ("tag", "untag") else [],
            "recovered": bool(e.get("recovered")),
        })
    return out


def optimize(state: MemoryState, *, cleanup_older_than: Optional[timedelta] = None, lock_timeout: float = 0.0) -> OptimizeResult:
    with state.writing(timeout=lock_timeout):
        return state.optimize_locked(cleanup_older_than=cleanup_older_than, auto=False)
