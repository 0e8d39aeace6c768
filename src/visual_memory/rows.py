"""The row table: what every layer above the index knows about each record.

The index returns *rows* (positions); this table turns them into ids, label
codes, weights and Lance row addresses. Row ``i`` here is row ``i`` of the
memory's index. Removed rows stay (``alive`` is False) until the memory
compacts both together, so row numbers are stable between compactions.

`RowTable.version` is the memory version the table describes: a consumer that
keeps results across calls (cached self-neighbours, a server page) compares it
with `Memory.version`.

Everything here is in RAM and pure: the memory keeps it in step with the
store; prune, evaluate, interchange, explain and the server only read it.

>>> t = RowTable()
>>> t.append(["a", "b", "c"], ["cat", "dog", "cat"], np.ones(3, np.float32))
>>> t.remove(t.rows_of(["b"])[0])
>>> t.n_alive, t.labels.names, t.label_counts()
(2, ['cat', 'dog'], {'cat': 2})
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

UNKNOWN_ADDR = np.uint64(np.iinfo(np.uint64).max)


def _read_only(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


class LabelCodes:
    """The one label encoder: label string <-> integer code.

    Codes are given in order of first appearance and never change while the
    encoder lives (a relabel adds a code; an unused code stays), so arrays of
    codes computed earlier stay valid.

    Parameters
    ----------
    names : iterable of str, optional
        Initial vocabulary, code ``i`` = ``names[i]``.

    Examples
    --------
    >>> lc = LabelCodes()
    >>> lc.encode(["dog", "cat", "dog"]).tolist(), lc.names
    ([0, 1, 0], ['dog', 'cat'])
    >>> lc.decode(np.array([1, -1])).tolist()
    ['cat', None]
    >>> LabelCodes.sorted(["b", "a"], ["c"]).names
    ['a', 'b', 'c']
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._names: list[str] = []
        self._code: dict[str, int] = {}
        for n in names:
            self.code(n, add=True)

    @classmethod
    def sorted(cls, *label_lists: Optional[Sequence]) -> "LabelCodes":
        """A vocabulary of every label in the lists, sorted (codes independent of input order)."""
        return cls(sorted({str(x) for labels in label_lists if labels is not None for x in labels}))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, label: object) -> bool:
        return label in self._code

    def __getitem__(self, code: int) -> str:
        return self._names[code]

    @property
    def names(self) -> list[str]:
        """Code -> label (a copy)."""
        return list(self._names)

    def code(self, label: str, *, add: bool = False) -> Optional[int]:
        """The code of ``label``; None if unknown (unless ``add``, which assigns the next code)."""
        c = self._code.get(label)
        if c is None and add:
            c = self._code[label] = len(self._names)
            self._names.append(label)
        return c

    def encode(self, labels: Iterable, *, add: bool = True) -> np.ndarray:
        """int32 codes of ``labels`` (str(x) for non-strings); unknown -> new code if ``add``, else KeyError."""
        out = []
        for x in labels:
            x = x if isinstance(x, str) else str(x)
            c = self.code(x, add=add)
            if c is None:
                raise KeyError(f"unknown label {x!r}")
            out.append(c)
        return np.asarray(out, dtype=np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Object array of labels, None where the code is negative."""
        table = np.array(self._names + [None], dtype=object)
        codes = np.asarray(codes)
        return table[np.where(codes >= 0, codes, len(self._names))]


class RowTable:
    """Ids, label codes, weights and row addresses of the index's rows.

    Attributes (read-only arrays, aligned with the index's rows)
    ----------------------------------------------------------
    ids : list of str
        Record id per row ("" for an erased row). Do not mutate.
    codes : int32 array of shape (n_rows,)
        Label code per row (`labels` decodes them).
    weights : float32 array of shape (n_rows,)
        Record vote weight (1 by default, 0 = never votes).
    alive : bool array of shape (n_rows,)
        False for removed rows (still in the index until compaction).
    addresses : uint64 array of shape (n_rows,)
        Lance row address (fragment id << 32 | offset), `UNKNOWN_ADDR` until learned.
    labels : LabelCodes
    version : int
        The memory version this table describes.
    """

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._codes = np.zeros(0, np.int32)
        self._weights = np.zeros(0, np.float32)
        self._alive = np.zeros(0, bool)
        self._addr = np.zeros(0, np.uint64)
        self.labels = LabelCodes()
        self.version = 0

    @classmethod
    def from_arrays(cls, ids: list[str], label_names: list[str], codes: np.ndarray, weights: np.ndarray,
                    addresses: np.ndarray, alive: np.ndarray) -> "RowTable":
        """A table from its columns (as `visual_memory.index.saved` stores them)."""
        t = cls()
        t._ids = list(ids)
        t.labels = LabelCodes(label_names)
        t._codes = np.asarray(codes, np.int32).copy()
        t._weights = np.asarray(weights, np.float32).copy()
        t._addr = np.asarray(addresses, np.uint64).copy()
        t._alive = np.asarray(alive, bool).copy()
        t._row_of = {rid: i for i, (rid, a) in enumerate(zip(t._ids, t._alive.tolist())) if a}
        return t

    # -- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Rows, removed ones included (the index's ``ntotal``)."""
        return len(self._ids)

    @property
    def n_alive(self) -> int:
        return len(self._row_of)

    @property
    def ids(self) -> list[str]:
        return self._ids

    @property
    def codes(self) -> np.ndarray:
        return _read_only(self._codes)

    @property
    def weights(self) -> np.ndarray:
        return _read_only(self._weights)

    @property
    def alive(self) -> np.ndarray:
        return _read_only(self._alive)

    @property
    def addresses(self) -> np.ndarray:
        return _read_only(self._addr)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._row_of

    def row(self, record_id: str) -> Optional[int]:
        """The row of a live record, or None."""
        return self._row_of.get(record_id)

    def rows_of(self, ids: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """Rows of the live ids (in order), and the ids that are not live."""
        rows, missing = [], []
        get = self._row_of.get
        for rid in ids:
            r = get(rid)
            if r is None:
                missing.append(rid)
            else:
                rows.append(r)
        return np.asarray(rows, dtype=np.int64), missing

    def alive_rows(self) -> np.ndarray:
        """Rows of the live records, in row order (int64)."""
        return np.flatnonzero(self._alive).astype(np.int64)

    def alive_ids(self) -> list[str]:
        return [self._ids[r] for r in self.alive_rows().tolist()]

    def id_lists(self, rows: np.ndarray) -> list[list[Optional[str]]]:
        """Ids of a (n_queries, k) block of rows; None where the row is -1."""
        rows = np.asarray(rows)
        k = rows.shape[1] if rows.ndim == 2 else len(rows)
        flat = self.lookup_ids(rows)
        return [flat[i : i + k] for i in range(0, len(flat), k)] if k else [[] for _ in range(len(rows))]

    def lookup_ids(self, rows: np.ndarray) -> list[Optional[str]]:
        """``[ids[r] for r in rows.ravel()]`` with None where ``r < 0`` (C-level map, fast)."""
        flat = np.asarray(rows).ravel().tolist()
        ids = self._ids
        if not ids:
            return [None] * len(flat)
        out = list(map(ids.__getitem__, flat))
        neg = np.flatnonzero(np.asarray(rows).ravel() < 0)
        for j in neg.tolist():
            out[j] = None
        return out

    def codes_weights(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Label codes (-1) and record weights (0) of a block of rows (-1 = no neighbour)."""
        rows = np.asarray(rows)
        present = rows >= 0
        if not len(self._ids) or not present.any():
            return np.full(rows.shape, -1, np.int64), np.zeros(rows.shape, np.float32)
        safe = np.where(present, rows, 0)
        return np.where(present, self._codes[safe], -1), np.where(present, self._weights[safe], 0.0).astype(np.float32)

    def label_counts(self) -> dict[str, int]:
        """Live records per label, largest first (ties by name)."""
        counts = np.bincount(self._codes[self._alive], minlength=len(self.labels))
        pairs = [(self.labels[c], int(n)) for c, n in enumerate(counts.tolist()) if n > 0]
        return dict(sorted(pairs, key=lambda p: (-p[1], p[0])))

    # -- changing (by the memory only, in step with the store and the index) -------------

    def append(self, ids: Sequence[str], labels: Sequence[str], weights: np.ndarray,
               addresses: Optional[np.ndarray] = None) -> None:
        """Add rows at the end (the index appends the same rows in the same order)."""
        n = len(ids)
        start = len(self._ids)
        codes = self.labels.encode(labels)
        self._ids.extend(ids)
        self._row_of.update(zip(ids, range(start, start + n)))
        self._codes = np.concatenate([self._codes, codes])
        self._weights = np.concatenate([self._weights, np.asarray(weights, np.float32)])
        self._alive = np.concatenate([self._alive, np.ones(n, bool)])
        addr = np.full(n, UNKNOWN_ADDR, np.uint64) if addresses is None else np.asarray(addresses, np.uint64)
        self._addr = np.concatenate([self._addr, addr])

    def remove(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.int64)
        for r in rows.tolist():
            self._row_of.pop(self._ids[r], None)
        self._alive[rows] = False

    def erase(self, rows: np.ndarray) -> None:
        """Remove rows and forget their ids (for `forget`)."""
        self.remove(rows)
        for r in np.asarray(rows, np.int64).tolist():
            self._ids[r] = ""

    def set_label(self, rows: np.ndarray, label: str) -> None:
        self._codes[np.asarray(rows, np.int64)] = self.labels.code(label, add=True)

    def set_weights(self, rows: np.ndarray, weights: np.ndarray) -> None:
        self._weights[np.asarray(rows, np.int64)] = weights

    def set_addresses(self, rows: np.ndarray, addresses: np.ndarray) -> None:
        self._addr[np.asarray(rows, np.int64)] = addresses

    def keep(self, rows: np.ndarray) -> None:
        """Keep only these rows, in this order (after the index compacted the same way)."""
        rows = np.asarray(rows, np.int64)
        self._ids = [self._ids[i] for i in rows.tolist()]
        self._codes, self._weights = self._codes[rows], self._weights[rows]
        self._alive, self._addr = self._alive[rows], self._addr[rows]
        self._row_of = {rid: i for i, (rid, a) in enumerate(zip(self._ids, self._alive.tolist())) if a}
