"""Small printable result objects returned by the memory's verbs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


def json_safe(obj: Any) -> Any:
    """``obj`` as standard JSON values: numpy scalars as Python numbers, NaN and +-inf as None.

    JSON has no NaN or Infinity (``json.dumps`` writes ``Infinity``, which
    strict parsers refuse); a score that is undefined, such as the OOD score of
    a query in an empty memory, is ``null``.

    >>> json_safe({"ood_score": float("inf"), "k": np.int64(3), "s": [np.float32(0.5), float("nan")]})
    {'ood_score': None, 'k': 3, 's': [0.5, None]}
    """
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass(frozen=True)
class Neighbor:
    """One retrieved record and its part in a decision.

    ``contribution`` = vote weight (from rank/similarity) x ``weight`` (the
    record's own weight); the label's score is the sum of its contributions.
    ``rank`` is the position in the retrieved list; a weight-0 neighbour
    contributes 0 and takes no rank in the vote (`visual_memory.vote`).
    """

    id: str
    label: str
    similarity: float
    rank: int
    weight: float
    contribution: float

    @property
    def distance(self) -> float:
        return 1.0 - self.similarity

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "label": self.label,
            "similarity": self.similarity,
            "distance": self.distance,
            "rank": self.rank,
            "weight": self.weight,
            "contribution": self.contribution,
        }


UNKNOWN = "unknown"  # the label of a prediction that abstained (`Memory.classify(abstain_below=...)`)


class Prediction:
    """The decision for one query, fully attributable to its neighbours.

    Attributes
    ----------
    label : str or None
        Winning label (None if no neighbour could vote, e.g. an empty memory).
    scores : dict[str, float]
        Summed contributions per label, highest first; equal totals in the
        order they were reached, so the first is the winner (`visual_memory.vote`).
    neighbors : list[Neighbor]
        The k retrieved records, nearest first (built lazily).
    k : int
    vote : str
    version : int
        Memory version the prediction was made against.
    winner : str or None
        The label the vote chose, even when the prediction abstained.
    abstained : bool
        True when ``confidence`` fell below ``abstain_below``; ``label`` is then
        `UNKNOWN` (the string "unknown"), never a guess.
    rerank : RerankResult or None
        Set by ``Memory.classify(..., rerank=...)``: what the vision-language
        model chose among the neighbours' labels (``label`` is then its choice,
        unless it fell back; ``winner`` stays the vote's). See `visual_memory.rerank`.

    Confidence and novelty (`visual_memory.scores` has the formulas):
    ``confidence`` (vote share of the winner), ``plurality_count``,
    ``agreement`` (1 - normalised label entropy) and ``ood_score`` (mean
    cosine distance to the k neighbours; higher = more novel; ``inf`` with no
    neighbour, ``None`` in `to_dict`, which is standard JSON).
    """

    __slots__ = ("label", "scores", "k", "vote", "version", "winner", "abstained", "n_classes", "rerank",
                 "_ids", "_labels", "_sims", "_weights", "_contrib", "_neighbors")

    def __init__(self, *, label, scores, k, vote, version, ids, labels, sims, weights, contrib,
                 n_classes: Optional[int] = None, abstain_below: Optional[float] = None) -> None:
        self.label: Optional[str] = label
        self.winner: Optional[str] = label
        self.scores: dict[str, float] = scores
        self.k, self.vote, self.version = k, vote, version
        self.n_classes = n_classes
        self._ids, self._labels, self._sims, self._weights, self._contrib = ids, labels, sims, weights, contrib
        self._neighbors: Optional[list[Neighbor]] = None
        self.rerank = None
        self.abstained = abstain_below is not None and self.confidence < abstain_below
        if self.abstained:
            self.label = UNKNOWN

    @property
    def neighbors(self) -> list[Neighbor]:
        if self._neighbors is None:
            self._neighbors = [
                Neighbor(i, lab, float(s), r, float(w), float(c))
                for r, (i, lab, s, w, c) in enumerate(zip(self._ids, self._labels, self._sims, self._weights, self._contrib))
                if i is not None
            ]
        return self._neighbors

    @property
    def confidence(self) -> float:
        """Share of the total vote that went to the winning label (0..1)."""
        total = sum(self.scores.values())
        return float(self.scores.get(self.winner, 0.0) / total) if total > 0 and self.winner is not None else 0.0

    def _codes(self) -> np.ndarray:
        names = {lab: i for i, lab in enumerate(dict.fromkeys(x for x in self._labels if x is not None))}
        return np.array([[names[x] if x is not None else -1 for x in self._labels]], dtype=np.int64)

    @property
    def plurality_count(self) -> int:
        """How many of the k neighbours carry the most common label."""
        from .scores import plurality_counts

        return int(plurality_counts(self._codes())[0]) if len(self._labels) else 0

    @property
    def agreement(self) -> float:
        """1 - normalised entropy of the neighbours' labels (1 = unanimous)."""
        from .scores import label_agreement

        return float(label_agreement(self._codes(), self.n_classes)[0]) if len(self._labels) else 1.0

    @property
    def ood_score(self) -> float:
        """Mean cosine distance to the k neighbours (higher = farther from anything in memory)."""
        from .scores import ood_scores

        return float(ood_scores(np.asarray(self._sims, dtype=np.float64)[None, :])[0])

    def to_dict(self) -> dict[str, Any]:
        out = {
            "label": self.label,
            "winner": self.winner,
            "abstained": self.abstained,
            "confidence": self.confidence,
            "plurality_count": self.plurality_count,
            "agreement": self.agreement,
            "ood_score": json_safe(self.ood_score),
            "scores": self.scores,
            # JSON objects are unordered (and JavaScript lists integer-like keys first): the vote's order, winner first.
            "ranking": list(self.scores),
            "k": self.k,
            "vote": self.vote,
            "version": self.version,
            "neighbors": [n.to_dict() for n in self.neighbors],
        }
        if self.rerank is not None:
            out["rerank"] = self.rerank.to_dict()
        return out

    def __repr__(self) -> str:
        top = ", ".join(f"{k}={v:.3f}" for k, v in list(self.scores.items())[:3])
        return f"Prediction(label={self.label!r}, scores={{{top}}}, k={self.k}, vote={self.vote!r}, version={self.version})"


@dataclass(frozen=True)
class AddResult:
    """What `Memory.add` / `add_embeddings` did."""

    version: int
    added: int
    skipped: list[str] = field(default_factory=list)  # ids already present (skip_existing=True)
    ids: list[str] = field(default_factory=list, repr=False)


@dataclass
class EvalResult:
    """Top-1 accuracy of each vote at each k over labelled queries."""

    n_queries: int
    accuracy: dict[str, dict[int, float]]
    version: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "n_queries": self.n_queries,
            "version": self.version,
            "accuracy": {v: {str(k): a for k, a in accs.items()} for v, accs in self.accuracy.items()},
            **self.extra,
        }

    def best(self) -> dict[str, tuple[int, float]]:
        """(k, accuracy) of the best k for each vote."""
        return {v: max(accs.items(), key=lambda kv: (kv[1], -kv[0])) for v, accs in self.accuracy.items()}


