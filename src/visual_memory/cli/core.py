"""create, add, classify, info, eval, demo."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

import visual_memory as vm

from ..vote import VOTES
from . import rerank as rr
from .app import app, console, handle_errors, parse_ks, print_json


@app.command()
@handle_errors
def create(
    memory: Path = typer.Argument(..., help="Directory for the new memory."),
    encoder: str = typer.Option("efficientnet-lite0", "--encoder", "-e", help="Encoder name (see `vismem encoders`)."),
    index: str = typer.Option("Flat", "--index", help='FAISS index factory string ("Flat" = exact).'),
) -> None:
    """Create an empty memory."""
    mem = vm.create(memory, encoder=encoder, index=index)
    console.print(f"created {mem.path} (encoder {encoder}, {mem.dim}-d, index {index})")


@app.command()
@handle_errors
def add(
    memory: Path = typer.Argument(..., help="Memory directory."),
    paths: List[Path] = typer.Argument(..., help="Images, or folders (a folder without --label is an ImageFolder: one sub-folder per class)."),
    label: Optional[str] = typer.Option(None, "--label", "-l", help="Label for every image given."),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="Provenance stored with each record (default: file path)."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip images whose id is already present (default: refuse and add nothing)."),
    lock_timeout: float = typer.Option(0.0, "--lock-timeout", help="Seconds to wait for another writer."),
) -> None:
    """Add images (files or folders) to a memory."""
    mem = vm.open(memory)
    total = 0
    skipped = 0
    for p in paths:
        if p.is_dir():
            r = mem.add(p, labels=label, source=source, skip_existing=skip_existing, progress=f"adding {p.name}", lock_timeout=lock_timeout)
        else:
            if label is None:
                raise typer.BadParameter(f"{p}: a single image needs --label")
            r = mem.add(p, labels=label, source=source, skip_existing=skip_existing, lock_timeout=lock_timeout)
        total += r.added
        skipped += len(r.skipped)
    msg = f"added {total} record(s)"
    if skipped:
        msg += f", skipped {skipped} already present"
    console.print(f"{msg}; {len(mem)} in memory, version {mem.version}")


@app.command()
@handle_errors
def classify(
    memory: Path = typer.Argument(..., help="Memory directory."),
    images: List[Path] = typer.Argument(..., help="Images to classify."),
    k: int = typer.Option(50, "--k", "-k", min=1, help="Neighbours that vote."),
    vote: str = typer.Option("rank", "--vote", help=f"One of: {', '.join(VOTES)}."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with neighbours) instead of a table."),
    rerank: Optional[str] = rr.URL,
    rerank_model: Optional[str] = rr.MODEL,
    rerank_n: int = rr.N,
    rerank_labels_only: bool = rr.LABELS_ONLY,
    rerank_timeout: float = rr.TIMEOUT,
    rerank_concurrency: int = rr.CONCURRENCY,
    rerank_price: Optional[str] = rr.PRICE,
) -> None:
    """Classify images by their nearest memories (optionally re-ranked by a vision-language model)."""
    reranker = rr.build_reranker(rerank, rerank_model, n=rerank_n, labels_only=rerank_labels_only, timeout=rerank_timeout,
                                 concurrency=rerank_concurrency, price=rerank_price)
    mem = vm.open(memory)
    preds = mem.classify([str(p) for p in images], k=k, vote=vote, rerank=reranker, progress=reranker is not None and not as_json)
    if as_json:
        print_json([{"image": str(p), **pred.to_dict()} for p, pred in zip(images, preds)])
        return
    table = Table("image", "label", "confidence", "top neighbours (label, similarity)", *(["vote", "re-rank"] if reranker else []))
    for p, pred in zip(images, preds):
        nb = ", ".join(f"{n.label} {n.similarity:.2f}" for n in pred.neighbors[:3])
        extra = []
        if pred.rerank is not None:
            r = pred.rerank
            extra = [str(pred.winner), f"fallback: {r.fallback}" if r.fallback else ("changed" if r.changed else "kept")]
        table.add_row(*(escape(x) for x in (str(p), str(pred.label), f"{pred.confidence:.2f}", nb, *extra)))
    console.print(table)


@app.command()
@handle_errors
def info(
    memory: Path = typer.Argument(..., help="Memory directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Count, labels, encoder, dimension, version and size on disk."""
    data = vm.open(memory).info()
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]{data['path']}[/]")
    console.print(f"  records  {data['count']}")
    console.print(f"  encoder  {data['encoder']} ({data['dim']}-d, fingerprint {data['encoder_fingerprint']})")
    console.print(f"  index    {data['index']}")
    console.print(f"  version  {data['version']}")
    console.print(f"  on disk  {data['size_bytes'] / 1e6:.1f} MB")
    table = Table("label", "records")
    for lab, n in data["labels"].items():
        table.add_row(lab, str(n))
    console.print(table)


