"""remove, forget, relabel, reweight, history, tag, optimize."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import List, Optional

import json

import typer

import visual_memory as vm

from .app import app, handle_errors, new_table, print_json, print_table, say

_ID = typer.Option(None, "--id", help="Record id (repeat for several).")
_LABEL = typer.Option(None, "--label", "-l", help="Every record with this label (repeatable).")
_SOURCE = typer.Option(None, "--source", "-s", help="Every record with exactly this source.")
_WHERE = typer.Option(None, "--where", help="Lance SQL filter, e.g. \"weight < 0.5\".")
_IMAGE = typer.Option(None, "--image", dir_okay=False, help="Image file whose content hash is the record id (repeatable).")
_LOCK = typer.Option(0.0, "--lock-timeout", help="Seconds to wait for another writer.")
_DRY = typer.Option(False, "--dry-run", help="Show what would change and write nothing (same version, same bytes).")
_PROBE = typer.Option(None, "--probe", file_okay=False,
                      help="With --dry-run: a folder of images; list every one whose prediction would change.")
SHOWN = 50  # records listed in a preview table (all of them with --json)


def show_preview(p, *, as_json: bool = False) -> None:
    """Print an `EditPreview`: the records that would change, and the probe predictions that would."""
    if as_json:
        print_json(p.to_dict())
        return
    say(f"dry run: {p.op} would change {len(p)} record(s); nothing was written (version {p.version})")
    if p.near is not None:
        say(f"  {p.near['copies']} of them are copies (cosine >= {p.near['threshold']}) of the image(s) given")
    if p.changes:
        table = new_table("id", "label", "-> label", "weight", "-> weight", keep=("id", "label", "-> label"),
                          right=("weight", "-> weight"))
        gone = "(erased)" if p.op == "forget" else "(removed)"
        for c in p.changes[:SHOWN]:
            before = ["(new)" if v is None else str(v) for v in (c.label_before, c.weight_before)]
            after = [gone if v is None else str(v) for v in (c.label_after, c.weight_after)]
            table.add_row(c.id, before[0], after[0], before[1], after[1])
        print_table(table)
        if len(p.changes) > SHOWN:
            say(f"  ... and {len(p.changes) - SHOWN} more (--json lists all)")
    if p.skipped:
        say(f"  {len(p.skipped)} already present, would be skipped")
    if p.historic:
        say(f"  also {len(p.historic)} removed earlier whose bytes are still on disk")
    if p.probe is not None:
        say(f"probe: {p.probe.n_changed} of {p.probe.n_probes} prediction(s) would change (k={p.probe.k}, {p.probe.vote} vote)")
        for c in p.probe.changes:
            say(f"  {c.name or c.probe}: {c.before} -> {c.after}")


def _selectors(ids, labels, source, where, images) -> dict:
    return {
        "ids": ids or None,
        "label": labels or None,
        "source": source,
        "where": where,
        "images": [str(p) for p in images] if images else None,
    }


@app.command()
@handle_errors
def remove(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    ids: Optional[List[str]] = _ID,
    labels: Optional[List[str]] = _LABEL,
    source: Optional[str] = _SOURCE,
    where: Optional[str] = _WHERE,
    images: Optional[List[Path]] = _IMAGE,
    lock_timeout: float = _LOCK,
    dry_run: bool = _DRY,
    probe: Optional[Path] = _PROBE,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Remove records (selectors combine with AND); they stop voting at once."""
    result = vm.open(memory).remove(**_selectors(ids, labels, source, where, images), lock_timeout=lock_timeout,
                                    dry_run=dry_run, probe=probe)
    if dry_run:
        show_preview(result, as_json=as_json)
    elif as_json:
        print_json(result.to_dict())
    else:
        say(f"removed {result.removed} record(s); version {result.version}")


