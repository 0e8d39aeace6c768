"""Distributed add: Ray Data decodes and embeds images with an actor pool; one Lance commit.

The same contract as `Memory.add`, spread over a cluster::

    1. list     the inputs on the driver (`sources.locators`: paths and byte ranges)
    2. check    Ray tasks read and decode every image once: SHA-256 (the default
                id) or an error naming the file. Any error: raise, nothing written
    3. select   under the writer lock, ids already in the memory (or repeated)
                are refused, or skipped with ``skip_existing``
    4. embed    an actor pool (fractional CPUs; GPUs where the cluster has them)
                decodes, embeds and writes Lance data files in parallel
                (``lance_ray``'s fragment writer); each written fragment is
                journaled as it reaches the driver
    5. commit   the driver checks the fragments hold every selected id exactly
                once, commits them as **one** Lance version (`LanceOperation.Append`),
                writes **one** audit line, and drops the journal

A killed worker or node: Ray re-runs its blocks elsewhere (a result is
delivered once per block; files of an attempt that died are never committed,
and are removed after the commit). A killed driver: nothing is committed;
running the same add again reuses every journaled fragment whose records are
still wanted (their ids are read back from the data files) and embeds only
the rest. Either way no record is lost and none is stored twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from ..errors import ImageError, VisualMemoryError
from ..images import describe as describe_item
from ..images import load_image
from ..progress import progress_bar
from ..results import AddResult
from ..store import RECORDS, record_schema
from .cluster import ACTOR_CPUS, cluster_cpus, cluster_gpus, connect
from .sources import describe, locators, read_bytes

log = logging.getLogger(__name__)

JOURNAL = ".ingest-journal.json"
JOURNAL_SMALL = 256  # fragments journaled one by one (rewriting ~150 KB is cheap)
JOURNAL_EVERY_S = 2.0  # past that, at most this much embedding is redone after a driver crash
BLOCK_ROWS = 1024  # images per Ray block = rows per data file (>= the store's small-fragment size)


# -- on the workers ----------------------------------------------------------------


def _load(path: str, offset: int, size: int):
    """Decode one locator like `Memory.add` does (a file through its path, so errors name it)."""
    if offset < 0:
        return load_image(path)
    data = read_bytes(path, offset, size)
    try:
        return load_image(data)
    except ImageError as exc:
        raise ImageError(str(exc).replace(describe_item(data), describe(path, offset), 1)) from None


def check_block(block: pa.Table) -> pa.Table:
    """Pass 1 (a Ray task): each image's SHA-256, or the error that names it."""
    sha, err = [], []
    for path, off, size in zip(*(block.column(c).to_pylist() for c in ("path", "offset", "size"))):
        try:
            sha.append(_load(path, off, size).sha256)
            err.append(None)
        except ImageError as exc:
            sha.append(None)
            err.append(str(exc))
        except OSError as exc:
            sha.append(None)
            err.append(f"{describe(path, off)}: cannot read ({exc})")
    return pa.table({"pos": block.column("pos"), "sha256": pa.array(sha, pa.string()), "error": pa.array(err, pa.string())})


class EmbedWriter:
    """Pass 2 (a Ray actor): decode, embed and write one Lance data file per block.

    Returns one row per fragment written: its metadata (JSON), the ids in it
    (in order) and the input position of its first record.
    """

    def __init__(self, *, encoder: dict, where: str, uri: str, dim: int, storage_version: str,
                 max_rows_per_file: int, storage_options: Optional[dict] = None) -> None:
        from ..memory import encoder_from_manifest

        self.encoder = encoder_from_manifest(encoder, where=where)
        self.uri, self.dim = uri, dim
        self.storage_version, self.max_rows = storage_version, max_rows_per_file
        self.storage_options = storage_options

    def __call__(self, block: pa.Table) -> pa.Table:
        from lance_ray.fragment import write_fragment

        from ..memory.adding import record_table, thumbnail

        cols = {c: block.column(c).to_pylist() for c in ("pos", "path", "offset", "size", "label", "id", "source")}
        items = [p if o < 0 else read_bytes(p, o, s) for p, o, s in zip(cols["path"], cols["offset"], cols["size"])]
        loaded, vectors = [], []
        for batch, vecs in self.encoder.iter_batches(items, workers=1):
            loaded += batch
            vectors.append(vecs)
        table = record_table(self.dim, ids=cols["id"], labels=cols["label"], vectors=np.concatenate(vectors),
                             sources=cols["source"], thumbnails=[thumbnail(li.image) for li in loaded])
        written = write_fragment([table], self.uri, schema=record_schema(self.dim), max_rows_per_file=self.max_rows,
                                 data_storage_version=self.storage_version, storage_options=self.storage_options)
        frags, ids, first = [], [], []
        start = 0
        for frag, _ in written:
            n = int(frag.physical_rows)
            frags.append(json.dumps(frag.to_json()))
            ids.append(cols["id"][start : start + n])
            first.append(cols["pos"][start])
            start += n
        if start != len(cols["id"]):
            raise VisualMemoryError(f"lance wrote {start} rows for a block of {len(cols['id'])}")
        import ray

        node = ray.get_runtime_context().get_node_id()
        return pa.table({"fragment": frags, "ids": pa.array(ids, pa.list_(pa.string())), "first_pos": first,
                         "node": [node] * len(frags)})


