"""The index saved beside the records, so `open` loads it instead of rebuilding it.

Layout under the memory (through its `visual_memory.storage.Storage`, so
object storage too)::

    index/meta.json                  written last: which files, their sha256, the version
    index/rows-<version>-<tag>.arrow the row table (ids, labels, weights, row addresses, alive)
    index/index-<version>-<tag>.bin  the index's `to_bytes`
                                     (a sharded memory: shard-<i>-... per shard, and map-...)

A saved index is derived data and may never give a wrong answer, so `load`
trusts it only if the meta names this memory's encoder, dimension and index
spec, both files hash to what the meta says, and the sizes agree; anything
else (missing, corrupt, a crash mid-save, another spec) returns None and the
memory rebuilds from the records. The version in the meta may be older than
the memory's: the memory then catches up with the appends since (or rebuilds
if anything else changed). Files are never overwritten: a save writes new
names, then the meta, then deletes the old files, so a crash at any point
leaves either the old or the new index whole.

Exact ("Flat") memories save nothing: their index is the vectors, and reading
them from the records costs about as much as reading a copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from ..rows import RowTable
from ..store import SAVED_INDEX
from .base import LocalIndex

log = logging.getLogger(__name__)

PREFIX = SAVED_INDEX
META = PREFIX + "meta.json"
FORMAT = 1


@dataclass
class Saved:
    rows: RowTable
    index: LocalIndex
    version: int
    fragments: list[int]
    meta: dict


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows_to_bytes(rows: RowTable) -> bytes:
    # Only labels live rows carry: a label only forgotten records had must leave no byte here.
    alive = rows.alive
    used = np.unique(rows.codes[alive])
    remap = np.full(max(len(rows.labels), 1), -1, np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    codes = np.where(alive, remap[rows.codes] if len(rows) else rows.codes, 0).astype(np.int32)
    names = [rows.labels[int(c)] for c in used.tolist()] or [""]
    labels = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(names, pa.string()))
    table = pa.table({"id": pa.array(rows.ids, pa.string()), "label": labels, "weight": pa.array(rows.weights),
                      "address": pa.array(rows.addresses), "alive": pa.array(rows.alive)})
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def rows_from_bytes(data: bytes) -> RowTable:
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all().combine_chunks()
    label = table.column("label").chunk(0) if table.num_rows else None
    return RowTable.from_arrays(
        table.column("id").to_pylist(),
        label.dictionary.to_pylist() if label is not None else [],
        label.indices.to_numpy(zero_copy_only=False).astype(np.int32) if label is not None else np.zeros(0, np.int32),
        table.column("weight").to_numpy(),
        table.column("address").to_numpy(),
        table.column("alive").to_numpy(zero_copy_only=False).astype(bool),
    )


def save(storage, rows: RowTable, index: Optional[LocalIndex], *, version: int, spec: str, dim: int,
         fingerprint: Optional[str], fragments: list[int], reuse: Optional[dict] = None) -> dict:
    """Write the row table and the index for ``version``; returns the meta written.

    ``index`` None keeps the index file of ``reuse`` (the meta of the last save): an edit
    that removed rows, relabelled or reweighted rewrites only the row table, whose
    ``alive`` column `load` applies to the index (`Index.remove`). Forget never reuses.
    """
    if index is not None and len(rows) != index.ntotal:
        raise ValueError(f"row table has {len(rows)} rows but the index {index.ntotal}: not saved")
    if index is None:
        if not reuse or reuse.get("rows") != len(rows):
            raise ValueError("no saved index of this size to keep: save the index itself")
        kept = {"index": (reuse["files"]["index"], reuse["sha256"]["index"], reuse["bytes"]["index"])}
        return save_parts(storage, rows, {}, version=version, spec=spec, dim=dim, fingerprint=fingerprint,
                          fragments=fragments, kept=kept)
    return save_parts(storage, rows, {"index": index.to_bytes()}, version=version, spec=spec, dim=dim,
                      fingerprint=fingerprint, fragments=fragments)


def save_parts(storage, rows: RowTable, parts: dict[str, bytes], *, version: int, spec: str, dim: int,
               fingerprint: Optional[str], fragments: list[int], shards: Optional[int] = None,
               kept: Optional[dict[str, tuple[str, str, int]]] = None) -> dict:
    """Write the row table and named index parts (one ``index``, or a sharded memory's shards and map).

    ``kept``: parts already on storage, reused as they are (``{part: (file, sha256, bytes)}``).
    """
    tag = secrets.token_hex(4)
    blobs = {"rows": rows_to_bytes(rows), **parts}
    files = {key: f"{PREFIX}{key}-{version}-{tag}.{'arrow' if key == 'rows' else 'bin'}" for key in blobs}
    for key, name in files.items():
        storage.write(name, blobs[key])
    from ..erasure import crash_point

    crash_point("index:files-written")
    sha = {k: _sha(v) for k, v in blobs.items()}
    sizes = {k: len(v) for k, v in blobs.items()}
    for key, (name, digest, size) in (kept or {}).items():
        files[key], sha[key], sizes[key] = name, digest, size
    meta = {"format": FORMAT, "version": int(version), "spec": spec, "dim": int(dim), "fingerprint": fingerprint,
            "shards": shards, "rows": len(rows), "alive": int(rows.n_alive),
            "fragments": sorted(int(f) for f in fragments), "files": files, "sha256": sha, "bytes": sizes}
    storage.write(META, json.dumps(meta, indent=1).encode())
    keep = set(files.values()) | {META}
    for name, _ in storage.walk():
        if name.startswith(PREFIX) and name not in keep:
            storage.delete(name)
    return meta


def read_meta(storage) -> Optional[dict]:
    raw = storage.read(META)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def load_parts(storage, *, spec: str, dim: int, fingerprint: Optional[str],
               shards: Optional[int] = None) -> tuple[Optional[tuple[RowTable, dict, dict]], str]:
    """(row table, {part: bytes}, meta) if the saved files are whole and describe this memory, else (None, why)."""
    meta = read_meta(storage)
    if meta is None:
        return None, "no saved index" if not storage.exists(META) else "unreadable index/meta.json"
    if meta.get("format") != FORMAT:
        return None, f"saved index format {meta.get('format')!r}, not {FORMAT}"
    for key, want in (("spec", spec), ("dim", int(dim)), ("fingerprint", fingerprint), ("shards", shards)):
        if meta.get(key) != want:
            return None, f"saved index has {key}={meta.get(key)!r}, the memory {want!r}"
    blobs = {}
    for key, name in meta["files"].items():
        data = storage.read(name)
        if data is None:
            return None, f"saved index file {name} is missing"
        if _sha(data) != meta["sha256"][key]:
            return None, f"saved index file {name} is corrupt (sha256 differs from index/meta.json)"
        blobs[key] = data
    try:
        rows = rows_from_bytes(blobs.pop("rows"))
    except Exception as exc:  # noqa: BLE001 - any unreadable derived file means: rebuild
        return None, f"saved row table unreadable ({type(exc).__name__}: {exc})"
    if len(rows) != meta["rows"]:
        return None, "saved row table and index/meta.json disagree in size"
    rows.version = int(meta["version"])
    return (rows, blobs, meta), "loaded"


def load(storage, *, spec: str, dim: int, fingerprint: Optional[str], index_class) -> tuple[Optional[Saved], str]:
    """The saved index if it is whole and describes this memory, else (None, why)."""
    found, why = load_parts(storage, spec=spec, dim=dim, fingerprint=fingerprint)
    if found is None:
        return None, why
    rows, blobs, meta = found
    try:
        index = index_class.from_bytes(blobs.pop("index"), dim, spec)
    except Exception as exc:  # noqa: BLE001
        return None, f"saved index unreadable ({type(exc).__name__}: {exc})"
    if len(rows) != index.ntotal:
        return None, "saved row table and index disagree in size"
    index.remove(np.flatnonzero(~rows.alive))  # rows removed since the index file was written (a kept file)
    if rows.n_alive != index.n_alive:
        return None, "saved row table and index disagree in size"
    return Saved(rows, index, int(meta["version"]), list(meta.get("fragments", [])), meta), "loaded"


def remove(storage) -> int:
    """Delete every saved index file (forget's recovery; a spec change)."""
    return storage.delete_prefix(PREFIX)
