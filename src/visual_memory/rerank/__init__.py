"""Re-rank the vote with a vision-language model (the paper's best result).

The paper's best ImageNet top-1 (88.5%, against 83.6% for the rank vote and
86.3% for a linear probe on the same DINOv2 L/14 features) came from giving
Gemini the query image with its 50 nearest neighbours and their labels and
asking for the label. Here the memory stays the source of truth: the model
only chooses among the labels the shown neighbours carry, every decision still
lists the neighbours that framed it, and any failure leaves the vote's label.

>>> from visual_memory.rerank import VLMReranker, OpenAIBackend
>>> r = VLMReranker(OpenAIBackend("http://127.0.0.1:8000/v1", model="Qwen/Qwen2-VL-7B-Instruct"), n=50)
>>> r.n, r.model
(50, 'Qwen/Qwen2-VL-7B-Instruct')

Then ``mem.classify(images, rerank=r)`` (each `Prediction` gets ``.rerank``),
``vismem classify MEM IMG --rerank http://127.0.0.1:8000/v1 --rerank-model NAME``,
``vismem eval ... --rerank ...`` and ``vismem serve ... --rerank ...``.

Modules: `base` (the `Reranker` protocol, `RerankResult`, fallback reasons),
`prompt` (the versioned prompt and the answer parser), `backends` (OpenAI-
compatible and Gemini), `reranker` (retries, limits, accounting), `cache`,
`evaluate`.
"""

from .backends import BackendError, Completion, GeminiBackend, OpenAIBackend, api_key_from_env, backend_from_url
from .base import FALLBACKS, Reranker, RerankResult
from .cache import RerankCache
from .evaluate import RerankEvaluation, RerankStats, evaluate_rerank
from .prompt import PROMPT_VERSION, QUERY_MAX_SIDE, Prompt, build_prompt, parse_answer
from .reranker import RerankRequest, VLMReranker, attach, rerank_predictions

__all__ = [
    "BackendError",
    "Completion",
    "FALLBACKS",
    "GeminiBackend",
    "OpenAIBackend",
    "PROMPT_VERSION",
    "Prompt",
    "QUERY_MAX_SIDE",
    "RerankCache",
    "RerankEvaluation",
    "RerankRequest",
    "RerankResult",
    "RerankStats",
    "Reranker",
    "VLMReranker",
    "api_key_from_env",
    "attach",
    "backend_from_url",
    "build_prompt",
    "evaluate_rerank",
    "make_reranker",
    "parse_answer",
    "rerank_predictions",
]


def make_reranker(url: str, model: str, *, n: int = 50, labels_only: bool = False, timeout: float = 60.0,
                  max_concurrency: int = 4, price_per_mtok=None, cache=True, **options) -> VLMReranker:
    """A `VLMReranker` for a ``--rerank`` URL (see `backend_from_url`): what the CLI and server build."""
    backend = backend_from_url(url, model=model, timeout=timeout)
    return VLMReranker(backend, n=n, labels_only=labels_only, max_concurrency=max_concurrency,
                       price_per_mtok=price_per_mtok, cache=cache, **options)
