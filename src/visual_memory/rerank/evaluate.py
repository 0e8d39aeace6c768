"""Accuracy with and without re-ranking on labelled queries, with what it cost."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from .base import RerankResult
from .reranker import rerank_predictions

if TYPE_CHECKING:  # pragma: no cover
    from ..memory import Memory


@dataclass(frozen=True)
class RerankStats:
    """Accounting over many re-ranks (per eval).

    ``calls`` counts queries sent to the model (cache hits excluded);
    ``cost`` is None when any call's cost was unknown (no prices given).
    Latencies are per query, in seconds, over the calls made.
    """

    queries: int
    calls: int
    cache_hits: int
    attempts: int
    fallbacks: dict
    input_tokens: int
    output_tokens: int
    cost: Optional[float]
    latency_mean_s: Optional[float]
    latency_p50_s: Optional[float]
    latency_p95_s: Optional[float]
    latency_max_s: Optional[float]

    @classmethod
    def of(cls, results: Sequence[RerankResult]) -> "RerankStats":
        called = [r for r in results if not r.cached and r.attempts > 0]
        lat = np.array([r.latency_s for r in called], dtype=np.float64)
        costs = [r.cost for r in called]
        stat = (lambda f: float(f(lat)) if len(lat) else None)
        return cls(
            queries=len(results), calls=len(called), cache_hits=sum(r.cached for r in results),
            attempts=sum(r.attempts for r in results),
            fallbacks=dict(Counter(r.fallback for r in results if r.fallback is not None).most_common()),
            input_tokens=sum(r.input_tokens or 0 for r in called), output_tokens=sum(r.output_tokens or 0 for r in called),
            cost=None if any(c is None for c in costs) else float(sum(costs)),
            latency_mean_s=stat(np.mean), latency_p50_s=stat(np.median),
            latency_p95_s=stat(lambda x: np.percentile(x, 95)), latency_max_s=stat(np.max),
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RerankEvaluation:
    """What `evaluate_rerank` measured.

    Attributes
    ----------
    n_queries : int
    k, vote : the vote re-ranked (its neighbours framed the prompt)
    model, prompt_version, n_shown : int
    accuracy_vote, accuracy_rerank : float
        Top-1 accuracy of the vote alone and after re-ranking (fallbacks keep the vote's label).
    changed : int
        Queries whose label the model changed.
    right_to_wrong, wrong_to_right, wrong_to_wrong : int
        Among the changed ones: the vote was right and the model wrong; the
        reverse; both wrong (a different wrong label).
    stats : RerankStats
    """

    n_queries: int
    k: int
    vote: str
    model: str
    prompt_version: str
    n_shown: int
    accuracy_vote: float
    accuracy_rerank: float
    changed: int
    right_to_wrong: int
    wrong_to_right: int
    wrong_to_wrong: int
    stats: RerankStats
    version: int = 0
    results: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("stats", "results")}
        out["stats"] = self.stats.to_dict()
        return out


def evaluate_rerank(
    memory: "Memory",
    queries,
    labels: Sequence[str],
    *,
    images: Sequence,
    reranker,
    k: Optional[int] = None,
    vote: str = "rank",
    progress: Union[bool, str] = False,
) -> RerankEvaluation:
    """Classify labelled queries, re-rank every prediction, and compare.

    Parameters
    ----------
    memory : Memory
    queries : array of shape (n, dim), or images
        What the vote searches with (precomputed embeddings avoid re-embedding).
    labels : sequence of str, length n
        True labels.
    images : sequence of images, length n
        The query images the model is shown (paths, bytes, PIL, arrays).
    reranker : VLMReranker or any `Reranker`
    k : int, optional
        Neighbours retrieved for the vote; default the reranker's ``n`` (50).
    vote : str, default "rank"

    Returns
    -------
    RerankEvaluation
    """
    labels = [str(x) for x in labels]
    if len(images) != len(labels):
        raise ValueError(f"got {len(labels)} labels but {len(images)} query images")
    k = int(k if k is not None else getattr(reranker, "n", 50))
    preds = memory.classify(queries, k=k, vote=vote)
    if len(preds) != len(labels):
        raise ValueError(f"got {len(preds)} queries but {len(labels)} labels")
    before = [p.label for p in preds]
    results = rerank_predictions(reranker, memory, list(images), preds, progress=progress)
    truth = np.array(labels, dtype=object)
    was = np.array(before, dtype=object) == truth
    now = np.array([p.label for p in preds], dtype=object) == truth
    changed = np.array([r.changed for r in results], dtype=bool)
    n = max(1, len(labels))
    return RerankEvaluation(
        n_queries=len(labels), k=k, vote=vote, model=str(getattr(reranker, "model", type(reranker).__name__)),
        prompt_version=results[0].prompt_version if results else "", n_shown=max((r.n_shown for r in results), default=0),
        accuracy_vote=float(was.sum() / n), accuracy_rerank=float(now.sum() / n), changed=int(changed.sum()),
        right_to_wrong=int((changed & was & ~now).sum()), wrong_to_right=int((changed & ~was & now).sum()),
        wrong_to_wrong=int((changed & ~was & ~now).sum()), stats=RerankStats.of(results), version=memory.version,
        results=results,
    )