@app.command()
@handle_errors
def forget(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    ids: Optional[List[str]] = _ID,
    labels: Optional[List[str]] = _LABEL,
    source: Optional[str] = _SOURCE,
    where: Optional[str] = _WHERE,
    images: Optional[List[Path]] = _IMAGE,
    near: Optional[float] = typer.Option(
        None, "--near", min=-1.0, max=1.0,
        help="With --image: also every record with cosine similarity >= this to the image (its copies). "
        "0.9 suits efficientnet-lite0 (benchmarks/bench_near_duplicates.py). Check with --dry-run first."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the verification scan of every file."),
    receipt: Optional[Path] = typer.Option(None, "--receipt", help="Also write the receipt (JSON) to this file."),
    lock_timeout: float = _LOCK,
    dry_run: bool = _DRY,
    probe: Optional[Path] = _PROBE,
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the preview as JSON."),
) -> None:
    """Remove records and physically erase every byte of them; print the receipt (JSON)."""
    result = vm.open(memory).forget(**_selectors(ids, labels, source, where, images), near=near, verify=not no_verify,
                                    lock_timeout=lock_timeout, dry_run=dry_run, probe=probe)
    if dry_run:
        show_preview(result, as_json=as_json)
        return
    data = result.to_dict()
    if receipt is not None:
        receipt.parent.mkdir(parents=True, exist_ok=True)
        receipt.write_text(json.dumps(data, indent=2) + "\n")
    print_json(data)


@app.command()
@handle_errors
def relabel(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    label: str = typer.Argument(..., help="The new label."),
    ids: List[str] = typer.Option(..., "--id", help="Record id (repeat for several)."),
    lock_timeout: float = _LOCK,
    dry_run: bool = _DRY,
    probe: Optional[Path] = _PROBE,
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the preview as JSON."),
) -> None:
    """Give records a new label."""
    r = vm.open(memory).relabel(ids, label, lock_timeout=lock_timeout, dry_run=dry_run, probe=probe)
    if dry_run:
        return show_preview(r, as_json=as_json)
    say(f"relabelled {r.changed} record(s) as {label!r}; version {r.version}")


# ignore_unknown_options: `reweight M -1 --id X` reaches the library's ">= 0" check instead of "no such option: -1".
@app.command(context_settings={"ignore_unknown_options": True})
@handle_errors
def reweight(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    weight: float = typer.Argument(..., help="Vote weight >= 0 (0: never votes, stays inspectable; 1: default)."),
    ids: List[str] = typer.Option(..., "--id", help="Record id (repeat for several)."),
    lock_timeout: float = _LOCK,
    dry_run: bool = _DRY,
    probe: Optional[Path] = _PROBE,
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the preview as JSON."),
) -> None:
    """Set records' vote weight."""
    r = vm.open(memory).reweight(ids, weight, lock_timeout=lock_timeout, dry_run=dry_run, probe=probe)
    if dry_run:
        return show_preview(r, as_json=as_json)
    say(f"reweighted {r.changed} record(s) to {weight}; version {r.version}")


@app.command()
@handle_errors
def history(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Versions and the mutation that made each (from the audit log), with tags."""
    mem = vm.open(memory, read_only=True)
    rows = mem.versions()
    if as_json:
        print_json({"version": mem.version, "tags": mem.tags(), "history": rows})
        return
    table = new_table("version", "op", "records", "when (UTC)", "readable", "tags",
                      keep=("op", "when (UTC)", "tags"), right=("version", "records"))
    for r in rows:
        table.add_row(str(r["version"]), str(r["op"]) + (" (recovered)" if r["recovered"] else ""),
                      "" if r["n"] is None else str(r["n"]), str(r["ts"])[:19], "yes" if r["readable"] else "erased",
                      ", ".join(r["tags"]))
    print_table(table)


@app.command()
@handle_errors
def tag(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    name: Optional[str] = typer.Argument(None, help="Tag name (omit to list tags)."),
    version: Optional[int] = typer.Option(None, "--version", help="Version to tag (default: the current one)."),
    delete: bool = typer.Option(False, "--delete", help="Remove the tag instead."),
    lock_timeout: float = _LOCK,
) -> None:
    """Name a version (open it later with version=NAME), list tags, or --delete one."""
    mem = vm.open(memory)
    if name is None:
        print_json(mem.tags())
    elif delete:
        mem.untag(name, lock_timeout=lock_timeout)
        say(f"removed tag {name!r}")
    else:
        r = mem.tag(name, version=version, lock_timeout=lock_timeout)
        say(f"tagged version {r['version']} as {name!r}")


@app.command()
@handle_errors
def optimize(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    prune_days: Optional[float] = typer.Option(
        None, "--prune-older-than", min=0, help="Also delete versions older than this many days (0: all but the current and tagged ones)."
    ),
    lock_timeout: float = _LOCK,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Compact fragments and the in-RAM index (also runs on its own when fragments pile up)."""
    cleanup = timedelta(days=prune_days) if prune_days is not None else None
    r = vm.open(memory).optimize(cleanup_older_than=cleanup, lock_timeout=lock_timeout)
    if as_json:
        print_json(r.to_dict())
    else:
        say(
            f"fragments {r.fragments_before} -> {r.fragments_after}, removed rows dropped {r.tombstones_dropped}, "
            f"versions removed {r.versions_removed}, {r.bytes_before / 1e6:.1f} -> {r.bytes_after / 1e6:.1f} MB; version {r.version}"
        )
