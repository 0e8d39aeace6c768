"""prune, label-issues, export-neighbors, import-neighbors (and the report behind `eval --report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import visual_memory as vm

from .app import app, handle_errors, new_table, parse_ks, print_json, print_table, say
from .edit import _DRY, _PROBE, show_preview


@app.command()
@handle_errors
def prune(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    hard: bool = typer.Option(False, "--hard", help="Records with wrong >= --threshold stop voting (weight 0)."),
    soft: bool = typer.Option(False, "--soft", help="Weight = c / (1 + wrong) over the top 10 (records never wrong keep 1)."),
    undo: bool = typer.Option(False, "--undo", help="Restore the weights from before the last prune."),
    threshold: Optional[int] = typer.Option(None, "--threshold", "-t", help="Hard pruning: the wrong-count that silences a record."),
    k: Optional[int] = typer.Option(None, "--k", "-k", help="Self-neighbours counted per record (default 10 soft, 100 hard)."),
    c: float = typer.Option(1.75, "--c", help="Soft-pruning constant."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    lock_timeout: float = typer.Option(0.0, "--lock-timeout", help="Seconds to wait for another writer."),
    dry_run: bool = _DRY,
    probe: Optional[Path] = _PROBE,
) -> None:
    """Lower the vote weight of records that mislead their neighbours (audited, reversible)."""
    modes = [m for m, on in (("hard", hard), ("soft", soft), ("undo", undo)) if on]
    if len(modes) != 1:
        raise typer.BadParameter("choose exactly one of --hard, --soft, --undo")
    mem = vm.open(memory)
    res = mem.prune(mode=modes[0], threshold=threshold, k=k, c=c, lock_timeout=lock_timeout,
                    progress=False if as_json else "self-neighbours", dry_run=dry_run, probe=probe)
    if dry_run:
        return show_preview(res, as_json=as_json)
    if as_json:
        print_json(res.to_dict())
        return
    what = {"hard": "silenced (weight 0)", "soft": "down-weighted", "undo": "restored"}[res.mode]
    say(f"{res.mode} prune: {res.changed} weight(s) changed, {res.pruned} record(s) {what}; "
        f"version {res.version_before} -> {res.version} (undo: vismem prune {memory} --undo)")


@app.command("label-issues")
@handle_errors
def label_issues(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    k: int = typer.Option(100, "--k", "-k", min=1, help="Self-neighbours that vote (softmax) on each record's label."),
    top: int = typer.Option(20, "--top", "-n", min=0, help="Show at most this many."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with each record's neighbours)."),
) -> None:
    """Records most likely mislabelled, ranked, with their neighbours as evidence."""
    from ..prune import label_issues as find

    mem = vm.open(memory)
    issues = find(mem, k=k, limit=top, progress=False if as_json else "self-neighbours")
    if as_json:
        print_json([i.to_dict() for i in issues])
        return
    table = new_table("label", "suggested", "score", "wrong", "nearest neighbours (label, similarity)", "id",
                      keep=("id", "label", "suggested"), right=("score", "wrong"),
                      title=f"{len(issues)} likely label issue(s) in {len(mem)} records (k={k})")
    for i in issues:
        nb = ", ".join(f"{lab} {s:.2f}" for _, lab, s in i.neighbors[:4])
        table.add_row(i.label, str(i.suggested), f"{i.score:.2f}", str(i.wrong), nb, i.id)
    print_table(table)


@app.command("export-neighbors")
@handle_errors
def export_neighbors(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    folder: Path = typer.Argument(..., help="ImageFolder of queries (one sub-folder per class)."),
    out: Path = typer.Argument(..., help="JSON file to write (the paper authors' neighbour format)."),
    k: int = typer.Option(100, "--k", "-k", min=1, help="Neighbours per query."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Only the first N queries of each class."),
) -> None:
    """Write each query's neighbours in the authors' JSON format."""
    from ..cache import embed_folder
    from ..interchange import export_neighbors as export

    mem = vm.open(memory)
    x, y, paths = embed_folder(mem.encoder, folder, per_class=per_class, progress="embedding queries")
    ids = [str(Path(p).relative_to(folder)) for p in paths]
    data = export(mem, x, query_ids=ids, query_labels=y, k=k, path=out)
    say(f"wrote {len(data)} queries x {min(k, len(mem))} neighbours to {out}")


@app.command("import-neighbors")
@handle_errors
def import_neighbors(
    path: Path = typer.Argument(..., help="Neighbour file in the authors' format (JSON object, list or JSON Lines)."),
    k: str = typer.Option("1,10,50,100", "--k", help="Comma-separated k values."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Score the four votes on a neighbour file (ours or the paper authors')."""
    from ..interchange import evaluate_neighbors, import_neighbors as load

    res = evaluate_neighbors(load(path), ks=parse_ks(k))
    if as_json:
        print_json(res)
        return
    ks = sorted(next(iter(res["accuracy"].values())))
    cols = [f"k={x}" for x in ks]
    table = new_table("vote", *cols, keep=("vote",), right=cols,
                      title=f"{path.name}: {res['n_queries']} queries ({', '.join(res['featurizer'])})")
    for v, accs in res["accuracy"].items():
        table.add_row(v, *[f"{accs[x]:.4f}" for x in ks])
    print_table(table)


def write_eval_report(mem, folder: Path, report_dir: Path, *, per_class: Optional[int] = None) -> dict:
    """What `vismem eval --report DIR` runs: every evaluation, written as JSON, PNGs and HTML."""
    from ..evaluate import report_for_memory

    res = report_for_memory(mem, folder, report_dir, per_class=per_class, progress="report")
    say(f"report: {res['paths']['html']} ({res['meta']['total_s']:.0f} s)")
    return res
