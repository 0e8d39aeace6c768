"""What every re-ranker is and returns: the `Reranker` protocol and `RerankResult`.

A re-ranker looks at a query image and the neighbours that framed the
memory's vote, and picks one of the labels those neighbours carry. It never
invents a label and never writes to the memory; when it cannot answer, the
vote's label stands and ``fallback`` says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from ..images import ImageLike
    from ..memory import Memory
    from ..results import Prediction

# Why a re-rank fell back to the vote (`RerankResult.fallback`). Stable strings: scripts match on them.
FALLBACKS = {
    "no_candidates": "no neighbour carried a label (e.g. an empty memory)",
    "timeout": "the model did not answer within the timeout (after every retry)",
    "connection": "the endpoint could not be reached (after every retry)",
    "rate_limited": "HTTP 429 on every attempt, or a Retry-After longer than the cap",
    "server_error": "HTTP 5xx on every attempt",
    "http_error": "another HTTP error (e.g. 401 bad key, 404 unknown model); not retried",
    "bad_response": "the endpoint answered, but not in the protocol's shape (or with no text)",
    "unparseable": "the model's text names no label",
    "ambiguous": "the model's text names several candidate labels",
    "not_a_candidate": "the model answered a label no neighbour carries (rejected)",
    "error": "anything else (logged with its traceback)",
}


@dataclass(frozen=True)
class RerankResult:
    """The outcome of re-ranking one prediction.

    Attributes
    ----------
    label : str or None
        The label chosen: the model's answer if it named a candidate, else the
        vote's label (``fallback`` then says why).
    changed : bool
        True when ``label`` differs from the vote's label.
    rationale : str or None
        The model's one-sentence reason, when it gave one (at most 500 characters).
    model : str
        The model asked (e.g. "Qwen/Qwen2-VL-7B-Instruct", "gemini-2.5-flash").
    latency_s : float
        Wall time of this re-rank, retries and back-off included (0 for a cache hit's call).
    cost : float or None
        US dollars spent on this re-rank (0.0 for a cache hit); None when no
        prices were given (`VLMReranker(price_per_mtok=...)`).
    fallback : str or None
        None when the model's answer was used; otherwise one of `FALLBACKS`.
    detail : str or None
        A human-readable explanation of the fallback (never holds the API key).
    vote_label : str or None
        The label the vote chose (`Prediction.winner`).
    candidates : tuple of str
        The labels the model could choose from: the shown neighbours' labels, in order of first appearance.
    n_shown : int
        Neighbours shown to the model.
    prompt_version : str
    cached : bool
        True when the answer came from the re-rank cache (no call was made).
    attempts : int
        HTTP attempts made (0 for a cache hit or a fallback before any call).
    input_tokens, output_tokens : int or None
        Tokens this re-rank spent, as the endpoint reported them (0 for a cache hit).
    """

    label: Optional[str]
    changed: bool
    rationale: Optional[str]
    model: str
    latency_s: float
    cost: Optional[float]
    fallback: Optional[str]
    detail: Optional[str] = None
    vote_label: Optional[str] = None
    candidates: tuple = field(default=(), repr=False)
    n_shown: int = 0
    prompt_version: str = ""
    cached: bool = False
    attempts: int = 0
    input_tokens: Optional[int] = None
    output_tokens: Optional[int] = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["candidates"] = list(self.candidates)
        return out


@runtime_checkable
class Reranker(Protocol):
    """Anything that re-ranks a prediction: ``rerank(query_image, prediction, *, memory) -> RerankResult``.

    ``memory`` is the memory the prediction was made against: the prediction
    names its neighbours, the memory holds their thumbnails. Implementations
    must not mutate it, must only choose among the neighbours' labels, and
    must return the vote's label (with ``fallback`` set) instead of raising
    when the model fails. `VLMReranker` is the one shipped here.
    """

    def rerank(self, query_image: "ImageLike", prediction: "Prediction", *, memory: "Memory") -> RerankResult: ...


def fallback_result(prediction: "Prediction", *, model: str, reason: str, detail: Optional[str], candidates=(),
                    n_shown: int = 0, prompt_version: str = "", latency_s: float = 0.0, attempts: int = 0,
                    cost: Optional[float] = None, input_tokens: Optional[int] = None,
                    output_tokens: Optional[int] = None) -> RerankResult:
    """The vote's label, with why the model's answer was not used."""
    if reason not in FALLBACKS:
        raise ValueError(f"unknown fallback reason {reason!r}; expected one of {sorted(FALLBACKS)}")
    return RerankResult(
        label=prediction.winner, changed=False, rationale=None, model=model, latency_s=latency_s, cost=cost,
        fallback=reason, detail=detail, vote_label=prediction.winner, candidates=tuple(candidates), n_shown=n_shown,
        prompt_version=prompt_version, attempts=attempts, input_tokens=input_tokens, output_tokens=output_tokens,
    )