# -- the journal of written, uncommitted fragments ---------------------------------


class Journal:
    """``MEMORY/.ingest-journal.json``: fragments written but not yet committed (no ids in it).

    A checkpoint rewritten atomically through the memory's `Storage` (so on
    object storage too): after every fragment while it holds up to
    `JOURNAL_SMALL`, then at most every `JOURNAL_EVERY_S` seconds, and before
    the commit. A crash costs at most that much embedding, and a long
    journal never makes every write slow.
    """

    def __init__(self, store) -> None:
        self.store = store
        self.storage = store.storage
        self.head: Optional[dict] = None
        self.fragments: list[dict] = []
        self._flushed = 0.0

    def entries(self) -> tuple[Optional[dict], list[dict]]:
        raw = self.storage.read(JOURNAL)
        if raw is None:
            return None, []
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError:
            return None, []  # cannot happen with atomic writes; then everything is re-embedded
        return doc.get("head"), list(doc.get("fragments") or [])

    def start(self, fingerprint: str, *, resume: Optional[tuple[dict, list[dict]]] = None) -> dict:
        """Begin a journal, or carry on one (its head and the fragments being reused)."""
        if resume is not None:
            self.head, self.fragments = resume[0], list(resume[1])
        else:
            self.head = {"started_at": time.time(), "fingerprint": fingerprint, "version": self.store.version}
            self.fragments = []
        self.flush()
        return self.head

    def add(self, fragment_json: str, node: Optional[str] = None) -> None:
        self.fragments.append({"fragment": fragment_json, "node": node})
        # Every fragment while the journal is small; then at most every JOURNAL_EVERY_S.
        if len(self.fragments) <= JOURNAL_SMALL or time.monotonic() - self._flushed >= JOURNAL_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self.storage.write(JOURNAL, json.dumps({"head": self.head, "fragments": self.fragments}).encode())
        self._flushed = time.monotonic()

    def remove(self) -> None:
        self.storage.delete(JOURNAL)


def _fragment(js: str):
    from lance.fragment import FragmentMetadata

    return FragmentMetadata.from_json(js)


def _fragment_ids(store, frag) -> Optional[list[str]]:
    """The ids stored in an uncommitted fragment's data file, or None if it is missing or unreadable."""
    from lance.file import LanceFileReader

    files = frag.files
    if len(files) != 1:
        return None
    try:
        path = f"{store.dataset.uri.rstrip('/')}/data/{files[0].path}"
        table = LanceFileReader(path, storage_options=store.storage.lance_options).read_all().to_table()
        ids = table.column(0).to_pylist()  # the schema's first column is id
    except Exception:  # noqa: BLE001 - a half-written or deleted file: re-embed its records
        return None
    return ids if len(ids) == int(frag.physical_rows) else None


