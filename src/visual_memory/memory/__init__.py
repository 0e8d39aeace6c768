"""`Memory`: the facade users hold. Every verb delegates to a room below.

images -> encoders -> store -> index -> vote. The facade wires them: a
`MemoryState` keeps the store, the row table and the index in step;
`adding` and `editing` implement the verbs; this module documents them and
does no search maths or I/O of its own.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from .. import vote as voting
from ..encoders import DEFAULT_ENCODER, Encoder, EncoderSpec, create_encoder
from ..errors import EncoderMismatchError, SelectorError, UnknownIdError, VectorError
from ..images import ImageLike, as_list
from ..index import as_queries, check_k, validate_spec
from ..results import AddResult, EditResult, EvalResult, ForgetReceipt, OptimizeResult, Prediction, RemoveResult
from ..rows import RowTable
from ..store import Store, sql_in, sql_quote
from . import adding, editing
from .preview import EditPreview
from .state import MemoryState

log = logging.getLogger(__name__)

IdsLike = editing.IdsLike


def _clamped_ks(ks: Sequence[int], width: int) -> tuple[list[int], list[int]]:
    """The distinct ks searchable in ``width`` neighbours, and where each of ``ks`` reads its result.

    >>> _clamped_ks([1, 10, 100], 5)
    ([1, 5], [0, 1, 1])
    """
    used = sorted({min(k, width) for k in ks})
    return used, [used.index(min(k, width)) for k in ks]


def _score_dicts(totals: np.ndarray, labels: list[str], reached: np.ndarray) -> list[dict[str, float]]:
    """Per query, {label: total} for labels with a vote in the vote's order (`visual_memory.vote.Tally`):
    highest first, equal totals by the position where they were reached, so the winner comes first."""
    qi, ci = np.nonzero(totals)
    vals = totals[qi, ci]
    order = np.lexsort((reached[qi, ci], -vals, qi))
    names = list(map(labels.__getitem__, ci[order].tolist()))
    vals = vals[order].tolist()
    bounds = np.concatenate([[0], np.cumsum(np.bincount(qi, minlength=len(totals)))]).tolist()
    return [dict(zip(names[a:b], vals[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


def encoder_from_manifest(want: dict, *, where) -> Encoder:
    """Build the encoder a memory's manifest names (local weights first), checking its fingerprint."""
    if not want.get("preprocess"):
        raise EncoderMismatchError(f"{where}: this memory stores precomputed {want.get('dim')}-d vectors "
                                   "without an encoder; pass vectors, not images")
    # Weights loaded from a local folder/file: look there first (the fingerprint still decides).
    extra = want.get("extra") or {}
    local = extra.get("folder") or extra.get("file")
    enc = create_encoder(want["name"], weights=local) if local and os.path.exists(local) else create_encoder(want["name"])
    check_encoder(want, enc, where=where)
    return enc


def check_encoder(want: dict, enc: Encoder, *, where) -> None:
    """Refuse an encoder whose fingerprint is not the manifest's."""
    if enc.spec.fingerprint != want.get("fingerprint"):
        raise EncoderMismatchError(
            f"{where}: memory was made with encoder {want['name']!r} (fingerprint {want.get('fingerprint')}), "
            f"not {enc.spec.name!r} (fingerprint {enc.spec.fingerprint}); its vectors are not comparable. "
            "Open it without an encoder argument, or build a new memory for this encoder."
        )


