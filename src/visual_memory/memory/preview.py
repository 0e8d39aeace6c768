"""Dry runs: what an edit would change, worked out in RAM, with nothing written.

Every mutating verb takes ``dry_run=True`` and then returns an `EditPreview`
instead of committing: the records it would add, remove, relabel or reweight
(before and after), and, given probe queries, every probe whose prediction
would change. The preview selects records with the same code as the edit
itself, so its list is exactly what the edit then changes (if nothing else
writes in between: ``version`` says which version it describes).

Probe predictions after the edit come from a `Simulation`: copies of only the
row-table arrays the edit touches (label codes, weights, the alive mask),
with the memory's own index searched as it is. Removed rows are masked out
of over-fetched results, exactly as the index drops its tombstones; added
vectors are searched exactly and merged with the index's results. Nothing is
written: no version, no audit line, no cache file, no lock file.

For an exact index (``"Flat"``) the simulated predictions equal what
`Memory.classify` returns after the edit. With an approximate index, removals
and re-labels are still exact; added records are found by exact search, which
the index itself may miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .. import vote as voting
from ..index import check_k, exact_knn
from ..index.base import drop_dead
from .state import MemoryState

PROBE_BATCH = 256  # probes per search: a removal over-fetches k + (rows removed) neighbours per probe


@dataclass(frozen=True)
class RecordChange:
    """One record an edit would touch; None means "not in the memory" (before an add, after a removal)."""

    id: str
    label_before: Optional[str]
    label_after: Optional[str]
    weight_before: Optional[float]
    weight_after: Optional[float]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ProbeChange:
    """A probe query whose predicted label would change."""

    probe: int
    name: Optional[str]
    before: Optional[str]
    after: Optional[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ProbeDiff:
    """Predictions of probe queries before and after a previewed edit.

    Attributes
    ----------
    n_probes : int
    k, vote : the classification they were made with
    changes : list of ProbeChange
        Every probe whose label changes, in probe order.
    """

    n_probes: int
    k: int
    vote: str
    changes: list[ProbeChange]

    @property
    def n_changed(self) -> int:
        return len(self.changes)

    def to_dict(self) -> dict:
        return {"n_probes": self.n_probes, "k": self.k, "vote": self.vote, "n_changed": self.n_changed,
                "changes": [c.to_dict() for c in self.changes]}


class Simulation:
    """The memory after an edit, for classifying probes: copies of the changed row arrays only.

    Parameters
    ----------
    state : MemoryState
        The memory as it is (its index is searched, never changed).
    alive, codes, weights : arrays aligned with the row table, optional
        The row table's after the edit (default: unchanged, no copy).
    names : list of str, optional
        Label code -> name after the edit (a relabel may add a label).
    added : callable returning (vectors, codes), optional
        Records an add would append (rows ``len(rows) ..``); called on the
        first probe, so a preview that is never probed embeds nothing.
    """

    def __init__(self, state: MemoryState, *, alive: Optional[np.ndarray] = None, codes: Optional[np.ndarray] = None,
                 weights: Optional[np.ndarray] = None, names: Optional[list[str]] = None,
                 added: Optional[Callable[[], tuple[np.ndarray, np.ndarray]]] = None) -> None:
        t = state.rows
        self.state, self.version = state, t.version
        self.alive = t.alive if alive is None else alive
        self.codes = t.codes if codes is None else codes
        self.weights = t.weights if weights is None else weights
        self.names = t.labels.names if names is None else names
        self._added, self._added_value = added, None
        self.newly_dead = int((t.alive & ~self.alive).sum())

    def added(self) -> tuple[np.ndarray, np.ndarray]:
        if self._added_value is None:
            self._added_value = self._added() if self._added is not None else (np.zeros((0, self.state.store.dim), np.float32),
                                                                              np.zeros(0, np.int64))
        return self._added_value

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows after the edit (rows past the table's end are added records)."""
        index = self.state.index
        sims, rows = index.search(q, k + self.newly_dead)
        if self.newly_dead:
            sims, rows = drop_dead(sims, rows, self.alive, k)
        vectors, _ = self.added()
        if len(vectors):
            s2, r2 = exact_knn(vectors, q, k)
            sims = np.concatenate([sims, s2], axis=1)
            rows = np.concatenate([rows, r2 + len(self.state.rows)], axis=1)
            # Stable: on equal similarity the older row stays first, as in a search after the add.
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            sims, rows = np.take_along_axis(sims, order, axis=1), np.take_along_axis(rows, order, axis=1)
        return sims, rows

    def row_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        _, added_codes = self.added()
        if not len(added_codes):
            return self.codes, self.weights
        return (np.concatenate([self.codes, added_codes]).astype(np.int64),
                np.concatenate([self.weights, np.ones(len(added_codes), np.float32)]))