def to_py(x):
    """numpy scalars -> python, for JSON."""
    if isinstance(x, np.generic):
        return x.item()
    return x


@dataclass(frozen=True)
class RemoveResult:
    """What `Memory.remove` did: the new version, how many records stopped voting, and which."""

    version: int
    removed: int
    ids: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"version": self.version, "removed": self.removed, "ids": list(self.ids)}


@dataclass(frozen=True)
class EditResult:
    """What `Memory.relabel` / `Memory.reweight` did (records whose value actually changed)."""

    version: int
    changed: int

    def to_dict(self) -> dict:
        return {"version": self.version, "changed": self.changed}


@dataclass(frozen=True)
class ForgetReceipt:
    """Proof of a `Memory.forget`: what was erased, when, and what a scan of every file found.

    Ids never appear in a receipt: ``id_hashes`` are SHA-256 of the memory's
    salt (``manifest.json``, ``audit_salt``) followed by the id, so the owner
    of the memory can check whether an id was forgotten and nobody else can
    read one off the receipt.

    Attributes
    ----------
    erased : int
        Records erased (present ones plus removed-but-still-on-disk ones).
    id_hashes : list of str
        Salted SHA-256 of each erased id, sorted.
    started_at, finished_at : str
        ISO-8601 UTC timestamps.
    version_before, version_after : int
        Memory versions around the forget (it makes 1-2 versions: the delete,
        then the rewrite of the fragments that held the records).
    versions_erased : list of int
        Earlier versions deleted because they held the records; every version
        still readable lacks them.
    tags_dropped : list of str
        Tags that named an erased version.
    verification : dict
        ``ok``, ``files_scanned``, ``bytes_scanned``, ``ids_scanned``,
        ``vectors_scanned``, ``texts_scanned`` (labels and sources only the
        forgotten records had), ``found`` (hits: file, kind, salted hash),
        ``shadowed`` (an id or text found only inside a string the memory
        still holds), ``ids_too_short`` / ``texts_too_short`` (under 8 bytes
        they are not scanned: such strings occur by chance), ``storage``
        (``kind``; on object storage ``bucket_versioning``,
        ``keeps_deleted_versions`` and a ``note``: a versioned bucket keeps
        every deleted object's older versions) and ``embedding_cache``
        (``dir``, ``entries_removed``, ``shards_rewritten``: the purge of the
        user's embedding cache).
    recovered : bool
        True when this forget was completed on reopen after a crash.
    near_threshold : float, optional
        For ``forget(images=..., near=T)``: the cosine-similarity threshold T.
    copies_found : int, optional
        With ``near``: records erased for being within T of an image, besides
        the images' own records (their copies).
    """

    erased: int
    id_hashes: list[str]
    started_at: str
    finished_at: str
    version_before: int
    version_after: int
    versions_erased: list[int]
    tags_dropped: list[str]
    verification: dict
    recovered: bool = False
    near_threshold: Optional[float] = None
    copies_found: Optional[int] = None

    def to_dict(self) -> dict:
        near = {} if self.near_threshold is None else {"near_threshold": self.near_threshold, "copies_found": self.copies_found}
        return {
            "erased": self.erased,
            "id_hashes": list(self.id_hashes),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "version_before": self.version_before,
            "version_after": self.version_after,
            "versions_erased": list(self.versions_erased),
            "tags_dropped": list(self.tags_dropped),
            "verification": dict(self.verification),
            "recovered": self.recovered,
            **near,
        }


@dataclass(frozen=True)
class OptimizeResult:
    """What `Memory.optimize` did to the records table and the in-RAM index."""

    version: int
    fragments_before: int
    fragments_after: int
    tombstones_dropped: int
    versions_removed: int
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)
