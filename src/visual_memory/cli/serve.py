"""serve (HTTP API + web UI) and explain (self-contained HTML)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

import visual_memory as vm

from ..vote import VOTES
from . import rerank as rr
from .app import app, handle_errors, new_table, print_json, print_table, say


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
@handle_errors
def serve(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (127.0.0.1 = this machine only)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    token: Optional[str] = typer.Option(
        None, "--token", envvar="VISMEM_TOKEN", help="Bearer token for edits (default: a random one, printed at start)."
    ),
    open_reads: bool = typer.Option(
        False, "--open-reads", help="Serve reads without the token even when listening beyond localhost."
    ),
    rerank: Optional[str] = rr.URL,
    rerank_model: Optional[str] = rr.MODEL,
    rerank_n: int = rr.N,
    rerank_labels_only: bool = rr.LABELS_ONLY,
    rerank_timeout: float = rr.TIMEOUT,
    rerank_concurrency: int = rr.CONCURRENCY,
    rerank_price: Optional[str] = rr.PRICE,
    allow_host: list[str] = typer.Option(
        [], "--allow-host", help="A host name clients may reach the server by, besides localhost and IP addresses "
        "(repeatable; *.example.com for sub-domains; * for any, e.g. behind a proxy that checks it)."
    ),
    allow_origin: list[str] = typer.Option(
        [], "--allow-origin", help="A browser origin allowed to call the API besides the UI's own "
        "(repeatable), e.g. https://vm.example.com when a TLS proxy serves the UI."
    ),
    ray: Optional[str] = typer.Option(
        None, "--ray", help="Search from Ray actors: 'local' (in-process), 'auto' (RAY_ADDRESS) or host:port."),
    shards: Optional[int] = typer.Option(None, "--shards", min=1, help="Shard actors with --ray (default 1)."),
) -> None:
    """Serve the HTTP API (docs at /docs) and the web UI (at /) for one memory.

    The server answers only to Host names it serves (localhost, IP addresses, --host, --allow-host:
    no DNS rebinding) and only to browser pages of its own origin (or --allow-origin).
    """
    import secrets

    import uvicorn

    from ..server import create_app

    token = token or secrets.token_urlsafe(24)
    protect_reads = not _is_loopback(host) and not open_reads
    reranker = rr.build_reranker(rerank, rerank_model, n=rerank_n, labels_only=rerank_labels_only, timeout=rerank_timeout,
                                 concurrency=rerank_concurrency, price=rerank_price)
    application = create_app(memory, token=token, protect_reads=protect_reads, reranker=reranker,
                             allowed_hosts=[host, *allow_host], allowed_origins=allow_origin)
    target = vm.open(memory, ray=ray, shards=shards) if ray is not None or shards is not None else memory
    application = create_app(target, token=token, protect_reads=protect_reads, reranker=reranker)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    say(f"serving {memory} at http://{shown}:{port}/  (API docs: /docs)")
    say(f"edit token: {token}")
    say(f"open the UI with the token filled in: http://{shown}:{port}/#token={token}")
    if protect_reads:
        say("listening beyond localhost: reads need the token too (--open-reads to lift that)")
    if reranker is not None:
        say(f"re-ranking on request (POST /classify?rerank=true) with {reranker.model}")
    uvicorn.run(application, host=host, port=port, log_level="info")


@app.command()
@handle_errors
def explain(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    image: Path = typer.Argument(..., dir_okay=False, help="The image file to explain."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML explanation here."),
    k: int = typer.Option(10, "--k", "-k", min=1, help="Neighbours that vote (and are shown)."),
    vote: str = typer.Option("rank", "--vote", help=f"One of: {', '.join(VOTES)}."),
    as_json: bool = typer.Option(False, "--json", help="Print the explanation as JSON (no thumbnails)."),
) -> None:
    """Why an image gets its label: neighbours with thumbnails, similarity, weight, contribution, vote totals."""
    e = vm.open(memory).explain(image, k=k, vote=vote)
    if as_json:
        print_json(e.to_dict(thumbnails=False))
    else:
        p = e.prediction
        say(("(no records)" if e.label is None else e.label, "bold"),
            f" (confidence {p.confidence:.2f}, k={p.k}, {vote} vote)")
        bars = new_table("label", "score", "", keep=("label",), right=("score",))
        top = max(e.scores.values(), default=1.0) or 1.0
        for lab, s in e.scores.items():
            bars.add_row(lab, f"{s:.3f}", "█" * max(1, round(30 * s / top)))
        print_table(bars)
        nb = new_table("rank", "label", "similarity", "weight", "contribution", "id",
                       keep=("label", "id"), right=("rank", "similarity", "weight", "contribution"))
        for n in e.neighbors:
            nb.add_row(str(n.rank + 1), n.label, f"{n.similarity:.3f}", f"{n.weight:g}", f"{n.contribution:.3f}", n.id)
        print_table(nb)
    if html is not None:
        e.save_html(html)
        say(f"wrote {html}")
