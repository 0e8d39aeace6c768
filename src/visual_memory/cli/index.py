"""``vismem index build`` and ``vismem index check``: change the search index, and measure it."""

from __future__ import annotations

import json
from typing import Optional

import typer

import visual_memory as vm

from .app import app, handle_errors, new_table, print_json, print_table, say

index_app = typer.Typer(help="The search index: rebuild or change it, and check it against exact search.",
                        no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
@handle_errors
def build(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    index: Optional[str] = typer.Option(None, "--index", help='FAISS factory string ("IVF4096,PQ48np"), "Flat" (exact) '
                                                              'or "auto"; default: the memory\'s own, retrained.'),
    budget: Optional[str] = typer.Option(None, "--budget", help='RAM the index may use, for "auto" (e.g. 4GB; default: half the RAM).'),
    lock_timeout: float = typer.Option(0.0, "--lock-timeout", help="Seconds to wait for another writer."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Rebuild the index from the records (trained on a random sample), or switch to another one."""
    mem = vm.open(memory)
    out = mem.build_index(index, budget=budget, lock_timeout=lock_timeout)
    if as_json:
        print_json(out)
        return
    chose = f" (auto chose {out['resolved']})" if out["spec"] == "auto" else ""
    say(f"index {out['spec']}{chose}: {out['records']} records in {out['seconds']:.1f} s")
    if out["exact_until"]:
        say(f"  exact search until the memory holds {out['exact_until']} records (enough to train {out['resolved'] if out['spec'] != 'auto' else 'it'})")


@index_app.command("check")
@handle_errors
def check(
    memory: str = typer.Argument(..., help="Memory directory, or object-store URI (s3://, gs://, az://)."),
    queries: int = typer.Option(200, "--queries", min=1, help="Records used as queries (sampled at random)."),
    k: int = typer.Option(50, "--k", min=1, help="Neighbours compared."),
    params: Optional[str] = typer.Option(None, "--params", help='Search parameters as JSON, e.g. \'{"nprobe": 32}\'.'),
    seed: int = typer.Option(0, "--seed", help="Seed of the query sample."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Check a sharded memory: local, auto or host:port."),
    shards: Optional[int] = typer.Option(None, "--shards", min=1, help="Shard actors (with --ray)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Measure the index against exact search: recall@k, label agreement, single-query speed-up."""
    try:
        knobs = json.loads(params) if params else None
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--params must be a JSON object: {exc}") from None
    if knobs is not None and not isinstance(knobs, dict):
        raise typer.BadParameter(f"--params must be a JSON object such as '{{\"nprobe\": 32}}'; got {params!r}")
    mem = vm.open(memory, ray=ray, shards=shards)
    try:
        out = mem.check_index(queries=queries, k=k, params=knobs, seed=seed)
    finally:
        mem.close()
    keys = ("recall_at_k", "agreement", "k", "queries", "speedup")
    if as_json:
        print_json({**{key: out[key] for key in keys}, **{key: v for key, v in out.items() if key not in keys}})
        return
    table = new_table("measure", "value", keep=("measure",), title=f"index {out['index']} vs exact search")
    table.show_header = False
    for name, value in (("recall@k", f"{out['recall_at_k']:.4f}"), ("label agreement", f"{out['agreement']:.4f}"),
                        ("k", str(out["k"])), ("queries", str(out["queries"])),
                        ("exact, ms/query", f"{out['exact_ms']:.2f}"), ("index, ms/query", f"{out['index_ms']:.2f}"),
                        ("speed-up", f"{out['speedup']:.1f}x")):
        table.add_row(name, value)
    print_table(table)