def vote_labels(sims: np.ndarray, rows: np.ndarray, codes: np.ndarray, weights: np.ndarray, names: Sequence[str],
                vote: str, params: dict) -> list[Optional[str]]:
    """The winning label of each query from its neighbour rows, as `Memory.classify` votes."""
    present = rows >= 0
    safe = np.where(present, rows, 0)
    c = np.where(present, codes[safe] if len(codes) else -1, -1)
    w = np.where(present, weights[safe] if len(weights) else 0.0, 0.0)
    contrib = voting.contributions(sims, vote, record_weights=w, **params)
    winners = np.asarray(voting.tally(c, contrib, len(names))[0])
    return [names[x] if x >= 0 else None for x in winners.tolist()]


@dataclass(frozen=True)
class EditPreview:
    """What an edit would do; returned by every mutating verb called with ``dry_run=True``.

    Attributes
    ----------
    op : str
        The verb ("add", "add_embeddings", "remove", "forget", "relabel", "reweight", "prune").
    version : int
        The memory version previewed; the dry run left it (and every byte on disk) as it was.
    changes : list of RecordChange
        Each record that would change, with its label and weight before and after.
    skipped : list of str
        Ids an add would skip (already present, ``skip_existing=True``).
    historic : list of str
        Ids a forget would also erase: removed earlier, bytes still on disk.
    near : dict, optional
        For ``forget(images=..., near=T)``: ``{"threshold": T, "copies": n}``,
        the records selected by similarity besides the images' own records.
    probe : ProbeDiff, optional
        Probe predictions that would change (``probe=`` or `with_probe`).

    Examples
    --------
    >>> import numpy as np, tempfile, visual_memory as vm
    >>> mem = vm.create(tempfile.mkdtemp() + "/m", encoder=None, dim=2)
    >>> _ = mem.add_embeddings(np.eye(2), labels=["cat", "dog"], ids=["a", "b"])
    >>> p = mem.relabel("b", "cat", dry_run=True, probe=np.array([[0.1, 0.9]]))
    >>> p.ids, p.probe.changes[0].before, p.probe.changes[0].after, mem.labels, mem.version == p.version
    (['b'], 'dog', 'cat', {'cat': 1, 'dog': 1}, True)
    """

    op: str
    version: int
    changes: list[RecordChange]
    skipped: list[str] = field(default_factory=list)
    historic: list[str] = field(default_factory=list)
    near: Optional[dict] = None
    probe: Optional[ProbeDiff] = None
    simulation: Optional[Simulation] = field(default=None, repr=False, compare=False)

    dry_run = True

    @property
    def ids(self) -> list[str]:
        """Ids of the records that would change (a forget's include ``historic``)."""
        return [c.id for c in self.changes] + list(self.historic)

    def __len__(self) -> int:
        return len(self.changes) + len(self.historic)

    def with_probe(self, vectors: np.ndarray, *, names: Optional[Sequence[str]] = None, k: int = 50,
                   vote: str = "rank", **vote_params: float) -> "EditPreview":
        """This preview plus the probe predictions that would change (`Memory` embeds images first).

        Parameters
        ----------
        vectors : float32 array of shape (n_probes, dim), L2-normalised
        names : sequence of str, optional
            A name per probe (e.g. its file), reported with each change.
        k, vote, **vote_params : as `Memory.classify`
        """
        sim = self.simulation
        if sim is None:
            raise ValueError("this preview holds no simulation to probe")
        if sim.state.rows.version != sim.version:
            raise ValueError(f"the memory moved from version {sim.version} to {sim.state.rows.version} since this "
                             "preview was made; preview the edit again")
        k = check_k(k)
        voting.check_vote(vote, vote_params)
        q = np.ascontiguousarray(vectors, np.float32)
        t = sim.state.rows
        codes, weights = sim.row_arrays()
        before, after = [], []
        for lo in range(0, len(q), PROBE_BATCH):
            block = q[lo : lo + PROBE_BATCH]
            sims, rows = sim.state.index.search(block, k)
            before += vote_labels(sims, rows, t.codes, t.weights, t.labels.names, vote, vote_params)
            sims, rows = sim.search(block, k)
            after += vote_labels(sims, rows, codes, weights, sim.names, vote, vote_params)
        changes = [ProbeChange(i, names[i] if names is not None else None, b, a)
                   for i, (b, a) in enumerate(zip(before, after)) if b != a]
        return replace(self, probe=ProbeDiff(len(q), k, vote, changes))

    def to_dict(self) -> dict:
        out = {"dry_run": True, "op": self.op, "version": self.version, "count": len(self),
               "changes": [c.to_dict() for c in self.changes]}
        if self.skipped:
            out["skipped"] = list(self.skipped)
        if self.historic:
            out["historic"] = list(self.historic)
        if self.near is not None:
            out["near"] = dict(self.near)
        if self.probe is not None:
            out["probe"] = self.probe.to_dict()
        return out

    def __repr__(self) -> str:
        probe = f", probe changes={self.probe.n_changed}/{self.probe.n_probes}" if self.probe is not None else ""
        return f"EditPreview(op={self.op!r}, version={self.version}, would change={len(self)}{probe})"


