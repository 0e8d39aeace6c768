"""encoders, export-onnx."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import app, handle_errors, new_table, print_json, print_table, say, styled


@app.command("encoders")
@handle_errors
def encoders_cmd(
    filter: Optional[str] = typer.Argument(None, help="Only names containing this text."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the named encoders: dimension, input size, weights source, and whether the weights are here."""
    from ..encoders import _SCHEMES, list_encoders

    rows = [
        {"name": e.name, "dim": e.dim, "input_size": e.input_size, "source": e.source,
         "weights_local": e.weights_available, "description": e.description}
        for e in list_encoders(filter)
    ]
    if as_json:
        print_json(rows)
        return
    if not rows:
        say(("error:", "bold red"), f" no encoder name contains {filter!r}; `vismem encoders` lists them all", err=True)
        raise typer.Exit(1)
    table = new_table("name", "dim", "input", "source", "local", "description",
                      keep=("name", "source"), right=("dim", "input"))
    for r in rows:
        table.add_row(r["name"], str(r["dim"]), f"{r['input_size']}px", r["source"],
                      styled(("yes", "green")) if r["weights_local"] else styled(("no", "red")), r["description"])
    print_table(table)
    say("generic: " + ", ".join(f"{s}:<...>" for s in sorted(_SCHEMES)) + "  (hf:<repo-or-dir>, timm:<model-name>, onnx:<file>)")


@app.command("export-onnx")
@handle_errors
def export_onnx_cmd(
    encoder: str = typer.Argument(..., help="Encoder name (see `vismem encoders`), e.g. dinov2-small or hf:/path."),
    out: Path = typer.Argument(..., help="The .onnx file to write."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Local weights folder/file or hub repo id."),
    check: List[Path] = typer.Option([], "--check", help="Images to embed with both torch and the export; prints the cosine."),
) -> None:
    """Export a torch encoder to ONNX; run it later as `onnx:OUT.onnx` (same spec, same memory)."""
    from ..encoders import create_encoder
    from ..encoders.onnx_file import export_encoder

    kwargs = {"weights": weights} if weights else {}
    path = export_encoder(encoder, out, **kwargs)
    say(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); use it as --encoder onnx:{path}")
    if check:
        a = create_encoder(encoder, backend="torch", **kwargs).embed([str(p) for p in check])
        b = create_encoder(f"onnx:{path}").embed([str(p) for p in check])
        cos = (a * b).sum(axis=1)
        say(f"cosine(torch, onnx) over {len(check)} image(s): min {cos.min():.6f}, mean {cos.mean():.6f}")
