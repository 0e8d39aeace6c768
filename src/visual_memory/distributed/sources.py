"""What a distributed add reads: folders, tables of paths, webdataset tars -> one table of image locators.

Every input becomes rows of ``(pos, path, offset, size, label, id, source)``:
``path`` is a file, ``offset``/``size`` a byte range inside it (``-1`` = the
whole file; a tar member otherwise). Listing happens on the driver (names
and offsets only); the image bytes are read by Ray workers (`read_bytes`).

Accepted inputs (one or a list):

* a folder: an ImageFolder (label = class sub-folder) when ``labels`` is
  None, else every image below it with ``labels``, exactly as `Memory.add`;
* an image file (``labels`` required);
* a ``.parquet`` or ``.csv`` table with a ``path`` column (or ``image``),
  a ``label`` column unless ``labels`` is given, optional ``id`` and
  ``source`` columns; relative paths are relative to the table's folder;
* a ``.tar`` in webdataset layout: members grouped by key (the name up to
  its first dot), one image member per key (``.jpg``, ``.png``...), the
  label in a ``.cls``/``.txt``/``.label`` member unless ``labels`` is given.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Optional, Sequence, Union

import pyarrow as pa

from ..errors import ImageError
from ..images import IMAGE_SUFFIXES, is_image_file

LOCATOR_SCHEMA = pa.schema([
    pa.field("pos", pa.int64()),
    pa.field("path", pa.string()),
    pa.field("offset", pa.int64()),
    pa.field("size", pa.int64()),
    pa.field("label", pa.string()),
    pa.field("id", pa.string()),
    pa.field("source", pa.string()),
])
TABLE_SUFFIXES = (".parquet", ".csv")
LABEL_SUFFIXES = (".cls", ".txt", ".label")


def read_bytes(path: str, offset: int, size: int) -> bytes:
    """The bytes of a locator (a whole file, or ``size`` bytes at ``offset``)."""
    with open(path, "rb") as f:
        if offset < 0:
            return f.read()
        f.seek(offset)
        return f.read(size)


def describe(path: str, offset: int, name: Optional[str] = None) -> str:
    """How an error names a locator: the file, or ``archive.tar:member``."""
    return path if offset < 0 else f"{path}:{name or f'@{offset}'}"


def _rows_from_paths(paths: Sequence, labels: Sequence[str], sources: Sequence[Optional[str]]) -> list[dict]:
    return [{"path": os.fspath(p), "offset": -1, "size": -1, "label": lab, "id": None, "source": src}
            for p, lab, src in zip(paths, labels, sources)]


def _folder_rows(root: Path, labels) -> list[dict]:
    from ..memory.adding import resolve_inputs

    paths, labs = resolve_inputs(root, labels)
    return _rows_from_paths(paths, labs, [os.fspath(p) for p in paths])


def _table_rows(path: Path, labels) -> list[dict]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path) if path.suffix.lower() == ".parquet" else pacsv.read_csv(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for unreadable tables
        raise ImageError(f"{path}: cannot read this table of image paths ({str(exc).splitlines()[0][:200]})") from None
    cols = set(table.column_names)
    col = "path" if "path" in cols else "image" if "image" in cols else None
    if col is None:
        raise ImageError(f"{path}: a table of images needs a 'path' (or 'image') column; it has {sorted(cols)}")
    n = table.num_rows
    if labels is None and "label" not in cols:
        raise ImageError(f"{path}: no 'label' column; add one or pass labels=")
    from ..memory.adding import as_labels

    labs = as_labels(labels if labels is not None else table.column("label").to_pylist(), n)
    base = path.parent
    files = [p if os.path.isabs(p) else os.fspath(base / p) for p in (str(x) for x in table.column(col).to_pylist())]
    ids = [None if x is None else str(x) for x in table.column("id").to_pylist()] if "id" in cols else [None] * n
    srcs = [None if x is None else str(x) for x in table.column("source").to_pylist()] if "source" in cols else files
    rows = _rows_from_paths(files, labs, srcs)
    for r, rid in zip(rows, ids):
        r["id"] = rid
    return rows


def _tar_rows(path: Path, labels) -> list[dict]:
    """One row per webdataset sample: its image member's byte range, label from a label member."""
    try:
        tar = tarfile.open(path, "r:")  # uncompressed only: members must be addressable by offset
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"{path}: not an uncompressed tar archive ({exc})") from None
    images: dict[str, tarfile.TarInfo] = {}
    label_of: dict[str, str] = {}
    with tar:
        for m in tar:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
            suffix = "." + base.split(".", 1)[1].lower() if "." in base else ""
            if suffix in IMAGE_SUFFIXES:
                if key in images:
                    raise ImageError(f"{path}: sample {key!r} has two image members")
                images[key] = m
            elif suffix in LABEL_SUFFIXES and labels is None:
                label_of[key] = tar.extractfile(m).read().decode("utf-8", errors="replace").strip()
    if not images:
        raise ImageError(f"{path}: no image members (.jpg, .png, ...) in this tar")
    keys = list(images)
    if labels is None:
        missing = [k for k in keys if not label_of.get(k)]
        if missing:
            raise ImageError(f"{path}: {len(missing)} sample(s) have no label member ({', '.join(LABEL_SUFFIXES)}), "
                             f"e.g. {missing[:3]}; pass labels=")
        labs = [label_of[k] for k in keys]
    else:
        from ..memory.adding import as_labels

        labs = as_labels(labels, len(keys))
    return [{"path": os.fspath(path), "offset": int(images[k].offset_data), "size": int(images[k].size),
             "label": lab, "id": None, "source": f"{os.fspath(path)}:{images[k].name}"} for k, lab in zip(keys, labs)]


def locators(inputs: Union[str, os.PathLike, Sequence], *, labels=None, ids=None, source: Optional[str] = None) -> pa.Table:
    """A `LOCATOR_SCHEMA` table of every image the inputs name, in input order.

    ``labels`` (one for all, or one per image of a single input), ``ids``
    (one per image) and ``source`` (one for all) override what the inputs say.
    """
    many = isinstance(inputs, (list, tuple))
    items = list(inputs) if many else [inputs]
    if not items:
        raise ImageError("nothing to add: no inputs given")
    rows: list[dict] = []
    loose: list[Path] = []
    for item in items:
        p = Path(item)
        if not p.exists():
            raise ImageError(f"{p}: no such file or directory")
        if p.is_dir():
            rows += _folder_rows(p, labels)
        elif p.suffix.lower() in TABLE_SUFFIXES:
            rows += _table_rows(p, labels)
        elif p.suffix.lower() == ".tar":
            rows += _tar_rows(p, labels)
        elif is_image_file(p):
            loose.append(p)
        else:
            raise ImageError(f"{p}: not an image, a folder, a .parquet/.csv table of paths or a webdataset .tar")
    if loose:
        from ..memory.adding import as_labels

        rows += _rows_from_paths(loose, as_labels(labels, len(loose)), [os.fspath(p) for p in loose])
    if ids is not None:
        from ..memory.adding import as_ids

        for r, rid in zip(rows, as_ids(ids, len(rows))):
            r["id"] = rid
    if source is not None:
        for r in rows:
            r["source"] = source
    for i, r in enumerate(rows):
        r["pos"] = i
    return pa.Table.from_pylist(rows, schema=LOCATOR_SCHEMA)