def reusable_fragments(store, journal: Journal, wanted: dict[str, int], fingerprint: str
                       ) -> tuple[list[tuple[str, list[str], int]], list[dict]]:
    """Journaled fragments a resumed add can commit as they are.

    A fragment is reused when its encoder is the memory's, its file is
    readable, and every id in it is still wanted and not claimed by another
    reused fragment; the others are discarded (their files deleted unless a
    version references them).

    Returns
    -------
    reused : list of (fragment JSON, ids, first input position)
    entries : the journal entries of the reused fragments
    """
    head, entries = journal.entries()
    if head is None:
        return [], []
    committed = store.data_files()
    claimed: set[str] = set()
    out, kept = [], []
    for e in entries:
        frag = _fragment(e["fragment"])
        files = [f.path for f in frag.files]
        if any(f in committed for f in files):
            continue  # committed by the run that crashed after its commit: already in the memory
        ids = _fragment_ids(store, frag) if head.get("fingerprint") == fingerprint else None
        if ids is not None and all(i in wanted and i not in claimed for i in ids) and len(set(ids)) == len(ids):
            claimed.update(ids)
            out.append((e["fragment"], ids, min(wanted[i] for i in ids)))
            kept.append(e)
        else:
            _remove_files(store, files)
    if out:
        log.info("%s: resuming an interrupted add: %d fragment(s), %d record(s) already embedded",
                 store.path, len(out), len(claimed))
    return out, kept


def _remove_files(store, files: list[str]) -> None:
    for rel in files:
        store.storage.delete(f"{RECORDS}/data/{rel}")


def remove_orphans(store, since: float) -> int:
    """Delete data files written since ``since`` that no version references (attempts of killed workers).

    Only files from after the ingest started are candidates, and only while
    the writer lock is held, so no other writer's files can be among them.
    Local memories only: object listings carry no reliable age here, and
    Lance's version cleanup (``optimize``, ``forget``) removes unreferenced files there.
    """
    if store.storage.remote:
        return 0
    data = Path(store.dataset.uri) / "data"
    fresh = [p for p in data.iterdir() if p.is_file() and p.stat().st_mtime >= since - 1.0] if data.is_dir() else []
    if not fresh:
        return 0
    referenced: set[str] = set()
    for v in store.version_numbers():
        ds = store.dataset.checkout_version(v)
        referenced |= {f.path for frag in ds.get_fragments() for f in frag.metadata.files}
    orphans = [p for p in fresh if p.name not in referenced]
    for p in orphans:
        p.unlink(missing_ok=True)
    return len(orphans)


# -- the driver --------------------------------------------------------------------


def _quiet_ray_data():
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def check_images(table: pa.Table, *, block_rows: int, progress) -> list[str]:
    """Pass 1 on the cluster: the SHA-256 of every image, in input order; raises naming bad files."""
    ray = _quiet_ray_data()
    ds = ray.data.from_arrow(_blocks(table.select(["pos", "path", "offset", "size"]), block_rows))
    ds = ds.map_batches(check_block, batch_format="pyarrow", batch_size=None, num_cpus=ACTOR_CPUS)
    sha: list[Optional[str]] = [None] * table.num_rows
    errors: list[tuple[int, str]] = []
    with progress_bar("checking" if progress else False, total=table.num_rows, unit="img") as bar:
        for out in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for pos, h, e in zip(*(out.column(c).to_pylist() for c in ("pos", "sha256", "error"))):
                sha[pos] = h
                if e is not None:
                    errors.append((pos, e))
            bar.advance(out.num_rows)
    if errors:
        errors.sort()
        more = f" (and {len(errors) - 1} more bad image(s))" if len(errors) > 1 else ""
        raise ImageError(f"{errors[0][1]}{more}; nothing was added")
    return sha  # type: ignore[return-value]


def embed_and_write(state, todo: pa.Table, *, workers: int, gpus: float, block_rows: int, journal: Journal,
                    progress) -> list[tuple[str, list[str], int]]:
    """Pass 2 on the cluster: (fragment JSON, ids, first position) per fragment written."""
    ray = _quiet_ray_data()
    st = state.store
    kwargs = dict(encoder=st.manifest["encoder"], where=str(st.path), uri=st.dataset.uri, dim=st.dim,
                  storage_version=st.dataset.data_storage_version, max_rows_per_file=max(st.fragment_rows, block_rows),
                  storage_options=st.storage.lance_options)
    ds = ray.data.from_arrow(_blocks(todo, block_rows))
    ds = ds.map_batches(EmbedWriter, fn_constructor_kwargs=kwargs, batch_format="pyarrow", batch_size=None,
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=ACTOR_CPUS, num_gpus=gpus)
    # Ray Data's actor pools restart dead actors and retry their blocks by default (a killed node).
    out = []
    with progress_bar("embedding" if progress else False, total=todo.num_rows, unit="img") as bar:
        for res in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for js, ids, first, node in zip(*(res.column(c).to_pylist() for c in ("fragment", "ids", "first_pos", "node"))):
                journal.add(js, node)
                out.append((js, ids, first))
                bar.advance(len(ids))
    return out


