"""`Memory`: the facade users hold. Every verb delegates to a room below.

images -> encoders -> store -> index -> vote. This module wires them and
keeps the in-RAM index in step with the store; it does no search maths or I/O
of its own.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

from . import vote as voting
from .editing import UNKNOWN_ADDR, EditingMixin
from .encoders import DEFAULT_ENCODER, Encoder, EncoderSpec, create_encoder
from .errors import (
    DuplicateIdError,
    EncoderMismatchError,
    ImageError,
    UnknownIdError,
    VectorError,
)
from .images import ImageLike, as_list, load_image, scan_folder
from .index import VectorIndex, as_queries
from .results import AddResult, EvalResult, Prediction
from .store import Store, now_utc, record_schema, sql_in, sql_quote, vectors_from_column

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 64
COMMIT_EVERY = 1024  # records per commit when adding many images: a crash loses at most this much work


def _thumbnail(img) -> bytes:
    from PIL import Image

    t = img.copy()
    t.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    t.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _as_labels(labels: Union[str, Sequence[str], None], n: int, what: str = "labels") -> list[str]:
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


def _as_ids(ids: Optional[Sequence[str]], n: int) -> Optional[list[str]]:
    if ids is None:
        return None
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"got {n} items but {len(ids)} ids")
    if any(not i for i in ids):
        raise ValueError("ids must be non-empty strings")
    return ids


def _lookup(table: list, keys: np.ndarray) -> list:
    """``[table[i] for i in keys.ravel()]`` with None where ``i < 0``, fast."""
    flat = keys.ravel().tolist()
    out = list(map(table.__getitem__, flat)) if len(table) else [None] * len(flat)
    if len(table) and (keys < 0).any():
        for j in np.flatnonzero(keys.ravel() < 0).tolist():
            out[j] = None
    return out


def _score_dicts(totals: np.ndarray, labels: list[str]) -> list[dict[str, float]]:
    """Per query, {label: total} for labels with a vote, highest first (ties: lower code first)."""
    qi, ci = np.nonzero(totals)
    vals = totals[qi, ci]
    order = np.lexsort((-vals, qi))  # stable: equal totals keep ascending label code
    names = list(map(labels.__getitem__, ci[order].tolist()))
    vals = vals[order].tolist()
    bounds = np.concatenate([[0], np.cumsum(np.bincount(qi, minlength=len(totals)))]).tolist()
    return [dict(zip(names[a:b], vals[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


class Memory(EditingMixin):
    """An editable kNN image classifier over a durable memory directory.

    Create one with `visual_memory.create`, open one with `visual_memory.open`.

    Examples
    --------
    >>> import numpy as np, tempfile, visual_memory as vm
    >>> mem = vm.create(tempfile.mkdtemp() + "/m", encoder=None, dim=2)
    >>> mem.add_embeddings(np.array([[1, 0], [0, 1]]), labels=["cat", "dog"], ids=["a", "b"]).added
    2
    >>> mem.classify(np.array([[0.9, 0.1]]), k=1)[0].label
    'cat'
    """

    def __init__(self, store: Store, encoder: Optional[Encoder] = None) -> None:
        self._store = store
        self._encoder = encoder
        self._load_index()

    # -- construction --------------------------------------------------------------

    def _load_index(self) -> None:
        """(Re)build the in-RAM index and row tables from the store."""
        st = self._store
        self._index = VectorIndex(st.dim, st.manifest.get("index", "Flat"))
        self._ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._labels: list[str] = []  # label vocabulary, code -> label
        self._code_of: dict[str, int] = {}
        self._codes = np.zeros(0, dtype=np.int32)
        self._weights = np.zeros(0, dtype=np.float32)
        self._addr = np.zeros(0, dtype=np.uint64)  # Lance row address per row (editing.py)
        self._known_frags = set(st.fragment_ids())
        self._append_batches(st.iter_batches(list(self._INDEX_COLUMNS), with_row_address=True))
        self._loaded_version = st.version

    _INDEX_COLUMNS = ("id", "label", "weight", "vector")

    def _append_batches(self, batches) -> None:
        for batch in batches:
            self._append_rows(
                batch.column("id").to_pylist(),
                batch.column("label").to_pylist(),
                batch.column("weight").to_numpy(zero_copy_only=False),
                vectors_from_column(batch.column("vector"), self.dim),
                batch.column("_rowaddr").to_numpy().astype(np.uint64),
            )

    def _append_rows(
        self, ids: list[str], labels: list[str], weights: np.ndarray, vectors: np.ndarray, addrs: Optional[np.ndarray] = None
    ) -> None:
        start = len(self._ids)
        codes = np.empty(len(ids), dtype=np.int32)
        for j, lab in enumerate(labels):
            c = self._code_of.get(lab)
            if c is None:
                c = self._code_of[lab] = len(self._labels)
                self._labels.append(lab)
            codes[j] = c
        self._ids.extend(ids)
        self._row_of.update(zip(ids, range(start, start + len(ids))))
        self._codes = np.concatenate([self._codes, codes])
        self._weights = np.concatenate([self._weights, np.asarray(weights, dtype=np.float32)])
        # Appended rows learn their address lazily, when an edit needs it.
        self._addr = np.concatenate([self._addr, addrs if addrs is not None else np.full(len(ids), UNKNOWN_ADDR, np.uint64)])
        self._index.add(vectors)

    def _sync(self) -> None:
        """Catch up with commits made by other processes.

        Appends (the common case: another process adding images) are read
        incrementally, fragment by fragment; any other change reloads.
        """
        st = self._store
        if st.version == self._loaded_version:
            return
        appended = self._appended_fragments(self._loaded_version)
        if appended is None:
            self._load_index()
            return
        # scanner(), not to_batches(): the latter silently ignores `fragments=`.
        scan = st.dataset.scanner(columns=list(self._INDEX_COLUMNS), with_row_address=True, fragments=appended)
        self._append_batches(scan.to_batches())
        self._known_frags |= {f.fragment_id for f in appended}
        self._loaded_version = st.version

    def _appended_fragments(self, since: int) -> Optional[list]:
        """Fragments added after version ``since`` if every commit since was a pure append, else None."""
        ds = self._store.dataset
        try:
            for v in range(since + 1, ds.version + 1):
                txn = ds.read_transaction(v)
                if txn is None or type(txn.operation).__name__ != "Append":
                    return None
            before = {f.fragment_id for f in ds.checkout_version(since).get_fragments()}
        except Exception:  # e.g. the old version was erased by forget: reload instead
            return None
        return [f for f in ds.get_fragments() if f.fragment_id not in before]

    # -- properties ----------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def version(self) -> int:
        """The memory version (one per committed mutation)."""
        return self._store.version

    @property
    def dim(self) -> int:
        return self._store.dim

    @property
    def encoder_spec(self) -> Optional[EncoderSpec]:
        enc = self._store.manifest["encoder"]
        return EncoderSpec.from_dict(enc) if enc.get("preprocess") else None

    @property
    def encoder(self) -> Encoder:
        """The encoder, loaded on first use (opening a memory does not load a model)."""
        if self._encoder is None:
            name = self._store.manifest["encoder"]["name"]
            if self.encoder_spec is None:
                raise EncoderMismatchError(f"{self.path}: this memory stores precomputed {self.dim}-d vectors "
                                           "without an encoder; pass vectors, not images")
            # Weights loaded from a local folder/file: look there first (the fingerprint still decides).
            extra = self._store.manifest["encoder"].get("extra") or {}
            local = extra.get("folder") or extra.get("file")
            enc = create_encoder(name, weights=local) if local and os.path.exists(local) else create_encoder(name)
            self._check_encoder(enc)
            self._encoder = enc
        return self._encoder

    def _check_encoder(self, enc: Encoder) -> None:
        want = self._store.manifest["encoder"]
        if enc.spec.fingerprint != want.get("fingerprint"):
            raise EncoderMismatchError(
                f"{self.path}: memory was made with encoder {want['name']!r} (fingerprint {want.get('fingerprint')}), "
                f"not {enc.spec.name!r} (fingerprint {enc.spec.fingerprint}); its vectors are not comparable. "
                "Open it without an encoder argument, or build a new memory for this encoder."
            )

    def __len__(self) -> int:
        return self._index.n_alive

    def __contains__(self, record_id: str) -> bool:
        row = self._row_of.get(record_id)
        return row is not None and bool(self._index._alive[row])

    @property
    def labels(self) -> dict[str, int]:
        """Record count per label, largest first."""
        alive = self._index._alive
        counts = np.bincount(self._codes[alive], minlength=len(self._labels))
        pairs = [(self._labels[c], int(n)) for c, n in enumerate(counts) if n > 0]
        return dict(sorted(pairs, key=lambda p: (-p[1], p[0])))

    def ids(self) -> list[str]:
        alive = self._index._alive
        return [i for i, a in zip(self._ids, alive) if a]

    RECORD_COLUMNS = ("id", "label", "source", "weight", "added_at", "metadata")

    def get(self, ids: Sequence[str], *, columns: Sequence[str] = RECORD_COLUMNS) -> list[dict]:
        """Records by id, in the order asked.

        Raises
        ------
        UnknownIdError
            Listing the ids that are not in the memory (nothing else is read).
        """
        ids = [ids] if isinstance(ids, str) else list(ids)
        missing = [i for i in ids if i not in self]
        if missing:
            raise UnknownIdError(f"{len(missing)} unknown id(s): {missing[:5]}")
        if not ids:
            return []
        cols = list(dict.fromkeys(["id", *columns]))
        rows = {r["id"]: r for r in self._read(cols, sql_in("id", ids))}
        return [self._decode_record(rows[i], columns) for i in ids]

    def records(
        self,
        *,
        label: Optional[str] = None,
        where: Optional[str] = None,
        offset: int = 0,
        limit: Optional[int] = 100,
        columns: Sequence[str] = RECORD_COLUMNS,
    ) -> list[dict]:
        """Browse records (optionally one label, or a Lance SQL ``where`` filter), paged.

        Returns a list of dicts with ``columns``; ``metadata`` is decoded from JSON,
        ``vector`` (if asked) is a float32 array.
        """
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError("offset and limit must be >= 0")
        filters = [f for f in (f"label = {sql_quote(label)}" if label is not None else None, where) if f]
        flt = " AND ".join(f"({f})" for f in filters) or None
        table = self._store.dataset.to_table(columns=list(columns), filter=flt, offset=offset, limit=limit)
        return [self._decode_record(r, columns) for r in table.to_pylist()]

    def _read(self, columns: list[str], where: str) -> list[dict]:
        return self._store.dataset.to_table(columns=columns, filter=where).to_pylist()

    @staticmethod
    def _decode_record(row: dict, columns: Sequence[str]) -> dict:
        out = {c: row.get(c) for c in columns}
        if "metadata" in out and out["metadata"] is not None:
            out["metadata"] = json.loads(out["metadata"])
        if "vector" in out and out["vector"] is not None:
            out["vector"] = np.asarray(out["vector"], dtype=np.float32)
        return out

    def info(self) -> dict[str, Any]:
        """Summary: count, labels with counts, encoder, dim, version, size on disk."""
        enc = self._store.manifest["encoder"]
        return {
            "path": str(self.path),
            "count": len(self),
            "labels": self.labels,
            "encoder": enc["name"],
            "encoder_fingerprint": enc.get("fingerprint"),
            "dim": self.dim,
            "index": self._store.manifest.get("index", "Flat"),
            "version": self.version,
            "size_bytes": self._store.size_bytes(),
        }

    def history(self) -> list[dict]:
        """The audit log: one entry per mutation, oldest first."""
        return self._store.audit_entries()

    def refresh(self) -> bool:
        """Pick up versions committed by other processes; True if anything changed."""
        changed = self._store.refresh()
        self._sync()
        return changed

    def __repr__(self) -> str:
        return f"Memory(path={str(self.path)!r}, records={len(self)}, encoder={self._store.manifest['encoder']['name']!r}, version={self.version})"

    # -- adding --------------------------------------------------------------------

    def add(
        self,
        images: Union[ImageLike, Iterable[ImageLike]],
        *,
        labels: Union[str, Sequence[str], None] = None,
        ids: Optional[Sequence[str]] = None,
        source: Optional[str] = None,
        metadata: Optional[Sequence[Optional[dict]]] = None,
        skip_existing: bool = False,
        vectors: Optional[np.ndarray] = None,
        batch_size: Optional[int] = None,
        progress: bool | str = False,
        lock_timeout: float = 0.0,
    ) -> AddResult:
        """Embed images and add them as records.

        Parameters
        ----------
        images : image, sequence of images, or a folder path
            Paths, encoded bytes, PIL images or uint8 arrays. A single folder
            path adds every image below it: as an ImageFolder (label = class
            sub-folder) when ``labels`` is None, else all with ``labels``.
        labels : str or sequence of str
            One label for all images, or one per image.
        ids : sequence of str, optional
            Record ids. Default: SHA-256 of each image's bytes, so the same
            image always gets the same id and can be forgotten by content.
        source : str, optional
            Provenance stored with each record (default: the file path, if any).
        metadata : sequence of dict, optional
            JSON-serialisable metadata per image.
        skip_existing : bool, default False
            An id that already exists is an error (`DuplicateIdError`, nothing
            added) unless this is True, in which case it is skipped and listed
            in ``AddResult.skipped`` (resume an interrupted folder add this way).
        vectors : array of shape (n, dim), optional
            The images' embeddings, if already computed with this memory's
            encoder (``mem.embed(images)``), e.g. outside a lock so that
            classification is not held up; validated and normalised. The
            images are then only decoded (for ids and thumbnails).

        Every image is decoded and validated, and every id checked, *before*
        anything is written: one bad image leaves the memory unchanged. Records
        are then committed every 1,024 images, so a crash mid-way keeps what
        was committed (re-run with ``skip_existing=True`` to finish).

        Returns
        -------
        AddResult(version, added, skipped)
        """
        items, labels = self._resolve_inputs(images, labels)
        n = len(items)
        ids = _as_ids(ids, n)
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"got {n} images but {len(metadata)} metadata entries")
        if n == 0:
            return AddResult(self.version, 0)
        encoder = self.encoder
        if vectors is not None:
            vectors = as_queries(vectors, self.dim, what="vectors")
            if len(vectors) != n:
                raise ValueError(f"got {n} images but {len(vectors)} vectors")
        # Pass 1: decode-validate everything and resolve ids (cheap next to embedding).
        hashes = self._validate_images(items, progress=progress)
        ids = ids if ids is not None else hashes
        sources = [source if source is not None else (os.fspath(it) if isinstance(it, (str, os.PathLike)) else None) for it in items]
        with self._store.writing(timeout=lock_timeout):
            self._sync()
            keep = self._check_new_ids(ids, skip_existing)
            skipped = [ids[i] for i in range(n) if not keep[i]]
            sel = np.flatnonzero(keep)
            if len(sel) == 0:
                return AddResult(self.version, 0, skipped)
            todo = [items[i] for i in sel]
            added_ids: list[str] = []
            step = max(COMMIT_EVERY, int(batch_size or encoder.batch_size))
            pending: list[tuple[list, np.ndarray]] = []
            pending_n = 0
            offset = 0
            if vectors is None:
                batches = encoder.iter_batches(todo, batch_size=batch_size, progress=progress or False)
            else:
                batches = self._decoded_batches(todo, vectors[sel], step)
            for loaded, batch_vectors in batches:
                pending.append((loaded, batch_vectors))
                pending_n += len(loaded)
                if pending_n >= step:
                    offset = self._commit_images(pending, sel, offset, ids, labels, sources, metadata, added_ids)
                    pending, pending_n = [], 0
            if pending:
                self._commit_images(pending, sel, offset, ids, labels, sources, metadata, added_ids)
        return AddResult(self.version, len(added_ids), skipped, added_ids)

    @staticmethod
    def _decoded_batches(items: list, vectors: np.ndarray, step: int):
        for start in range(0, len(items), step):
            yield [load_image(it) for it in items[start : start + step]], vectors[start : start + step]

    def _commit_images(self, pending, sel, offset, ids, labels, sources, metadata, added_ids) -> int:
        loaded = [li for batch, _ in pending for li in batch]
        vectors = np.concatenate([v for _, v in pending])
        idx = sel[offset : offset + len(loaded)]
        self._commit(
            ids=[ids[i] for i in idx],
            labels=[labels[i] for i in idx],
            vectors=vectors,
            sources=[sources[i] for i in idx],
            metadata=[metadata[i] for i in idx] if metadata is not None else None,
            thumbnails=[_thumbnail(li.image) for li in loaded],
            op="add",
        )
        added_ids.extend(ids[i] for i in idx)
        return offset + len(loaded)

    def add_embeddings(
        self,
        vectors: np.ndarray,
        labels: Union[str, Sequence[str]],
        *,
        ids: Optional[Sequence[str]] = None,
        source: Optional[str] = None,
        metadata: Optional[Sequence[Optional[dict]]] = None,
        encoder: Optional[str | EncoderSpec | Encoder] = None,
        skip_existing: bool = False,
        lock_timeout: float = 0.0,
    ) -> AddResult:
        """Add precomputed embeddings as records (one commit).

        Parameters
        ----------
        vectors : array-like of shape (n, dim)
            Floating point; validated (dimension, finite, non-zero) and
            L2-normalised on the way in.
        labels : str or sequence of str of length n
        ids : sequence of str, optional
            Default: SHA-256 of each vector's float32 bytes.
        encoder : str, EncoderSpec or Encoder, optional
            Where the vectors came from. If given, it must match the memory's
            encoder (name, or full fingerprint for a spec/encoder);
            vectors from another encoder live in another space.

        Returns
        -------
        AddResult
        """
        if encoder is not None:
            self._check_vector_source(encoder)
        vecs = as_queries(vectors, self.dim, what="vectors")
        n = len(vecs)
        labels = _as_labels(labels, n)
        ids = _as_ids(ids, n)
        if ids is None:
            import hashlib

            ids = [hashlib.sha256(v.tobytes()).hexdigest() for v in vecs]
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"got {n} vectors but {len(metadata)} metadata entries")
        if n == 0:
            return AddResult(self.version, 0)
        with self._store.writing(timeout=lock_timeout):
            self._sync()
            keep = self._check_new_ids(ids, skip_existing)
            skipped = [ids[i] for i in range(n) if not keep[i]]
            sel = np.flatnonzero(keep)
            if len(sel):
                self._commit(
                    ids=[ids[i] for i in sel],
                    labels=[labels[i] for i in sel],
                    vectors=vecs[sel],
                    sources=[source] * len(sel),
                    metadata=[metadata[i] for i in sel] if metadata is not None else None,
                    thumbnails=None,
                    op="add_embeddings",
                )
        return AddResult(self.version, len(sel), skipped, [ids[i] for i in sel])

    def _check_vector_source(self, encoder) -> None:
        want = self._store.manifest["encoder"]
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
                f"vectors come from encoder {got}, but {self.path} holds vectors from {want['name']!r} "
                f"(fingerprint {want.get('fingerprint')}); they are not comparable"
            )

    def _resolve_inputs(self, images, labels) -> tuple[list, list[str]]:
        if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
            if labels is None:
                paths, folder_labels = scan_folder(images)
                return list(paths), folder_labels
            from .images import list_images

            paths = list_images(images)
            if not paths:
                raise ImageError(f"{images}: no images found")
            return list(paths), _as_labels(labels, len(paths))
        items = as_list(images)
        return items, _as_labels(labels, len(items))

    def _validate_images(self, items: list, *, progress: bool | str) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        from .progress import progress_bar

        def check(item) -> str:
            return load_image(item).sha256

        with ThreadPoolExecutor(max_workers=2) as pool, progress_bar(
            "validating" if progress else False, total=len(items), unit="img"
        ) as bar:
            hashes = []
            for h in pool.map(check, items):
                hashes.append(h)
                bar.advance()
        return hashes

    def _check_new_ids(self, ids: list[str], skip_existing: bool) -> np.ndarray:
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
        keep = np.array([(rid not in self) and seen[rid] == i for i, rid in enumerate(ids)], dtype=bool)
        existing = [rid for rid in ids if rid in self]
        if existing and not skip_existing:
            raise DuplicateIdError(
                f"{len(existing)} id(s) already in the memory, e.g. {existing[:3]}; nothing was added. "
                "Pass skip_existing=True (CLI: --skip-existing) to add only the new ones."
            )
        return keep

    def _commit(self, *, ids, labels, vectors, sources, metadata, thumbnails, op) -> None:
        n = len(ids)
        dim = self.dim
        meta = [json.dumps(m, sort_keys=True) if m is not None else None for m in (metadata or [None] * n)]
        table = pa.Table.from_arrays(
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
        self._store.append(table)
        self._append_rows(ids, labels, np.ones(n, np.float32), vectors, self._appended_addresses(n))
        self._loaded_version = self._store.version
        self._store.audit(op, n=n, ids=ids, labels=sorted(set(labels)))
        self._after_mutation()

    # -- querying ------------------------------------------------------------------

    def embed(self, images: Union[ImageLike, Iterable[ImageLike]], *, progress: bool | str = False) -> np.ndarray:
        """Embed images with the memory's encoder: (n, dim) float32, L2-normalised."""
        return self.encoder.embed(as_list(images), progress=progress)

    def _query_vectors(self, queries, progress) -> np.ndarray:
        if isinstance(queries, np.ndarray) and queries.dtype.kind == "f" and queries.ndim in (1, 2) and queries.shape[-1] == self.dim:
            return as_queries(queries, self.dim)
        if isinstance(queries, np.ndarray) and queries.dtype.kind == "f" and queries.ndim == 2:
            raise VectorError(f"query vectors have dimension {queries.shape[1]}, but this memory holds {self.dim}-d vectors")
        return as_queries(self.embed(queries, progress=progress), self.dim)

    def kneighbors(self, queries, *, k: int = 50, progress: bool | str = False, **search_params) -> tuple[np.ndarray, list[list[Optional[str]]]]:
        """Nearest records of each query.

        Returns
        -------
        similarities : float32 array of shape (n_queries, k), descending
        ids : list of lists of record ids (None where the memory has fewer than k)
        """
        q = self._query_vectors(queries, progress)
        sims, rows = self._index.search(q, k, **search_params)
        return sims, [[self._ids[r] if r >= 0 else None for r in row] for row in rows]

    def _search(self, queries, k: int, progress, search_params) -> tuple[np.ndarray, np.ndarray]:
        self._check_k(k)
        q = self._query_vectors(queries, progress)
        return self._index.search(q, k, **search_params)

    @staticmethod
    def _check_k(k) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}")

    def _codes_weights(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        present = rows >= 0
        if not present.any():  # e.g. an empty memory, where row 0 does not exist
            return np.full(rows.shape, -1, np.int64), np.zeros(rows.shape, np.float32)
        safe = np.where(present, rows, 0)
        codes = np.where(present, self._codes[safe], -1)
        rec_w = np.where(present, self._weights[safe], 0.0)
        return codes, rec_w

    def classify(
        self,
        queries,
        *,
        k: int = 50,
        vote: str = "rank",
        progress: bool | str = False,
        search_params: Optional[dict] = None,
        abstain_below: Optional[float] = None,
        **vote_params: float,
    ) -> list[Prediction]:
        """Classify queries by their k nearest records voting.

        Parameters
        ----------
        queries : image(s) or array of shape (n, dim)
            Images (paths, bytes, PIL, uint8 arrays) are embedded with the
            memory's encoder; a float array is taken as embeddings.
        k : int, default 50
        vote : {"rank", "plurality", "distance", "softmax"}, default "rank"
        abstain_below : float in [0, 1], optional
            Abstain when the winner's vote share (`Prediction.confidence`) is
            below this: the prediction's ``label`` is then "unknown"
            (`visual_memory.results.UNKNOWN`) and ``winner`` keeps the vote's choice.
        **vote_params : alpha (rank, 2), tau (softmax, 0.07), xi (distance, 1)

        Returns
        -------
        list of Prediction, one per query (all queries are one matrix product).
        Each carries confidence and novelty scores (``confidence``,
        ``plurality_count``, ``agreement``, ``ood_score``).
        """
        voting.check_vote(vote, vote_params)
        if abstain_below is not None and not (isinstance(abstain_below, (int, float)) and 0.0 <= abstain_below <= 1.0):
            raise ValueError(f"abstain_below must be a vote share in [0, 1]; got {abstain_below!r}")
        sims, rows = self._search(queries, k, progress, search_params or {})
        codes, rec_w = self._codes_weights(rows)
        contrib = voting.neighbor_weights(sims, vote, **vote_params) * rec_w
        winners, totals = voting.tally(codes, contrib, len(self._labels))
        version = self.version
        out = []
        labels = self._labels
        ids = self._ids
        n_classes = len(self.labels)
        # Python work per query dominates at 1,000s of queries, so ids, labels and
        # scores are looked up for all queries at once (C-level map, no per-item branches).
        all_ids, all_labels = _lookup(ids, rows), _lookup(labels, codes)
        all_scores = _score_dicts(totals, labels)
        for q, win in enumerate(winners.tolist()):
            out.append(
                Prediction(
                    label=labels[win] if win >= 0 else None,
                    scores=all_scores[q],
                    k=k,
                    vote=vote,
                    version=version,
                    ids=all_ids[q * k : (q + 1) * k],
                    labels=all_labels[q * k : (q + 1) * k],
                    sims=sims[q],
                    weights=rec_w[q],
                    contrib=contrib[q],
                    n_classes=n_classes,
                    abstain_below=abstain_below,
                )
            )
        return out

    def explain(self, query, *, k: int = 10, vote: str = "rank", read_sources: bool = True, **vote_params):
        """Classify one image (or vector) and gather its neighbours' thumbnails and the vote.

        Returns an `visual_memory.explain.Explanation`; ``.to_html()`` renders
        it as one self-contained page. See `visual_memory.explain.explain`.
        """
        from .explain import explain

        return explain(self, query, k=k, vote=vote, read_sources=read_sources, **vote_params)

    def predict(self, queries, *, k: int = 50, vote: str = "rank", **vote_params) -> np.ndarray:
        """Labels only (scikit-learn style): object array of shape (n_queries,)."""
        return np.array([p.label for p in self.classify(queries, k=k, vote=vote, **vote_params)], dtype=object)

    def predict_every_k(
        self, queries, *, ks: Sequence[int], votes: Sequence[str] = voting.VOTES, progress: bool | str = False,
        vote_params: Optional[dict[str, dict]] = None,
    ) -> dict[str, np.ndarray]:
        """Predicted labels for every vote at every k from one search.

        Returns
        -------
        dict vote -> object array of shape (n_queries, len(ks))
        """
        ks = sorted({int(k) for k in ks})
        for k in ks:
            self._check_k(k)
        for v in votes:
            voting.check_vote(v, (vote_params or {}).get(v))
        sims, rows = self._search(queries, max(ks), progress, {})
        codes, rec_w = self._codes_weights(rows)
        labels = np.array(self._labels + [None], dtype=object)
        out = {}
        for v in votes:
            contrib = voting.neighbor_weights(sims, v, **(vote_params or {}).get(v, {})) * rec_w
            out[v] = labels[voting.predict_every_k(codes, contrib, len(self._labels), ks)]
        return out

    def prune(self, *, mode: str = "soft", threshold: Optional[int] = None, k: Optional[int] = None, c: float = 1.75,
              progress: bool | str = False, lock_timeout: float = 0.0):
        """Lower the vote weight of records that mislead their neighbours (audited, reversible).

        ``mode``: "soft" (weight min(1, c / (1 + wrong)) over the top 10),
        "hard" (weight 0 where wrong >= threshold, top 100) or "undo". See
        `visual_memory.prune.prune`. Returns a `PruneResult`.
        """
        from .prune import prune

        return prune(self, mode=mode, threshold=threshold, k=k, c=c, progress=progress, lock_timeout=lock_timeout)

    def label_issues(self, *, k: int = 10, limit: Optional[int] = 20, progress: bool | str = False):
        """Records most likely mislabelled, most suspicious first (see `visual_memory.prune.label_issues`)."""
        from .prune import label_issues

        return label_issues(self, k=k, limit=limit, progress=progress)

    def evaluate(
        self,
        queries,
        labels: Optional[Sequence[str]] = None,
        *,
        ks: Sequence[int] = (1, 10, 20, 50, 100),
        votes: Sequence[str] = voting.VOTES,
        progress: bool | str = False,
    ) -> EvalResult:
        """Top-1 accuracy of each vote at each k.

        Parameters
        ----------
        queries : folder path (ImageFolder), images, or array of shape (n, dim)
        labels : sequence of str, optional
            True labels; taken from the folder when ``queries`` is a folder.
        """
        if isinstance(queries, (str, os.PathLike)) and Path(queries).is_dir():
            from .cache import embed_folder

            vectors, labels, _ = embed_folder(self.encoder, queries, progress=progress)
            queries = vectors
        if labels is None:
            raise ValueError("labels are required unless queries is an ImageFolder")
        labels = np.asarray(list(labels), dtype=object)
        preds = self.predict_every_k(queries, ks=ks, votes=votes, progress=progress)
        ks = sorted({int(k) for k in ks})
        acc = {v: {k: float(np.mean(p[:, i] == labels)) for i, k in enumerate(ks)} for v, p in preds.items()}
        return EvalResult(n_queries=len(labels), accuracy=acc, version=self.version)


# -- module-level constructors -----------------------------------------------------


def create(
    path: str | os.PathLike,
    *,
    encoder: Optional[str | Encoder] = DEFAULT_ENCODER,
    index: str = "Flat",
    dim: Optional[int] = None,
) -> Memory:
    """Create an empty memory directory.

    Parameters
    ----------
    path : str or PathLike
        A new or empty directory.
    encoder : str, Encoder or None, default "efficientnet-lite0"
        A registered encoder name (see `vismem encoders`) or an encoder
        instance; its spec (preprocessing included) is written to the
        manifest. None makes a vectors-only memory of dimension ``dim``.
    index : str, default "Flat"
        FAISS index-factory string; "Flat" is exact search.

    Raises
    ------
    MemoryExistsError
        If ``path`` already holds a memory or other files.
    """
    VectorIndex(1 if dim is None else dim, index)  # validate the factory string before touching disk
    if encoder is None:
        if not dim or dim < 1:
            raise ValueError("a memory without an encoder needs dim=<vector dimension>")
        spec = {"name": f"vectors-{dim}d", "dim": int(dim), "fingerprint": f"vectors-{dim}d"}
        return Memory(Store.create(path, encoder=spec, index=index))
    enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
    if not isinstance(enc, Encoder):
        raise TypeError(f"encoder must be a registered name or an Encoder; got {type(encoder).__name__}")
    if dim is not None and dim != enc.dim:
        raise ValueError(f"dim={dim} disagrees with encoder {enc.name!r} ({enc.dim}-d)")
    return Memory(Store.create(path, encoder=enc.spec.to_dict(), index=index), enc)


def open(  # noqa: A001 - mirrors lance.dataset / io.open naming users expect
    path: str | os.PathLike,
    *,
    version: Optional[int | str] = None,
    encoder: Optional[str | Encoder] = None,
    read_only: bool = False,
) -> Memory:
    """Open an existing memory.

    Parameters
    ----------
    path : str or PathLike
    version : int or str, optional
        Read an earlier version (read-only): a version number or a tag name
        (`Memory.tag`). Versions a `forget` erased cannot be opened.
    encoder : str or Encoder, optional
        Assert the memory was made with this encoder (raises
        `EncoderMismatchError` if not); by default the manifest's encoder is
        loaded lazily on the first image operation.

    Raises
    ------
    NotAMemoryError
        If ``path`` is not a memory directory.
    """
    store = Store.open(path, version=version, read_only=read_only)
    mem = Memory(store)
    if not store.read_only:
        mem._finish_pending_forget()
    if encoder is not None:
        want = store.manifest["encoder"]
        if isinstance(encoder, str):
            if encoder != want["name"]:
                raise EncoderMismatchError(
                    f"{path}: memory was made with encoder {want['name']!r}, not {encoder!r}; "
                    "vectors from different encoders are not comparable"
                )
        else:
            mem._check_encoder(encoder)
            mem._encoder = encoder
    return mem