# -- builders, one per kind of edit -------------------------------------------------------


def _labels_of(state: MemoryState, rows: np.ndarray) -> list[Optional[str]]:
    return state.rows.labels.decode(state.rows.codes[rows]).tolist()


def removal(state: MemoryState, rows: np.ndarray, *, op: str, historic: Sequence[str] = (),
            near: Optional[dict] = None) -> EditPreview:
    """Records at ``rows`` would stop voting (remove) or be erased (forget)."""
    t = state.rows
    labels, weights = _labels_of(state, rows), t.weights[rows].tolist()
    changes = [RecordChange(t.ids[r], lab, None, w, None) for r, lab, w in zip(rows.tolist(), labels, weights)]
    alive = t.alive.copy()
    alive[rows] = False
    return EditPreview(op, t.version, changes, historic=list(historic), near=near, simulation=Simulation(state, alive=alive))


def relabelling(state: MemoryState, rows: np.ndarray, label: str) -> EditPreview:
    """Records at ``rows`` would get ``label``."""
    t = state.rows
    names = t.labels.names
    code = t.labels.code(label)
    if code is None:
        code, names = len(names), names + [label]
    changes = [RecordChange(t.ids[r], old, label, w, w)
               for r, old, w in zip(rows.tolist(), _labels_of(state, rows), t.weights[rows].tolist())]
    codes = t.codes.copy()
    codes[rows] = code
    return EditPreview("relabel", t.version, changes, simulation=Simulation(state, codes=codes, names=names))


def reweighting(state: MemoryState, rows: np.ndarray, new: np.ndarray, *, op: str) -> EditPreview:
    """Records at ``rows`` would get weights ``new`` (float32, aligned with ``rows``)."""
    t = state.rows
    changes = [RecordChange(t.ids[r], lab, lab, old, w)
               for r, lab, old, w in zip(rows.tolist(), _labels_of(state, rows), t.weights[rows].tolist(), new.tolist())]
    weights = t.weights.copy()
    weights[rows] = new
    return EditPreview(op, t.version, changes, simulation=Simulation(state, weights=weights))


def addition(state: MemoryState, ids: Sequence[str], labels: Sequence[str], *, op: str, skipped: Sequence[str] = (),
             vectors: Union[np.ndarray, Callable[[], np.ndarray], None] = None) -> EditPreview:
    """Records would be appended; ``vectors`` (or a function giving them) is only needed to probe."""
    t = state.rows
    names = t.labels.names
    lookup = {n: i for i, n in enumerate(names)}
    codes = []
    for lab in labels:
        if lab not in lookup:
            lookup[lab] = len(names)
            names = names + [lab]
        codes.append(lookup[lab])
    changes = [RecordChange(i, None, lab, None, 1.0) for i, lab in zip(ids, labels)]

    def added():
        v = vectors() if callable(vectors) else vectors
        if v is None:
            raise ValueError("this add preview has no vectors to probe with")
        return np.ascontiguousarray(v, np.float32), np.asarray(codes, np.int64)

    sim = Simulation(state, names=names, added=added if len(ids) else None)
    return EditPreview(op, t.version, changes, skipped=list(skipped), simulation=sim)
