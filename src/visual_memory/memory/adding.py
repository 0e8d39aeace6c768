"""Adding records: images (decoded, validated, embedded) or precomputed vectors.

Every input is checked *before* anything is written, so one bad image leaves
the memory unchanged; records are then committed in batches of
`COMMIT_EVERY`, so a crash keeps whole commits (``skip_existing`` resumes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pyarrow as pa

from ..encoders import Encoder, EncoderSpec
from ..errors import DuplicateIdError, EncoderMismatchError, ImageError, list_failures
from ..images import as_list, load_image, scan_folder
from ..index import as_queries
from ..results import AddResult
from ..store import now_utc, record_schema
from . import preview
from .preview import EditPreview
from .state import MemoryState

THUMBNAIL_SIZE = 64
COMMIT_EVERY = 1024  # records per commit when adding many images: a crash loses at most this much work


def thumbnail(img) -> bytes:
    """A small JPEG of a PIL image, stored with the record for explanations."""
    from PIL import Image

    t = img.copy()
    t.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    t.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def as_labels(labels: Union[str, Sequence[str], None], n: int, what: str = "labels") -> list[str]:
    """One label per item: a str is repeated; non-strings become str; empty labels are refused."""
    if labels is None:
        raise ValueError(f"{what} are required: give one label for all images or one per image")
    if isinstance(labels, str):
        labels = [labels] * n
    labels = [str(x) if not isinstance(x, str) else x for x in (labels.tolist() if isinstance(labels, np.ndarray) else labels)]
    if len(labels) != n:
        raise ValueError(f"got {n} items but {len(labels)} {what}")
    empty = [i for i, x in enumerate(labels) if not x.strip()]
    if empty:
        raise ValueError(f"{what} must be non-empty strings (empty at positions {empty[:5]})")
    return labels


def as_ids(ids: Optional[Sequence[str]], n: int) -> Optional[list[str]]:
    if ids is None:
        return None
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"got {n} items but {len(ids)} ids")
    if any(not i for i in ids):
        raise ValueError("ids must be non-empty strings")
    return ids


def resolve_inputs(images, labels) -> tuple[list, list[str]]:
    """Items and labels from a folder (ImageFolder when labels is None) or a list of images."""
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        if labels is None:
            paths, folder_labels = scan_folder(images)
            return list(paths), folder_labels
        from ..images import list_images

        paths = list_images(images)
        if not paths:
            raise ImageError(f"{images}: no images found")
        return list(paths), as_labels(labels, len(paths))
    items = as_list(images)
    return items, as_labels(labels, len(items))


def validate_images(items: list, *, progress: bool | str) -> list[str]:
    """Decode every image once; their SHA-256 content hashes, or one `ImageError` naming every bad image."""
    from concurrent.futures import ThreadPoolExecutor

    from ..progress import progress_bar

    def check(item) -> tuple[Optional[str], Optional[str]]:
        try:
            return load_image(item).sha256, None
        except ImageError as exc:  # keep going: the error names every bad image, not only the first
            return None, str(exc)

    with ThreadPoolExecutor(max_workers=2) as pool, progress_bar(
        "validating" if progress else False, total=len(items), unit="img"
    ) as bar:
        hashes, failures = [], []
        for h, failure in pool.map(check, items):
            hashes.append(h)
            if failure is not None:
                failures.append(failure)
            bar.advance()
    if failures:
        raise ImageError(list_failures(failures, total=len(items)))
    return hashes


def check_new_ids(state: MemoryState, ids: list[str], skip_existing: bool) -> np.ndarray:
    """Mask of ids to add; duplicates (in the input or the memory) raise unless ``skip_existing``."""
    seen: dict[str, int] = {}
    dups_in_input = []
    for i, rid in enumerate(ids):
        if rid in seen:
            dups_in_input.append(rid)
        seen.setdefault(rid, i)
    if dups_in_input and not skip_existing:
        raise DuplicateIdError(
            f"the input repeats {len(dups_in_input)} id(s), e.g. {dups_in_input[:3]} "
            "(identical images get identical content-hash ids; pass ids= or skip_existing=True)"
        )
    rows = state.rows
    keep = np.array([(rid not in rows) and seen[rid] == i for i, rid in enumerate(ids)], dtype=bool)
    existing = [rid for rid in ids if rid in rows]
    if existing and not skip_existing:
        raise DuplicateIdError(
            f"{len(existing)} id(s) already in the memory, e.g. {existing[:3]}; nothing was added. "
            "Pass skip_existing=True (CLI: --skip-existing) to add only the new ones."
        )
    return keep


def record_table(dim: int, *, ids, labels, vectors, sources, metadata=None, thumbnails=None) -> pa.Table:
    """New records as an Arrow table of `record_schema` (weight 1, added now)."""
    n = len(ids)
    meta = [json.dumps(m, sort_keys=True) if m is not None else None for m in (metadata or [None] * n)]
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array(labels, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1)), dim),
            pa.array(sources, pa.string()),
            pa.array(np.ones(n, dtype=np.float32)),
            pa.array([now_utc()] * n, pa.timestamp("us", tz="UTC")),
            pa.array(meta, pa.string()),
            pa.array(thumbnails or [None] * n, pa.binary()),
        ],
        schema=record_schema(dim),
    )


def commit(state: MemoryState, *, ids, labels, vectors, sources, metadata, thumbnails, op) -> None:
    """One Lance commit of new records, then RAM, then one audit line."""
    n = len(ids)
    table = record_table(state.store.dim, ids=ids, labels=labels, vectors=vectors, sources=sources,
                         metadata=metadata, thumbnails=thumbnails)
    state.commit_table(table, vectors)
    state.store.audit(op, n=n, ids=ids, labels=sorted(set(labels)))
    state.after_mutation()


def add_images(
    state: MemoryState, encoder: Encoder, images, *, labels=None, ids=None, source=None, metadata=None,
    skip_existing: bool = False, vectors: Optional[np.ndarray] = None, batch_size: Optional[int] = None,
    progress: bool | str = False, lock_timeout: float = 0.0, dry_run: bool = False,
) -> Union[AddResult, EditPreview]:
    items, labels = resolve_inputs(images, labels)
    n = len(items)
    ids = as_ids(ids, n)
    if metadata is not None and len(metadata) != n:
        raise ValueError(f"got {n} images but {len(metadata)} metadata entries")
    if n == 0:
        return preview.addition(state, [], [], op="add") if dry_run else AddResult(state.version, 0)
    if vectors is not None:
        vectors = as_queries(vectors, state.store.dim, what="vectors")
        if len(vectors) != n:
            raise ValueError(f"got {n} images but {len(vectors)} vectors")
    # Pass 1: decode-validate everything and resolve ids (cheap next to embedding).
    hashes = validate_images(items, progress=progress)
    ids = ids if ids is not None else hashes
    sources = [source if source is not None else (os.fspath(it) if isinstance(it, (str, os.PathLike)) else None) for it in items]
    with state.peeking() if dry_run else state.writing(timeout=lock_timeout):
        keep = check_new_ids(state, ids, skip_existing)
        skipped = [ids[i] for i in range(n) if not keep[i]]
        sel = np.flatnonzero(keep)
        todo = [items[i] for i in sel]
        if dry_run:  # embedded only if the preview is probed
            added = (lambda: vectors[sel]) if vectors is not None else (lambda: encoder.embed(todo, progress=progress or False))
            return preview.addition(state, [ids[i] for i in sel], [labels[i] for i in sel], op="add", skipped=skipped,
                                    vectors=added)
        if len(sel) == 0:
            return AddResult(state.version, 0, skipped)
        added: list[str] = []
        step = max(COMMIT_EVERY, int(batch_size or encoder.batch_size))
        if vectors is None:
            batches = encoder.iter_batches(todo, batch_size=batch_size, progress=progress or False)
        else:
            batches = _decoded_batches(todo, vectors[sel], step)
        pending: list[tuple[list, np.ndarray]] = []
        for loaded, batch_vectors in batches:
            pending.append((loaded, batch_vectors))
            if sum(len(b) for b, _ in pending) >= step:
                _commit_images(state, pending, sel[len(added):], ids, labels, sources, metadata, added)
                pending = []
        if pending:
            _commit_images(state, pending, sel[len(added):], ids, labels, sources, metadata, added)
    return AddResult(state.version, len(added), skipped, added)


def _decoded_batches(items: list, vectors: np.ndarray, step: int):
    for start in range(0, len(items), step):
        yield [load_image(it) for it in items[start : start + step]], vectors[start : start + step]


def _commit_images(state, pending, sel, ids, labels, sources, metadata, added: list) -> None:
    loaded = [li for batch, _ in pending for li in batch]
    vectors = np.concatenate([v for _, v in pending])
    idx = sel[: len(loaded)]
    commit(
        state,
        ids=[ids[i] for i in idx],
        labels=[labels[i] for i in idx],
        vectors=vectors,
        sources=[sources[i] for i in idx],
        metadata=[metadata[i] for i in idx] if metadata is not None else None,
        thumbnails=[thumbnail(li.image) for li in loaded],
        op="add",
    )
    added.extend(ids[i] for i in idx)


def check_vector_source(state: MemoryState, encoder) -> None:
    """Refuse vectors whose stated encoder is not the memory's."""
    want = state.store.manifest["encoder"]
    if isinstance(encoder, Encoder):
        encoder = encoder.spec
    if isinstance(encoder, EncoderSpec):
        ok = encoder.fingerprint == want.get("fingerprint")
        got = f"{encoder.name} (fingerprint {encoder.fingerprint})"
    else:
        ok = str(encoder) == want["name"]
        got = str(encoder)
    if not ok:
        raise EncoderMismatchError(
            f"vectors come from encoder {got}, but {state.store.path} holds vectors from {want['name']!r} "
            f"(fingerprint {want.get('fingerprint')}); they are not comparable"
        )