def check_fragments(fragments: list[tuple[str, list[str], int]], want: list[str]) -> None:
    """Refuse to commit unless the fragments hold every wanted id exactly once."""
    got = [i for _, ids, _ in fragments for i in ids]
    if len(got) == len(want) and set(got) == set(want) and len(set(got)) == len(got):
        return
    from collections import Counter

    twice = [i for i, c in Counter(got).items() if c > 1]
    missing = sorted(set(want) - set(got))
    raise VisualMemoryError(f"distributed add produced {len(got)} records for {len(want)} images "
                            f"({len(twice)} twice, e.g. {twice[:3]}; {len(missing)} missing, e.g. {missing[:3]}); "
                            "nothing was committed; run the add again to resume")


def add_images(state, inputs, *, labels=None, ids=None, source=None, skip_existing: bool = False,
               address: Optional[str] = "local", workers: Optional[int] = None, gpus_per_worker: Optional[float] = None,
               block_rows: int = BLOCK_ROWS, progress: bool | str = False, lock_timeout: float = 0.0) -> AddResult:
    """`Memory.add` on a Ray cluster (see the module docstring). Returns `AddResult`."""
    from ..memory.adding import check_new_ids

    if not isinstance(block_rows, int) or isinstance(block_rows, bool) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive integer; got {block_rows!r}")
    if state.store.manifest["encoder"].get("preprocess") is None:
        raise VisualMemoryError(f"{state.store.path}: this memory stores precomputed vectors without an encoder; "
                                "a distributed add embeds images")
    table = locators(inputs, labels=labels, ids=ids, source=source)
    with connect(address) as info:
        sha = check_images(table, block_rows=block_rows, progress=progress)
        given = table.column("id").to_pylist()
        all_ids = [g if g is not None else h for g, h in zip(given, sha)]
        table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(all_ids, pa.string()))
        fingerprint = state.store.manifest["encoder"].get("fingerprint")
        n_workers = int(workers) if workers else max(1, int(cluster_cpus()))
        gpus = float(gpus_per_worker) if gpus_per_worker is not None else (1.0 if cluster_gpus() >= n_workers else 0.0)
        with state.writing(timeout=lock_timeout):
            keep = check_new_ids(state, all_ids, skip_existing)
            skipped = [all_ids[i] for i in np.flatnonzero(~keep).tolist()]
            todo = table.filter(pa.array(keep))
            want = todo.column("id").to_pylist()
            if not want:
                return AddResult(state.version, 0, skipped)
            journal = Journal(state.store)
            head, _ = journal.entries()
            position = dict(zip(want, todo.column("pos").to_pylist()))
            reused, kept = reusable_fragments(state.store, journal, position, fingerprint)
            head = journal.start(fingerprint, resume=(head, kept) if reused else None)
            done = {i for _, frag_ids, _ in reused for i in frag_ids}
            rest = todo.filter(pa.array([i not in done for i in want])) if done else todo
            written = embed_and_write(state, rest, workers=n_workers, gpus=gpus, block_rows=block_rows,
                                      journal=journal, progress=progress) if rest.num_rows else []
            journal.flush()
            fragments = sorted(reused + written, key=lambda f: f[2])
            check_fragments(fragments, want)
            state.store.commit_fragments([_fragment(js) for js, _, _ in fragments])
            state.sync()
            added = [i for _, frag_ids, _ in fragments for i in frag_ids]
            state.store.audit("add", n=len(added), ids=added, labels=sorted(set(todo.column("label").to_pylist())),
                              ray={"workers": n_workers, "nodes": len(info["nodes"]) - 1, "fragments": len(fragments),
                                   "resumed": len(done)})
            journal.remove()
            orphans = remove_orphans(state.store, float(head["started_at"]))
            if orphans:
                log.info("%s: removed %d data file(s) of interrupted worker attempts", state.store.path, orphans)
            state.after_mutation()
    return AddResult(state.version, len(added), skipped, added)