class Memory:
    """An editable kNN image classifier over a durable memory directory.

    Create one with `visual_memory.create`, open one with `visual_memory.open`.

    Examples
    --------
    >>> import numpy as np, tempfile, visual_memory as vm
    >>> mem = vm.create(tempfile.mkdtemp() + "/m", encoder=None, dim=2)
    >>> mem.add_embeddings(np.array([[1.0, 0.0], [0.0, 1.0]]), labels=["cat", "dog"], ids=["a", "b"]).added
    2
    >>> mem.classify(np.array([[0.9, 0.1]]), k=1)[0].label
    'cat'
    """

    def __init__(self, store: Store, encoder: Optional[Encoder] = None, *, state: Optional[MemoryState] = None) -> None:
        self._state = state if state is not None else MemoryState(store)
        self._encoder = encoder

    @property
    def _store(self) -> Store:
        return self._state.store

    # -- properties ----------------------------------------------------------------

    @property
    def path(self) -> Path | str:
        """The memory directory (a `Path`), or its object-store URI (a str)."""
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
            self._encoder = encoder_from_manifest(self._store.manifest["encoder"], where=self.path)
        return self._encoder

    def _check_encoder(self, enc: Encoder) -> None:
        check_encoder(self._store.manifest["encoder"], enc, where=self.path)

    def __len__(self) -> int:
        return self._state.rows.n_alive

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._state.rows

    @property
    def labels(self) -> dict[str, int]:
        """Record count per label, largest first."""
        self._fresh()
        return self._state.rows.label_counts()

    def ids(self) -> list[str]:
        """Ids of the live records, in row order."""
        self._fresh()
        return self._state.rows.alive_ids()

    #: Before each read (`search`, `classify`, `get`, `records`, `ids`, `labels`,
    #: `info`, `vectors`), check whether another process erased old versions
    #: (`forget`, `optimize` with cleanup) and if so move to the newest version,
    #: so no read returns a forgotten record once the forget has returned. The
    #: check is one small file read (a GET on object storage). ``len()`` and
    #: ``in`` answer from the loaded version without it. A caller that shares
    #: one Memory between threads (the server) sets this False and calls
    #: `follow_erasures` under its own lock instead.
    auto_follow_erasures: bool = True

    def erased_since_loaded(self) -> bool:
        """Whether another process erased old versions since this memory last moved (read-only check)."""
        return self._store.erased_since_loaded()

    def follow_erasures(self) -> bool:
        """Move to the newest version if another process erased old ones; True if it did."""
        return self._state.follow_erasures()

    def _fresh(self) -> None:
        if self.auto_follow_erasures:
            self._state.follow_erasures()
        self._state.sync()

    @property
    def rows(self) -> RowTable:
        """The row table: ids, label codes, weights and row addresses of the index's rows.

        Read-only for callers; `search` returns rows into it. ``rows.version``
        is the memory version it describes.
        """
        return self._state.rows

    @property
    def index(self) -> dict[str, Any]:
        """What the search index is: its spec, size, and whether it is exact."""
        return self._state.index.stats()

    def latest_version(self) -> int:
        """The newest committed version on disk (another process may have made it; `refresh` loads it)."""
        return self._store.latest_version()

    def vectors(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """Stored vectors of these rows (default: every live record, in row order), float32 (n, dim).

        Always the vectors as stored (from the records table, or from an
        exact in-RAM index, which holds them bit for bit), never a lossy
        index's reconstruction.
        """
        self._fresh()
        return self._state.vectors(self._state.rows.alive_rows() if rows is None else rows)

    RECORD_COLUMNS = ("id", "label", "source", "weight", "added_at", "metadata")

    def get(self, ids: Sequence[str], *, columns: Sequence[str] = RECORD_COLUMNS) -> list[dict]:
        """Records by id, in the order asked.

        Raises
        ------
        UnknownIdError
            Listing the ids that are not in the memory (nothing else is read).
        """
        ids = [ids] if isinstance(ids, str) else list(ids)
        self._fresh()
        missing = [i for i in ids if i not in self]
        if missing:
            raise UnknownIdError(f"{len(missing)} unknown id(s): {missing[:5]}")
        if not ids:
            return []
        cols = list(dict.fromkeys(["id", *columns]))
        rows = {r["id"]: r for r in self._read(cols, sql_in("id", ids))}
        gone = [i for i in ids if i not in rows]  # forgotten by another process while this read ran
        if gone:
            raise UnknownIdError(f"{len(gone)} unknown id(s): {gone[:5]}")
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
        self._fresh()
        table = self._store.read_table(list(columns), where=flt, offset=offset, limit=limit)
        return [self._decode_record(r, columns) for r in table.to_pylist()]

    def _read(self, columns: list[str], where: str) -> list[dict]:
        return self._store.read_table(columns, where=where).to_pylist()

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
        self._fresh()
        enc = self._store.manifest["encoder"]
        return {
            "path": str(self.path),
            "count": len(self),
            "labels": self.labels,
            "encoder": enc["name"],
            "encoder_fingerprint": enc.get("fingerprint"),
            "dim": self.dim,
            "index": self._store.manifest.get("index", "Flat"),
            "index_stats": self._state.index.stats(),
            "index_note": self._state.index_note(),
            "version": self.version,
            "size_bytes": self._store.size_bytes(),
        }

    def history(self) -> list[dict]:
        """The audit log: one entry per mutation, oldest first."""
        return self._store.audit_entries()

    def close(self) -> None:
        """Release what the memory holds beyond this process's RAM (the shard actors of a sharded memory).

        Nothing is written; a sharded memory cannot search after it. A plain
        memory holds nothing to release.
        """
        self._state.close()

    def refresh(self) -> bool:
        """Pick up versions committed by other processes; True if anything changed."""
        changed = self._store.refresh()
        self._state.sync()
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
        dry_run: bool = False,
        probe=None,
        ray: Optional[str] = None,
        workers: Optional[int] = None,
    ) -> Union[AddResult, EditPreview]:
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
        ray : {"local", "auto"} or "host:port", optional
            Embed on a Ray cluster (see below): ``local`` starts Ray in this
            process, ``auto`` uses ``RAY_ADDRESS``.
        workers : int, optional
            Embedding actors with ``ray`` (default: one per cluster CPU);
            ``batch_size`` is then the images per Ray block (one data file each).

        Every image is decoded and validated, and every id checked, *before*
        anything is written: one bad image leaves the memory unchanged. Records
        are then committed every 1,024 images, so a crash mid-way keeps what
        was committed (re-run with ``skip_existing=True`` to finish).
        dry_run : bool, default False
            Validate and check ids exactly as the add would, write nothing, and
            return an `EditPreview` of the records it would add (and skip).
        probe : folder, images or array of shape (n, dim), optional
            With ``dry_run``: queries whose predictions the preview compares
            before and after (k=50, rank vote; `EditPreview.with_probe` for others).
            The images to add are embedded only then.

        With ``ray``, the images are embedded on a Ray cluster
        (`visual_memory.distributed.ingest`): ``images`` are then folders,
        image files, ``.parquet``/``.csv`` tables of paths or webdataset
        ``.tar`` files. The same checks run first; all records are committed
        as one version with one audit line; an interrupted run resumes when
        run again.

        Returns
        -------
        AddResult(version, added, skipped), or EditPreview with ``dry_run``
        """
        if ray is not None:
            if vectors is not None or metadata is not None or dry_run:
                raise ValueError("ray= embeds images on the cluster; vectors=, metadata= and dry_run= are not supported with it")
            from ..distributed import ingest

            return ingest.add_images(self._state, images, labels=labels, ids=ids, source=source,
                                     skip_existing=skip_existing, address=ray, workers=workers,
                                     block_rows=batch_size or ingest.BLOCK_ROWS, progress=progress,
                                     lock_timeout=lock_timeout)
        self._check_probe(dry_run, probe)
        result = adding.add_images(
            self._state, self.encoder, images, labels=labels, ids=ids, source=source, metadata=metadata,
            skip_existing=skip_existing, vectors=vectors, batch_size=batch_size, progress=progress, lock_timeout=lock_timeout,
            dry_run=dry_run,
        )
        return self._probed(result, probe)

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
        dry_run: bool = False,
        probe=None,
    ) -> Union[AddResult, EditPreview]:
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
        dry_run, probe
            As `add`.

        Returns
        -------
        AddResult, or EditPreview with ``dry_run``
        """
        self._check_probe(dry_run, probe)
        result = adding.add_embeddings(
            self._state, vectors, labels, ids=ids, source=source, metadata=metadata, encoder=encoder,
            skip_existing=skip_existing, lock_timeout=lock_timeout, dry_run=dry_run,
        )
        return self._probed(result, probe)

    # -- dry runs ------------------------------------------------------------------

    @staticmethod
    def _check_probe(dry_run: bool, probe) -> None:
        if probe is not None and not dry_run:
            raise ValueError("probe= goes with dry_run=True: it shows which predictions an edit *would* change")

    def probe_vectors(self, probe) -> tuple[np.ndarray, Optional[list[str]]]:
        """Embeddings of probe queries, and a name per probe (its file) where it has one.

        ``probe`` is a folder (every image below it, sorted), one image or a
        sequence of images (paths, bytes, PIL, uint8 arrays), or a float array
        of shape (n, dim). Image files are embedded through the embedding cache.
        """
        from ..cache import embed_paths
        from ..images import describe, list_images

        if isinstance(probe, np.ndarray) and probe.dtype.kind == "f":
            return as_queries(probe, self.dim, what="probe vectors"), None
        if isinstance(probe, (str, os.PathLike)) and Path(probe).is_dir():
            items = list_images(probe)
            if not items:
                raise ValueError(f"{probe}: no images found to probe with")
        else:
            items = as_list(probe)
            if not items:
                raise ValueError("probe is empty: give a folder, images or vectors")
        names = [describe(it) for it in items]
        if all(isinstance(it, (str, os.PathLike)) for it in items):
            return embed_paths(self.encoder, [Path(it) for it in items]), names
        return self.embed(items), names

    def _probed(self, result, probe):
        if probe is None or not isinstance(result, EditPreview):
            return result
        vectors, names = self.probe_vectors(probe)
        return result.with_probe(vectors, names=names)

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

    def search(self, queries, *, k: int = 50, params: Optional[dict] = None,
               progress: bool | str = False) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest records of each query, as rows of `rows` (FAISS's ``search -> (D, I)``).

        Parameters
        ----------
        queries : image(s) or float array of shape (n, dim)
        k : int, default 50
            At most `visual_memory.index.MAX_K`; clamped to ``len(self)``
            (there are no more neighbours to find).
        params : dict, optional
            Per-call index parameters (``nprobe``, ``efSearch``; ``rerank``: candidates
            per neighbour a compressed index re-ranks with the stored vectors,
            default 4, 0 = off); exact search takes none.

        Returns
        -------
        similarities : float32 array of shape (n_queries, min(k, len(self))), descending; -inf pads
        rows : int64 array of the same shape, rows of `rows`; -1 pads (an approximate
            index may find fewer; an empty memory gives one column of pads)
        """
        check_k(k)
        q = self._query_vectors(queries, progress)
        self._fresh()
        return self._state.search(q, max(1, min(k, len(self))), params=params)

    def kneighbors(self, queries, *, k: int = 50, progress: bool | str = False,
                   **search_params) -> tuple[np.ndarray, list[list[Optional[str]]]]:
        """Nearest records of each query.

        Returns
        -------
        similarities : float32 array of shape (n_queries, min(k, len(self))), descending
        ids : list of lists of record ids (None where fewer were found)
        """
        sims, rows = self.search(queries, k=k, params=search_params or None, progress=progress)
        return sims, self._state.rows.id_lists(rows)

    def classify(
        self,
        queries,
        *,
        k: int = 50,
        vote: str = "rank",
        progress: bool | str = False,
        search_params: Optional[dict] = None,
        abstain_below: Optional[float] = None,
        rerank=None,
        **vote_params: float,
    ) -> list[Prediction]:
        """Classify queries by their k nearest records voting.

        Parameters
        ----------
        queries : image(s) or array of shape (n, dim)
            Images (paths, bytes, PIL, uint8 arrays) are embedded with the
            memory's encoder; a float array is taken as embeddings.
        k : int, default 50
            Neighbours that vote; clamped to ``len(self)`` (``Prediction.k``
            is the k used), at most `visual_memory.index.MAX_K`.
        vote : {"rank", "plurality", "distance", "softmax"}, default "rank"
        abstain_below : float in [0, 1], optional
            Abstain when the winner's vote share (`Prediction.confidence`) is
            below this: the prediction's ``label`` is then "unknown"
            (`visual_memory.results.UNKNOWN`) and ``winner`` keeps the vote's choice.
        rerank : Reranker, optional
            After the vote, a vision-language model chooses among the shown
            neighbours' labels (`visual_memory.rerank.VLMReranker`); each
            prediction gets ``.rerank`` and, unless it fell back, the model's
            ``label``. Needs the query images, not vectors.
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
        sims, rows = self.search(queries, k=k, params=search_params, progress=progress)
        width, k = rows.shape[1], min(k, len(self))
        table = self._state.rows
        codes, rec_w = table.codes_weights(rows)
        contrib = voting.contributions(sims, vote, rec_w, **vote_params)
        labels = table.labels.names
        winners, totals, reached = voting.tally(codes, contrib, len(labels))
        version = self.version
        out = []
        n_classes = len(self.labels)
        # Python work per query dominates at 1,000s of queries, so ids, labels and
        # scores are looked up for all queries at once (C-level map, no per-item branches).
        all_ids, all_labels = table.lookup_ids(rows), table.labels.decode(codes).ravel().tolist()
        all_scores = _score_dicts(totals, labels, reached)
        for q, win in enumerate(winners.tolist()):
            out.append(
                Prediction(
                    label=labels[win] if win >= 0 else None,
                    scores=all_scores[q],
                    k=k,
                    vote=vote,
                    version=version,
                    ids=all_ids[q * width : (q + 1) * width],
                    labels=all_labels[q * width : (q + 1) * width],
                    sims=sims[q],
                    weights=rec_w[q],
                    contrib=contrib[q],
                    n_classes=n_classes,
                    abstain_below=abstain_below,
                )
            )
        if rerank is not None:
            from ..rerank.reranker import rerank_queries

            rerank_queries(rerank, self, queries, out, progress=progress)
        return out

    def explain(self, query, *, k: int = 10, vote: str = "rank", read_sources: bool = True, **vote_params):
        """Classify one image (or vector) and gather its neighbours' thumbnails and the vote.

        Returns an `visual_memory.explain.Explanation`; ``.to_html()`` renders
        it as one self-contained page. See `visual_memory.explain.explain`.
        """
        from ..explain import explain

        return explain(self, query, k=k, vote=vote, read_sources=read_sources, **vote_params)

    def predict(self, queries, *, k: int = 50, vote: str = "rank", **vote_params) -> np.ndarray:
        """Labels only (scikit-learn style): object array of shape (n_queries,)."""
        return np.array([p.label for p in self.classify(queries, k=k, vote=vote, **vote_params)], dtype=object)

    def as_estimator(self, *, n_neighbors: int = 50, vote: str = "rank", **vote_params: float):
        """A fitted scikit-learn classifier over this memory's records (`visual_memory.sklearn`).

        ``predict(X)`` on embeddings equals ``classify(X, k=n_neighbors,
        vote=vote)``'s labels; ``predict_proba`` gives each label's share of
        the vote; ``classes_`` are the memory's labels, sorted. It sees later
        edits to this `Memory` at once. Needs scikit-learn (the ``sklearn`` extra).

        Parameters
        ----------
        n_neighbors : int, default 50
        vote : str, default "rank"
        **vote_params : alpha (rank), tau (softmax), xi (distance)

        Returns
        -------
        visual_memory.sklearn.VisualMemoryClassifier
        """
        from ..sklearn import VisualMemoryClassifier

        return VisualMemoryClassifier.from_memory(self, n_neighbors=n_neighbors, vote=vote, **vote_params)

    def predict_every_k(
        self, queries, *, ks: Sequence[int], votes: Sequence[str] = voting.VOTES, progress: bool | str = False,
        vote_params: Optional[dict[str, dict]] = None,
    ) -> dict[str, np.ndarray]:
        """Predicted labels for every vote at every k from one search.

        A k above the memory's size votes with every record (as k = ``len(self)``).

        Returns
        -------
        dict vote -> object array of shape (n_queries, len(ks)), columns in ascending k
        """
        ks = sorted({check_k(k) for k in ks})
        for v in votes:
            voting.check_vote(v, (vote_params or {}).get(v))
        sims, rows = self.search(queries, k=max(ks), progress=progress)
        used, column = _clamped_ks(ks, rows.shape[1])
        table = self._state.rows
        codes, rec_w = table.codes_weights(rows)
        out = {}
        for v in votes:
            contrib = voting.contributions(sims, v, rec_w, **(vote_params or {}).get(v, {}))
            out[v] = table.labels.decode(voting.predict_every_k(codes, contrib, len(table.labels), used)[:, column])
        return out

    def prune(self, *, mode: str = "soft", threshold: Optional[int] = None, k: Optional[int] = None, c: float = 1.75,
              progress: bool | str = False, lock_timeout: float = 0.0, dry_run: bool = False, probe=None):
        """Lower the vote weight of records that mislead their neighbours (audited, reversible).

        ``mode``: "soft" (weight min(1, c / (1 + wrong)) over the top 10),
        "hard" (weight 0 where wrong >= threshold, top 100) or "undo". See
        `visual_memory.prune.plan`. Returns a `PruneResult`; the change is one
        version and one audit line (op ``"prune"``, with the parameters).
        ``dry_run`` returns an `EditPreview` of the weights that would change
        (a cached self-neighbour result is used, none is written); ``probe``
        as in `add`.
        """
        from .. import prune as pruning
        from .preview import reweighting

        self._check_probe(dry_run, probe)
        plan = pruning.plan(self, mode=mode, threshold=threshold, k=k, c=c, progress=progress,
                            cache="read" if dry_run else True)
        if dry_run:
            if not plan.ids:  # nothing would change (and reweight refuses an empty id list)
                with self._state.peeking():
                    empty = reweighting(self._state, np.zeros(0, np.int64), np.zeros(0, np.float32), op="prune")
                return self._probed(empty, probe)
            return self._probed(editing.reweight(self._state, plan.ids, plan.weights, op="prune", dry_run=True), probe)
        before = self.version
        changed = 0
        if plan.ids:
            changed = editing.reweight(self._state, plan.ids, plan.weights, op="prune", audit=plan.audit,
                                       lock_timeout=lock_timeout).changed
        return pruning.PruneResult(self.version, plan.mode, changed, plan.pruned, before, plan.params)

    def label_issues(self, *, k: int = 100, limit: Optional[int] = 20, progress: bool | str = False):
        """Records most likely mislabelled, most suspicious first (see `visual_memory.prune.label_issues`)."""
        from ..prune import label_issues

        return label_issues(self, k=k, limit=limit, progress=progress)

    def evaluate(
        self,
        queries,
        labels: Optional[Sequence[str]] = None,
        *,
        ks: Sequence[int] = (1, 10, 20, 50, 100),
        votes: Sequence[str] = voting.VOTES,
        progress: bool | str = False,
        search: str = "exact",
    ) -> EvalResult:
        """Top-1 accuracy of each vote at each k.

        Parameters
        ----------
        queries : folder path (ImageFolder), images, or array of shape (n, dim)
        labels : sequence of str, optional
            True labels; taken from the folder when ``queries`` is a folder.
        ks : sequence of int
            A k above the memory's size is scored as k = ``len(self)`` (every record votes).
        search : {"exact", "index"}, default "exact"
            Exact search over the stored vectors (what the paper reports), or
            the memory's own (possibly approximate) index. The result's
            ``extra["search"]`` says which index answered.
        """
        if search not in ("exact", "index"):
            raise ValueError(f"search must be 'exact' or 'index'; got {search!r}")
        if isinstance(queries, (str, os.PathLike)) and Path(queries).is_dir():
            from ..cache import embed_folder

            vectors, labels, _ = embed_folder(self.encoder, queries, progress=progress)
            queries = vectors
        if labels is None:
            raise ValueError("labels are required unless queries is an ImageFolder")
        labels = [str(x) for x in labels]
        ks = sorted({check_k(k) for k in ks})
        for v in votes:
            voting.check_vote(v)
        used_index = self._state.index.spec
        if search == "exact" and not self._state.index.is_exact:
            from . import indexing

            q = self._query_vectors(queries, progress)
            self._fresh()
            sims, rows, _ = indexing.exact_streamed(self._state, q, max(1, min(max(ks), len(self))), progress=progress)
            used_index = "Flat (exact, over the stored vectors)"
        else:
            sims, rows = self.search(queries, k=max(ks), progress=progress)
        if len(labels) != len(rows):
            raise ValueError(f"got {len(rows)} queries but {len(labels)} labels")
        table = self._state.rows
        codes, rec_w = table.codes_weights(rows)
        # A true label the memory has never seen can only be missed: code -2 matches no prediction.
        truth = np.array([table.labels.code(x) if x in table.labels else -2 for x in labels], dtype=np.int64)
        used, column = _clamped_ks(ks, rows.shape[1])
        acc = {v: dict(zip(ks, voting.accuracy_every_k(codes, sims, truth, len(table.labels), used, v, rec_w)[column].tolist()))
               for v in votes}
        return EvalResult(n_queries=len(labels), accuracy=acc, version=self.version, extra={"search": used_index})


    # -- editing -------------------------------------------------------------------

    def remove(self, *, ids: Optional[IdsLike] = None, label: Optional[IdsLike] = None, source: Optional[str] = None,
               where: Optional[str] = None, images=None, lock_timeout: float = 0.0, dry_run: bool = False,
               probe=None) -> Union[RemoveResult, EditPreview]:
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
        dry_run : bool, default False
            Select as the removal would, write nothing (no version, no audit
            line, no lock), and return an `EditPreview` of the records it would remove.
        probe : folder, images or array of shape (n, dim), optional
            With ``dry_run``: queries whose predictions would change are listed
            (before -> after, k=50, rank vote).

        Selectors combine with AND; at least one is required.

        Returns
        -------
        RemoveResult(version, removed, ids), or EditPreview with ``dry_run``

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
        >>> mem.remove(ids="a", dry_run=True).ids, mem.ids()
        (['a'], ['a', 'b'])
        >>> mem.remove(ids="a").removed, mem.ids()
        (1, ['b'])
        """
        self._check_probe(dry_run, probe)
        return self._probed(editing.remove(self._state, ids=ids, label=label, source=source, where=where, images=images,
                                           lock_timeout=lock_timeout, dry_run=dry_run), probe)

    def forget(self, *, ids: Optional[IdsLike] = None, label: Optional[IdsLike] = None, source: Optional[str] = None,
               where: Optional[str] = None, images=None, near: Optional[float] = None, verify: bool = True,
               lock_timeout: float = 0.0, progress: bool | str | None = None, dry_run: bool = False,
               probe=None) -> Union[ForgetReceipt, EditPreview]:
        """Remove records, then erase every byte of them from the memory directory.

        Same selectors as `remove`; ``ids``/``images`` may also name records
        removed earlier whose bytes are still on disk.

        ``near`` (with ``images``) also erases the images' copies: every
        record whose embedding has cosine similarity >= ``near`` with an
        image's (found by exact search). The image itself need not be in the
        memory. For the default encoder (efficientnet-lite0) use ``near=0.9``:
        on CIFAR-10 it finds every JPEG-recompressed (quality 75-90) and
        upscaled copy and ~88% of 90% crops, while a distinct image reaches
        0.9 for 0.9% of images (`benchmarks/bench_near_duplicates.py`; 0.87 is
        the equal-error point). Other encoders need their own measurement.
        Check with ``dry_run=True`` first; the receipt states
        ``near_threshold`` and ``copies_found``.

        When this returns, no file under the memory directory (or object-store
        prefix) holds the records' vectors, ids, labels-with-ids, sources,
        metadata or thumbnails: not the records table, its older versions or
        deletion files, nor the audit log (which keeps a salted hash of each id
        and drops the labels and sources that described them; see
        `visual_memory.erasure`). Versions that held the records are
        deleted (opening one names the forget that erased it); tags on them
        are dropped. The in-RAM vectors are zeroed too.

        Cost: one rewrite of each ~64 MB data file that held a record, plus a
        scan of every file for the proof (``verify=False`` skips the scan),
        shown by a progress bar (``progress``; None: the CLI's default, else
        log lines). Every vector the user's embedding cache holds under a
        forgotten id is purged too (`visual_memory.cache.purge`).
        A crash part-way is finished by the next writer or `visual_memory.open`.

        ``dry_run`` and ``probe`` are as in `remove`: nothing is erased or written.

        Returns
        -------
        ForgetReceipt (EditPreview with ``dry_run``)
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
        self._check_probe(dry_run, probe)
        image_vectors = None
        if near is not None:
            if images is None:
                raise SelectorError("near= needs images=: the images whose copies to forget")
            image_vectors = self.embed(images)  # a bad image fails here, before anything is selected
        return self._probed(editing.forget(self._state, ids=ids, label=label, source=source, where=where, images=images,
                                           near=near, image_vectors=image_vectors, verify=verify,
                                           lock_timeout=lock_timeout, progress=progress, dry_run=dry_run), probe)

    def relabel(self, ids: IdsLike, label: str, *, lock_timeout: float = 0.0, dry_run: bool = False,
                probe=None) -> Union[EditResult, EditPreview]:
        """Give records a new label (one version; votes use it at once).

        Parameters
        ----------
        ids : str or sequence of str
            Records to relabel; all must exist.
        label : str
            The new label (non-empty).
        dry_run, probe
            As `remove`: an `EditPreview` of the labels that would change.

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
        self._check_probe(dry_run, probe)
        return self._probed(editing.relabel(self._state, ids, label, lock_timeout=lock_timeout, dry_run=dry_run), probe)

    def reweight(self, ids: IdsLike, weight: Union[float, Sequence[float]], *, lock_timeout: float = 0.0,
                 dry_run: bool = False, probe=None) -> Union[EditResult, EditPreview]:
        """Set records' vote weight (one version; votes use it at once).

        Parameters
        ----------
        ids : str or sequence of str
            Records to reweight; all must exist.
        weight : float or sequence of float
            One weight for all, or one per id: 0, or between float32's smallest
            normal number (~1.18e-38) and its largest (~3.40e38). A record's
            neighbour contribution is multiplied by it: 0 means the record
            never votes but is still retrieved and inspectable, 1 is the default.
        dry_run, probe
            As `remove`: an `EditPreview` of the weights that would change.

        Returns
        -------
        EditResult(version, changed)
        """
        self._check_probe(dry_run, probe)
        return self._probed(editing.reweight(self._state, ids, weight, lock_timeout=lock_timeout, dry_run=dry_run), probe)

    def tags(self) -> dict[str, int]:
        """Named versions: tag -> version."""
        return self._store.tags()

    def tag(self, name: str, *, version: Optional[int] = None, lock_timeout: float = 0.0) -> dict:
        """Name a version (default: the current one) so `visual_memory.open(path, version=name)` reads it.

        A name starts with a letter and holds letters, digits, ``.``, ``_``,
        ``-`` (so it never looks like a version number). A `forget` that
        erases the tagged version drops the tag and says so in its receipt.
        """
        return editing.tag(self._state, name, version=version, lock_timeout=lock_timeout)

    def untag(self, name: str, *, lock_timeout: float = 0.0) -> None:
        """Remove a tag (the version itself stays)."""
        editing.untag(self._state, name, lock_timeout=lock_timeout)

    def versions(self) -> list[dict]:
        """One row per audited mutation, oldest first.

        Each: ``version``, ``op``, ``ts``, ``n`` (records touched, if known),
        ``readable`` (the version can still be opened), ``tags`` (names on it).
        """
        return editing.versions(self._state)

    def build_index(self, index: Optional[str] = None, *, budget: Union[str, int, None] = None,
                    lock_timeout: float = 0.0, progress: bool | str | None = None) -> dict[str, Any]:
        """Rebuild the search index from the records, or change it (``vismem index build``).

        Parameters
        ----------
        index : str, optional
            A FAISS factory string (``"IVF4096,PQ48np"``), ``"Flat"`` (exact)
            or ``"auto"`` (chosen by size and ``budget``); by default the
            memory's own, retrained on a fresh random sample.
        budget : str or int, optional
            RAM the index may use, for ``auto`` (``"4GB"``; default: half the RAM).

        Returns
        -------
        dict with ``spec``, ``resolved`` (what ``auto`` chose), ``records``,
        ``seconds`` and ``exact_until`` (records needed before the index trains).
        The old index serves until the new one is whole.
        """
        from . import indexing

        return indexing.build(self._state, index, budget=budget, lock_timeout=lock_timeout, progress=progress)

    def check_index(self, *, queries: int = 200, k: int = 50, params: Optional[dict] = None, seed: int = 0,
                    progress: bool | str | None = None) -> dict[str, Any]:
        """Measure the index against exact search on ``queries`` of the memory's own records.

        Returns ``{"recall_at_k", "agreement", "k", "queries", "speedup", ...}``:
        agreement is the share of queries whose voted (rank) label is the same.
        """
        from . import indexing

        self._fresh()
        return indexing.check(self._state, queries=queries, k=k, params=params, seed=seed, progress=progress)

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
        return editing.optimize(self._state, cleanup_older_than=cleanup_older_than, lock_timeout=lock_timeout)


# -- module-level constructors -----------------------------------------------------


def create(
    path: str | os.PathLike,
    *,
    encoder: Optional[str | Encoder] = DEFAULT_ENCODER,
    index: str = "Flat",
    dim: Optional[int] = None,
    storage_options: Optional[dict] = None,
) -> Memory:
    """Create an empty memory directory.

    Parameters
    ----------
    path : str or PathLike
        A new or empty directory, or an object-store URI (``s3://bucket/prefix``,
        ``gs://``, ``az://``; ``file://`` is a local path).
    encoder : str, Encoder or None, default "efficientnet-lite0"
        A registered encoder name (see `vismem encoders`) or an encoder
        instance; its spec (preprocessing included) is written to the
        manifest. None makes a vectors-only memory of dimension ``dim``.
    index : str, default "Flat"
        FAISS index-factory string; "Flat" is exact search.
    storage_options : dict, optional
        Object storage settings in Lance's format (e.g. ``{"aws_endpoint": ...,
        "allow_http": "true"}``); by default the usual environment (``AWS_*``, ...).
        See `visual_memory.storage`.

    Raises
    ------
    MemoryExistsError
        If ``path`` already holds a memory or other files.
    """
    if encoder is None:
        if not dim or dim < 1:
            raise ValueError("a memory without an encoder needs dim=<vector dimension>")
        index = validate_spec(index, dim)  # at the memory's real dimension, before touching disk
        spec = {"name": f"vectors-{dim}d", "dim": int(dim), "fingerprint": f"vectors-{dim}d"}
        return Memory(Store.create(path, encoder=spec, index=index, storage_options=storage_options))
    enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
    if not isinstance(enc, Encoder):
        raise TypeError(f"encoder must be a registered name or an Encoder; got {type(encoder).__name__}")
    if dim is not None and dim != enc.dim:
        raise ValueError(f"dim={dim} disagrees with encoder {enc.name!r} ({enc.dim}-d)")
    index = validate_spec(index, enc.dim)
    return Memory(Store.create(path, encoder=enc.spec.to_dict(), index=index, storage_options=storage_options), enc)


def open(  # noqa: A001 - mirrors lance.dataset / io.open naming users expect
    path: str | os.PathLike,
    *,
    version: Optional[int | str] = None,
    encoder: Optional[str | Encoder] = None,
    read_only: bool = False,
    storage_options: Optional[dict] = None,
    ray: Optional[str] = None,
    shards: Optional[int] = None,
) -> Memory:
    """Open an existing memory.

    Parameters
    ----------
    path : str or PathLike
        A memory directory or object-store URI (see `create`).
    version : int or str, optional
        Read an earlier version (read-only): a version number or a tag name
        (`Memory.tag`). Versions a `forget` erased cannot be opened.
    encoder : str or Encoder, optional
        Assert the memory was made with this encoder (raises
        `EncoderMismatchError` if not); by default the manifest's encoder is
        loaded lazily on the first image operation.
    storage_options : dict, optional
        Object storage settings (see `create`).
    ray : {"local", "auto"} or "host:port", optional
        Serve searches from Ray actors (`visual_memory.distributed.shards`):
        the index is split into ``shards`` actors, each loading its rows from
        the store; classify merges their top-k exactly and votes once, so an
        exact memory answers exactly as in one process. Edits reach the
        shards. ``local`` starts Ray in this process.
    shards : int, optional
        Shard actors (default 1 when ``ray`` is given; giving ``shards``
        alone means ``ray="local"``).

    Raises
    ------
    NotAMemoryError
        If ``path`` is not a memory directory.
    """
    store = Store.open(path, version=version, read_only=read_only, storage_options=storage_options)
    state = None
    if ray is not None or shards is not None:
        from ..distributed.shards import sharded_state

        state = sharded_state(store, ray=ray or "local", shards=1 if shards is None else shards)
    mem = Memory(store, state=state)
    if not store.read_only:
        editing.finish_pending_forget(mem._state)
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
