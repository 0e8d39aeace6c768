"""The typer app and helpers every command shares."""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable

import typer
from rich.console import Console

from ..errors import VisualMemoryError

app = typer.Typer(
    name="vismem",
    help="visual-memory: an image classifier you can edit like a database.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one red line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (VisualMemoryError, ValueError, TypeError, FileNotFoundError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise typer.BadParameter(f"--k must be comma-separated positive integers, e.g. 1,10,50; got {text!r}")
    if not ks or ks[0] < 1:
        raise typer.BadParameter(f"--k values must be >= 1; got {text!r}")
    return ks


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