def add_embeddings(
    state: MemoryState, vectors, labels, *, ids=None, source=None, metadata=None, encoder=None,
    skip_existing: bool = False, lock_timeout: float = 0.0, dry_run: bool = False,
) -> Union[AddResult, EditPreview]:
    if encoder is not None:
        check_vector_source(state, encoder)
    vecs = as_queries(vectors, state.store.dim, what="vectors")
    n = len(vecs)
    labels = as_labels(labels, n)
    ids = as_ids(ids, n)
    if ids is None:
        ids = [hashlib.sha256(v.tobytes()).hexdigest() for v in vecs]
    if metadata is not None and len(metadata) != n:
        raise ValueError(f"got {n} vectors but {len(metadata)} metadata entries")
    if n == 0:
        return preview.addition(state, [], [], op="add_embeddings") if dry_run else AddResult(state.version, 0)
    with state.peeking() if dry_run else state.writing(timeout=lock_timeout):
        keep = check_new_ids(state, ids, skip_existing)
        skipped = [ids[i] for i in range(n) if not keep[i]]
        sel = np.flatnonzero(keep)
        if dry_run:
            return preview.addition(state, [ids[i] for i in sel], [labels[i] for i in sel], op="add_embeddings",
                                    skipped=skipped, vectors=vecs[sel])
        if len(sel):
            commit(
                state,
                ids=[ids[i] for i in sel],
                labels=[labels[i] for i in sel],
                vectors=vecs[sel],
                sources=[source] * len(sel),
                metadata=[metadata[i] for i in sel] if metadata is not None else None,
                thumbnails=None,
                op="add_embeddings",
            )
    return AddResult(state.version, len(sel), skipped, [ids[i] for i in sel])