def print_accuracy(result: "vm.EvalResult", title: str = "top-1 accuracy") -> None:
    ks = sorted(next(iter(result.accuracy.values())).keys())
    table = Table(title=f"{title} ({result.n_queries} queries)")
    table.add_column("vote")
    for k in ks:
        table.add_column(f"k={k}", justify="right")
    best = max(a for accs in result.accuracy.values() for a in accs.values())
    for v, accs in result.accuracy.items():
        table.add_row(v, *[(f"[bold]{accs[k]:.4f}[/]" if accs[k] == best else f"{accs[k]:.4f}") for k in ks])
    console.print(table)


@app.command("eval")
@handle_errors
def eval_(
    memory: Path = typer.Argument(..., help="Memory directory."),
    folder: Path = typer.Argument(..., help="Labelled ImageFolder of queries (one sub-folder per class)."),
    k: str = typer.Option("1,10,20,50,100", "--k", help="Comma-separated k values."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON to this file."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Use only the first N queries of each class."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also run every paper evaluation and write JSON, PNGs and report.html into this folder."),
    rerank: Optional[str] = rr.URL,
    rerank_model: Optional[str] = rr.MODEL,
    rerank_n: int = rr.N,
    rerank_labels_only: bool = rr.LABELS_ONLY,
    rerank_timeout: float = rr.TIMEOUT,
    rerank_concurrency: int = rr.CONCURRENCY,
    rerank_price: Optional[str] = rr.PRICE,
) -> None:
    """Top-1 accuracy of every vote at every k over a labelled folder.

    With --rerank, also the rank vote at k = --rerank-n re-ranked by a
    vision-language model: accuracy with and without, decisions changed,
    latency, tokens and cost (bound the spend with --per-class).
    """
    from ..cache import embed_folder

    ks = parse_ks(k)
    reranker = rr.build_reranker(rerank, rerank_model, n=rerank_n, labels_only=rerank_labels_only, timeout=rerank_timeout,
                                 concurrency=rerank_concurrency, price=rerank_price)
    mem = vm.open(memory)
    vectors, labels, paths = embed_folder(mem.encoder, folder, per_class=per_class, progress="embedding queries")
    result = mem.evaluate(vectors, labels, ks=ks)
    print_accuracy(result)
    if reranker is not None:
        from ..rerank import evaluate_rerank

        ev = evaluate_rerank(mem, vectors, labels, images=paths, reranker=reranker, k=rerank_n, progress="re-ranking")
        rr.print_rerank_eval(ev)
        result.extra["rerank"] = ev.to_dict()
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(__import__("json").dumps(result.to_dict(), indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if report is not None:
        from .evaluate import write_eval_report

        write_eval_report(mem, folder, report, per_class=per_class)


@app.command()
@handle_errors
def demo(
    out: Path = typer.Option(Path("vismem-demo"), "--out", help="Folder for the demo memory and report."),
    per_class: int = typer.Option(100, "--per-class", help="Memory images per class."),
    queries: int = typer.Option(30, "--queries", help="Held-out query images per class."),
) -> None:
    """Build a memory from real images, classify held-out ones, print and write a report."""
    from ..demo import run_demo

    run_demo(out, per_class=per_class, queries_per_class=queries)
