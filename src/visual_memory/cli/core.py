"""create, add, classify, info, eval, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import typer

import visual_memory as vm

from ..errors import ImageError, list_failures
from ..images import list_images, load_image, scan_folder
from ..vote import VOTES
from . import rerank as rr
from .app import app, handle_errors, new_table, parse_ks, print_accuracy, print_json, print_table, say


@app.command()
@handle_errors
def create(
    memory: str = typer.Argument(..., help="Directory (or object-store URI: s3://, gs://, az://) for the new memory."),
    encoder: str = typer.Option("efficientnet-lite0", "--encoder", "-e", help="Encoder name (see `vismem encoders`)."),
    index: str = typer.Option("Flat", "--index", help='FAISS index factory string ("Flat" = exact, "IVF4096,PQ48np", ...) '
                                                      'or "auto" (chosen by size; see `vismem index build`).'),
) -> None:
    """Create an empty memory."""
    mem = vm.create(memory, encoder=encoder, index=index)
    say(f"created {mem.path} (encoder {encoder}, {mem.dim}-d, index {index})")


@app.command()
@handle_errors
def add(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    paths: List[Path] = typer.Argument(..., help="Images, or folders (a folder without --label is an ImageFolder: one sub-folder per class)."),
    label: Optional[str] = typer.Option(None, "--label", "-l", help="Label for every image given."),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="Provenance stored with each record (default: file path)."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip images whose id is already present (default: refuse and add nothing)."),
    lock_timeout: float = typer.Option(0.0, "--lock-timeout", help="Seconds to wait for another writer."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be added and write nothing."),
    probe: Optional[Path] = typer.Option(None, "--probe", file_okay=False,
                                         help="With --dry-run: a folder of images; list every one whose prediction would change."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the preview as JSON."),
    ray: Optional[str] = typer.Option(
        None, "--ray", help="Embed on a Ray cluster: 'local' (in-process), 'auto' (RAY_ADDRESS) or host:port. "
        "PATHS may then also be .parquet/.csv tables of image paths or webdataset .tar files; one version for all."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Embedding actors with --ray (default: one per CPU)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per Ray block with --ray (default 1024)."),
) -> None:
    """Add images (files or folders) to a memory: all of them, or nothing if any is bad."""
    mem = vm.open(memory)
    if ray is not None:
        if dry_run:
            raise typer.BadParameter("--dry-run previews a local add; it is not supported with --ray")
        # PATHS go to the cluster as given: folders, files, path tables and tars are listed there.
        r = mem.add(list(paths), labels=label, source=source, skip_existing=skip_existing, ray=ray, workers=workers,
                    batch_size=batch_size, progress="adding images", lock_timeout=lock_timeout)
        msg = f"added {r.added} record(s) on Ray"
        if r.skipped:
            msg += f", skipped {len(r.skipped)} already present"
        say(f"{msg}; {len(mem)} in memory, version {mem.version}")
        return
    items, labels = gather_images(paths, label)
    if dry_run:
        from .edit import show_preview

        return show_preview(mem.add(items, labels=labels, source=source, skip_existing=skip_existing, dry_run=True,
                                    probe=probe), as_json=as_json)
    # One add for every path: each image is validated (and every id checked) before the first commit.
    r = mem.add(items, labels=labels, source=source, skip_existing=skip_existing, progress="adding images", lock_timeout=lock_timeout)
    msg = f"added {r.added} record(s)"
    if r.skipped:
        msg += f", skipped {len(r.skipped)} already present"
    say(f"{msg}; {len(mem)} in memory, version {mem.version}")


def gather_images(paths: Sequence[Path], label: Optional[str]) -> tuple[list[Path], list[str]]:
    """Every image the paths name, with its label; raises naming every path that cannot be used.

    A folder without ``label`` is an ImageFolder (label = class sub-folder);
    with ``label``, every image below it gets that label. A file needs ``label``.
    Nothing is decoded here unless a path is bad: then the image files given
    by name are checked too, so that one error lists every bad path at once
    (`Memory.add` then validates every image before it writes anything).
    """
    items: list[Path] = []
    labels: list[str] = []
    problems: list[str] = []
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            try:
                found, found_labels = scan_folder(p) if label is None else (list_images(p), None)
            except ImageError as exc:
                problems.append(str(exc))
                continue
            if not found:
                problems.append(f"{p}: no images found in this folder")
                continue
            items += found
            labels += found_labels if found_labels is not None else [label] * len(found)
        elif p.is_file():
            if label is None:
                problems.append(f"{p}: a single image needs --label")
                continue
            files.append(p)
            items.append(p)
            labels.append(label)
        else:
            problems.append(f"{p}: no such file or folder")
    if problems:
        for f in files:
            try:
                load_image(f)
            except ImageError as exc:
                problems.append(str(exc))
        raise ImageError(list_failures(problems, total=len(paths), what="path(s)"))
    return items, labels


@app.command()
@handle_errors
def classify(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    images: List[Path] = typer.Argument(..., dir_okay=False, help="Image files to classify."),
    k: int = typer.Option(50, "--k", "-k", min=1, help="Neighbours that vote (at most the memory's size are used)."),
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
    extra = ["vote", "re-rank"] if reranker else []
    table = new_table("image", "label", "confidence", "k", "top neighbours (label, similarity)", *extra,
                      keep=("image", "label", "vote"), right=("confidence", "k"))
    for p, pred in zip(images, preds):
        nb = ", ".join(f"{n.label} {n.similarity:.2f}" for n in pred.neighbors[:3])
        cells = [str(p), "(no records)" if pred.label is None else pred.label, f"{pred.confidence:.2f}", str(pred.k), nb]
        if reranker:
            r = pred.rerank
            cells += ["" if r is None else str(pred.winner),
                      "" if r is None else f"fallback: {r.fallback}" if r.fallback else ("changed" if r.changed else "kept")]
        table.add_row(*cells)
    print_table(table)


@app.command()
@handle_errors
def info(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Count, labels, encoder, dimension, version and size on disk."""
    data = vm.open(memory).info()
    if as_json:
        print_json(data)
        return
    say((data["path"], "bold"))
    say(f"  records  {data['count']}")
    say(f"  encoder  {data['encoder']} ({data['dim']}-d, fingerprint {data['encoder_fingerprint']})")
    say(f"  index    {data['index']}" + (f" ({data['index_stats']['spec']})" if data['index_stats']['spec'] != data['index'] else ""))
    if data.get("index_note"):
        say(f"           {data['index_note']}")
    say(f"  version  {data['version']}")
    say(f"  on disk  {data['size_bytes'] / 1e6:.1f} MB")
    table = new_table("label", "records", keep=("label",), right=("records",))
    for lab, n in data["labels"].items():
        table.add_row(lab, str(n))
    print_table(table)


@app.command("eval")
@handle_errors
def eval_(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    folder: Path = typer.Argument(..., help="Labelled ImageFolder of queries (one sub-folder per class)."),
    k: str = typer.Option("1,10,20,50,100", "--k", help="Comma-separated k values (a k above the memory's size votes with every record)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON to this file."),
    per_class: Optional[int] = typer.Option(None, "--per-class", min=1, help="Use only the first N queries of each class."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also run every paper evaluation and write JSON, PNGs and report.html into this folder."),
    search: str = typer.Option("exact", "--search", help='"exact" (over the stored vectors, as the paper) or "index" (the memory\'s own, maybe approximate).'),
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
    result = mem.evaluate(vectors, labels, ks=ks, search=search)
    say(f"search: {result.extra['search']}")
    print_accuracy(result)
    if reranker is not None:
        from ..rerank import evaluate_rerank

        ev = evaluate_rerank(mem, vectors, labels, images=paths, reranker=reranker, k=rerank_n, progress="re-ranking")
        rr.print_rerank_eval(ev)
        result.extra["rerank"] = ev.to_dict()
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        say(f"wrote {json_out}")
    if report is not None:
        from .evaluate import write_eval_report

        write_eval_report(mem, folder, report, per_class=per_class)
