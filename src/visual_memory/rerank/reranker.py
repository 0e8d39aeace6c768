"""`VLMReranker`: ask a vision-language model to choose among the neighbours' labels.

One policy for every backend: a concurrency limit (a semaphore held only
while a request is in flight, so it binds across threads, eval workers and
server requests alike), retries with exponential back-off and jitter on 429,
5xx, 408, timeouts and refused connections (a ``Retry-After`` is honoured
exactly, up to a cap), per-call token/cost/latency accounting, and the
on-disk cache (`visual_memory.rerank.cache`). Whatever goes wrong, the result
is the vote's label with ``fallback`` saying why; only bad *input* (an
unreadable query image, a bad option) raises.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

from .backends import BackendError
from .base import RerankResult, fallback_result
from .cache import CACHE_SUBDIR, RerankCache, cache_key
from .prompt import PROMPT_VERSION, QUERY_MAX_SIDE, Prompt, build_prompt, parse_answer, query_jpeg, shown_neighbors

if TYPE_CHECKING:  # pragma: no cover
    from ..memory import Memory
    from ..results import Prediction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankRequest:
    """Everything `VLMReranker.complete` needs, gathered from the memory by `VLMReranker.prepare`."""

    prediction: "Prediction"
    prompt: Prompt
    query_sha256: str
    memory_version: int
    cache: Optional[RerankCache]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _seconds(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0; got {value!r}")
    return float(value)


class VLMReranker:
    """Re-rank predictions with a vision-language model (the paper's 88.5% protocol).

    Parameters
    ----------
    backend : OpenAIBackend or GeminiBackend
        Anything with ``provider``, ``model`` and ``complete(prompt) -> Completion``.
    n : int, default 50
        Neighbours shown (the prediction's first n voting neighbours; at most its k).
    labels_only : bool, default False
        Show the neighbours' labels but not their thumbnails.
    retries : int, default 2
        Extra attempts after a retryable failure (so 3 attempts at most).
    backoff : float, default 0.5
        First back-off in seconds; doubled per retry, with +-50% jitter, at most ``max_backoff``.
    max_backoff : float, default 8
    max_retry_after : float, default 30
        A ``Retry-After`` longer than this is not waited for: the call falls back ("rate_limited").
    max_concurrency : int, default 4
        Requests in flight at once through this reranker, across all threads.
    cache : bool, str or PathLike, default True
        True: ``<memory>/cache/rerank/`` (dropped by forget); a folder: there; False: no cache.
    price_per_mtok : (float, float), optional
        US dollars per million input and output tokens, for ``cost``; None leaves cost unknown.
    query_size : int, default 384
        Longer side of the query image sent, in pixels (`visual_memory.rerank.prompt.QUERY_MAX_SIDE`).
    """

    def __init__(self, backend, *, n: int = 50, labels_only: bool = False, retries: int = 2, backoff: float = 0.5,
                 max_backoff: float = 8.0, max_retry_after: float = 30.0, max_concurrency: int = 4,
                 cache: Union[bool, str, os.PathLike] = True, price_per_mtok: Optional[Sequence[float]] = None,
                 query_size: int = QUERY_MAX_SIDE) -> None:
        if not callable(getattr(backend, "complete", None)) or not isinstance(getattr(backend, "model", None), str):
            raise TypeError(f"backend must have a `model` name and a `complete(prompt)` method; got {type(backend).__name__}")
        self.backend = backend
        self.n = _positive_int("n (neighbours shown)", n)
        self.labels_only = bool(labels_only)
        self.retries = _positive_int("retries", retries, 0)
        self.backoff, self.max_backoff = _seconds("backoff", backoff), _seconds("max_backoff", max_backoff)
        self.max_retry_after = _seconds("max_retry_after", max_retry_after)
        self.max_concurrency = _positive_int("max_concurrency", max_concurrency)
        self.query_size = _positive_int("query_size", query_size, 16)
        if price_per_mtok is not None:
            price_per_mtok = tuple(float(p) for p in price_per_mtok)
            if len(price_per_mtok) != 2 or min(price_per_mtok) < 0:
                raise ValueError(f"price_per_mtok must be (input, output) US dollars per million tokens, both >= 0; got {price_per_mtok!r}")
        self.price_per_mtok = price_per_mtok
        if cache is not True and cache is not False and cache is not None and not isinstance(cache, (str, os.PathLike)):
            raise TypeError(f"cache must be True, False or a folder path; got {type(cache).__name__}")
        self._cache_setting = cache
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._sleep = time.sleep

    @property
    def model(self) -> str:
        return self.backend.model

    def __repr__(self) -> str:
        return f"VLMReranker({self.backend!r}, n={self.n}, labels_only={self.labels_only}, max_concurrency={self.max_concurrency})"

    # -- the protocol ------------------------------------------------------------------

    def rerank(self, query_image, prediction: "Prediction", *, memory: "Memory") -> RerankResult:
        """Re-rank one prediction (`prepare` then `complete`)."""
        return self.complete(self.prepare(query_image, prediction, memory=memory))

    def prepare(self, query_image, prediction: "Prediction", *, memory: "Memory") -> RerankRequest:
        """Read what the model will see: the query JPEG and the neighbours' thumbnails. Touches the memory; no network.

        Call it where the prediction was made (e.g. under the server's read
        lock); `complete` may then run anywhere, for as long as the model takes.
        """
        jpeg, sha = query_jpeg(query_image, max_side=self.query_size)
        shown = shown_neighbors(memory, prediction, min(self.n, prediction.k), labels_only=self.labels_only)
        return RerankRequest(prediction, build_prompt(jpeg, shown, labels_only=self.labels_only), sha,
                             int(prediction.version), self._cache_for(memory))

    def _cache_for(self, memory) -> Optional[RerankCache]:
        setting = self._cache_setting
        if setting is True:
            from ..store import DERIVED_CACHE

            return RerankCache(Path(memory.path) / DERIVED_CACHE / CACHE_SUBDIR)
        return RerankCache(setting) if setting else None

    def key(self, request: RerankRequest) -> str:
        """The cache key of a request (see `visual_memory.rerank.cache`)."""
        return cache_key(query=request.query_sha256, memory_version=request.memory_version,
                         provider=getattr(self.backend, "provider", type(self.backend).__name__), model=self.model,
                         prompt=PROMPT_VERSION, n=self.n, labels_only=self.labels_only, query_size=self.query_size,
                         neighbors=request.prompt.neighbors_digest)

    def complete(self, request: RerankRequest) -> RerankResult:
        """Ask the model (or the cache); never raises for a model failure."""
        pred, prompt = request.prediction, request.prompt
        common = {"model": self.model, "candidates": prompt.candidates, "n_shown": prompt.n_shown, "prompt_version": PROMPT_VERSION}
        if not prompt.candidates:
            return fallback_result(pred, reason="no_candidates", detail="no voting neighbour to choose a label from", **common)
        key = self.key(request)
        start = time.monotonic()
        if request.cache is not None:
            hit = request.cache.get(key)
            if hit is not None and hit.get("label") in prompt.candidates:
                return RerankResult(label=hit["label"], changed=hit["label"] != pred.winner, rationale=hit.get("rationale"),
                                    latency_s=time.monotonic() - start, cost=0.0, fallback=None, vote_label=pred.winner,
                                    cached=True, attempts=0, input_tokens=0, output_tokens=0, **common)
        attempts, completion = 0, None
        while completion is None:
            attempts += 1
            try:
                with self._slots:
                    completion = self.backend.complete(prompt)
            except BackendError as exc:
                wait = self._wait_before_retry(exc, attempts)
                if isinstance(wait, str):
                    return fallback_result(pred, reason=exc.reason, detail=f"{exc} ({wait})", attempts=attempts,
                                           latency_s=time.monotonic() - start, **common)
                log.info("re-rank attempt %d failed (%s); retrying in %.2f s", attempts, exc, wait)
                self._sleep(wait)
            except Exception as exc:  # a backend bug must not break classification
                log.exception("re-rank backend %r raised", self.backend)
                return fallback_result(pred, reason="error", detail=f"{type(exc).__name__}: {exc}", attempts=attempts,
                                       latency_s=time.monotonic() - start, **common)
        latency = time.monotonic() - start
        spent = {"attempts": attempts, "latency_s": latency, "cost": self._cost(completion),
                 "input_tokens": completion.input_tokens, "output_tokens": completion.output_tokens}
        parsed = parse_answer(completion.text, prompt.candidates)
        log.debug("re-rank %s: %s in %.2f s, %d attempt(s), tokens %s/%s", self.model, parsed.label or parsed.fallback,
                  latency, attempts, completion.input_tokens, completion.output_tokens)
        if parsed.fallback is not None:
            detail = parsed.detail if completion.text else f"{parsed.detail} ({completion.note})"
            reason = "bad_response" if not completion.text else parsed.fallback
            return fallback_result(pred, reason=reason, detail=detail, **common, **spent)
        if request.cache is not None:
            request.cache.put(key, {"label": parsed.label, "rationale": parsed.rationale, "model": self.model,
                                    "prompt_version": PROMPT_VERSION, "input_tokens": completion.input_tokens,
                                    "output_tokens": completion.output_tokens, "cost": spent["cost"],
                                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return RerankResult(label=parsed.label, changed=parsed.label != pred.winner, rationale=parsed.rationale,
                            fallback=None, vote_label=pred.winner, **common, **spent)

    def _wait_before_retry(self, exc: BackendError, attempts: int) -> Union[float, str]:
        """Seconds to sleep before the next attempt, or why there is none."""
        if not exc.retryable:
            return "not retried"
        if attempts > self.retries:
            return f"{attempts} attempt(s)"
        if exc.retry_after is not None:
            if exc.retry_after > self.max_retry_after:
                return f"Retry-After {exc.retry_after:g} s exceeds the {self.max_retry_after:g} s cap"
            return exc.retry_after  # the server said when; not sooner
        return min(self.max_backoff, self.backoff * 2 ** (attempts - 1)) * random.uniform(0.5, 1.5)

    def _cost(self, completion) -> Optional[float]:
        if self.price_per_mtok is None or completion.input_tokens is None or completion.output_tokens is None:
            return None
        p_in, p_out = self.price_per_mtok
        return (completion.input_tokens * p_in + completion.output_tokens * p_out) / 1e6

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()


def attach(prediction: "Prediction", result: RerankResult) -> None:
    """Record ``result`` on ``prediction``: ``.rerank`` always, ``.label`` when the model's answer was used."""
    prediction.rerank = result
    if result.fallback is None:
        prediction.label = result.label


def rerank_predictions(reranker, memory: "Memory", images: Sequence, predictions: Sequence["Prediction"], *,
                       progress: Union[bool, str] = False) -> list[RerankResult]:
    """Re-rank many predictions, ``reranker.max_concurrency`` at a time, and `attach` each result.

    The memory is read in this thread (one `prepare` per query, in order);
    only the model calls run on worker threads. A `Reranker` without
    ``prepare``/``complete`` is called one query at a time.

    Returns
    -------
    list of RerankResult, in the order of ``predictions``.
    """
    from ..progress import progress_bar

    if len(images) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions but {len(images)} query images")
    results: list[Optional[RerankResult]] = [None] * len(predictions)
    label = progress if isinstance(progress, str) else "re-ranking"
    with progress_bar(label if progress and predictions else False, total=len(predictions), unit="query") as bar:
        if not (hasattr(reranker, "prepare") and hasattr(reranker, "complete")):
            for i, (img, pred) in enumerate(zip(images, predictions)):
                results[i] = reranker.rerank(img, pred, memory=memory)
                bar.advance()
        else:
            workers = max(1, int(getattr(reranker, "max_concurrency", 1)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rerank") as pool:
                futures = [pool.submit(reranker.complete, reranker.prepare(img, pred, memory=memory))
                           for img, pred in zip(images, predictions)]
                for i, fut in enumerate(futures):
                    results[i] = fut.result()
                    bar.advance()
    for pred, res in zip(predictions, results):
        attach(pred, res)
    return results  # type: ignore[return-value]


def rerank_queries(reranker, memory: "Memory", queries, predictions: Sequence["Prediction"], *,
                   progress: Union[bool, str] = False) -> list[RerankResult]:
    """What ``Memory.classify(queries, rerank=reranker)`` runs after the vote."""
    import numpy as np

    from ..images import as_list

    if isinstance(queries, np.ndarray) and queries.dtype.kind == "f":
        raise ValueError("rerank needs the query images (the model looks at them); got float vectors. "
                         "Pass images, or classify vectors and call visual_memory.rerank.rerank_predictions(..., images=...)")
    if not callable(getattr(reranker, "rerank", None)):
        raise TypeError(f"rerank must be a Reranker (e.g. visual_memory.rerank.VLMReranker); got {type(reranker).__name__}")
    return rerank_predictions(reranker, memory, as_list(queries), predictions,
                              progress="re-ranking" if progress else False)
