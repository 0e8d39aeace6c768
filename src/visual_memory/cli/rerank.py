"""The ``--rerank*`` options shared by classify, eval and serve, and how their results print."""

from __future__ import annotations

from typing import Optional

import typer

from .app import new_table, print_table, styled

URL = typer.Option(None, "--rerank", metavar="URL",
                   help="Re-rank the vote with a vision-language model: an OpenAI-compatible endpoint "
                        "(e.g. http://127.0.0.1:8000/v1 for vllm serve), 'gemini', or 'gemini+URL'. "
                        "API key from $VISMEM_RERANK_API_KEY (else $OPENAI_API_KEY / $GEMINI_API_KEY).")
MODEL = typer.Option(None, "--rerank-model", metavar="NAME", help="Model name for --rerank (e.g. Qwen/Qwen2-VL-7B-Instruct, gemini-2.5-flash).")
N = typer.Option(50, "--rerank-n", min=1, help="Neighbours shown to the model (with their labels).")
LABELS_ONLY = typer.Option(False, "--rerank-labels-only", help="Show the neighbours' labels but not their thumbnails.")
TIMEOUT = typer.Option(60.0, "--rerank-timeout", min=0.001, help="Seconds per model request.")
CONCURRENCY = typer.Option(4, "--rerank-concurrency", min=1, help="Model requests in flight at once.")
PRICE = typer.Option(None, "--rerank-price", metavar="IN,OUT", help="US dollars per million input,output tokens (for cost accounting).")


def build_reranker(url: Optional[str], model: Optional[str], *, n: int, labels_only: bool, timeout: float,
                   concurrency: int, price: Optional[str]):
    """The `VLMReranker` the options describe, or None without ``--rerank``."""
    if url is None:
        if model is not None:
            raise typer.BadParameter("--rerank-model needs --rerank URL")
        return None
    if not model:
        raise typer.BadParameter("--rerank needs --rerank-model NAME (the model the endpoint serves)")
    prices = None
    if price is not None:
        try:
            prices = tuple(float(x) for x in price.split(","))
        except ValueError:
            raise typer.BadParameter(f"--rerank-price must be IN,OUT dollars per million tokens, e.g. 0.10,0.40; got {price!r}") from None
    from ..rerank import make_reranker

    return make_reranker(url, model, n=n, labels_only=labels_only, timeout=timeout, max_concurrency=concurrency,
                         price_per_mtok=prices)


def _money(cost: Optional[float]) -> str:
    return "unknown (no --rerank-price)" if cost is None else f"${cost:.4f}"


def print_rerank_eval(ev) -> None:
    """The `vismem eval --rerank` table: accuracy with and without, flips, latency, tokens, cost."""
    s = ev.stats
    t = new_table("measure", "value", keep=("measure",),
                  title=f"re-ranking with {ev.model} ({ev.n_queries} queries, {ev.vote} vote at k={ev.k}, "
                        f"{ev.n_shown} neighbours shown, prompt {ev.prompt_version})")
    t.show_header = False
    pct = (lambda x: f"{x} ({100 * x / max(1, ev.n_queries):.1f}%)")
    rows = [
        ("accuracy, vote", f"{ev.accuracy_vote:.4f}"),
        ("accuracy, re-ranked", styled((f"{ev.accuracy_rerank:.4f}", "bold"))),
        ("changed", pct(ev.changed)),
        ("  wrong -> right", str(ev.wrong_to_right)),
        ("  right -> wrong", str(ev.right_to_wrong)),
        ("  wrong -> wrong", str(ev.wrong_to_wrong)),
        ("fallbacks (vote kept)", ", ".join(f"{k} {v}" for k, v in s.fallbacks.items()) or "none"),
        ("calls / cache hits / attempts", f"{s.calls} / {s.cache_hits} / {s.attempts}"),
        ("latency per call (mean, p50, p95, max)",
         "-" if s.latency_mean_s is None else f"{s.latency_mean_s:.2f}, {s.latency_p50_s:.2f}, {s.latency_p95_s:.2f}, {s.latency_max_s:.2f} s"),
        ("tokens in / out", f"{s.input_tokens} / {s.output_tokens}"),
        ("cost", _money(s.cost)),
    ]
    for name, value in rows:
        t.add_row(name, value)
    print_table(t)
