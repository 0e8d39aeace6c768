"""Small printable result objects returned by the memory's verbs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass(frozen=True)
class Neighbor:
    """One retrieved record and its part in a decision.

    ``contribution`` = vote weight (from rank/similarity) x ``weight`` (the
    record's own weight); the label's score is the sum of its contributions.
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


class Prediction:
    """The decision for one query, fully attributable to its neighbours.

    Attributes
    ----------
    label : str or None
        Winning label (None if no neighbour could vote, e.g. an empty memory).
    scores : dict[str, float]
        Summed contributions per label, highest first.
    neighbors : list[Neighbor]
        The k retrieved records, nearest first (built lazily).
    k : int
    vote : str
    version : int
        Memory version the prediction was made against.
    """

    __slots__ = ("label", "scores", "k", "vote", "version", "_ids", "_labels", "_sims", "_weights", "_contrib", "_neighbors")

    def __init__(self, *, label, scores, k, vote, version, ids, labels, sims, weights, contrib) -> None:
        self.label: Optional[str] = label
        self.scores: dict[str, float] = scores
        self.k, self.vote, self.version = k, vote, version
        self._ids, self._labels, self._sims, self._weights, self._contrib = ids, labels, sims, weights, contrib
        self._neighbors: Optional[list[Neighbor]] = None

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
        return float(self.scores.get(self.label, 0.0) / total) if total > 0 and self.label is not None else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "confidence": self.confidence,
            "scores": self.scores,
            "k": self.k,
            "vote": self.vote,
            "version": self.version,
            "neighbors": [n.to_dict() for n in self.neighbors],
        }

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
