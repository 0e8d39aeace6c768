r"""The typer app and the output helpers every command shares.

User strings are data, never markup. Labels, ids, sources, paths, tag names
and error messages are chosen by users (or by whoever made the images), so
``[/]``, ``[bold red]x`` or ``:smile:`` must print exactly as typed and never
crash or restyle the output. The CLI's consoles therefore parse no markup and
no emoji codes at all: a string printed through them is always literal, so no
print site can forget to escape. Style is added explicitly, with `styled`
(``("text", "style")`` pieces), never by writing markup into a string. Control
characters (ESC, BEL, C1 codes...) in a user string are shown as ``\x1b``
escapes by `literal`, so a label cannot drive the terminal either.

Tables never cut a cell: in a terminal every column folds instead of being
truncated (names and ids keep their own line where they fit), and in a pipe
or a file a table is printed at its full natural width.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from typing import Any, Callable, Optional, Sequence

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..errors import VisualMemoryError
from ..results import json_safe

app = typer.Typer(
    name="vismem",
    help="visual-memory: an image classifier you can edit like a database.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _console(**kwargs) -> Console:
    # markup=False, emoji=False: every string is printed as typed (see the module docstring).
    return Console(markup=False, emoji=False, highlight=False, **kwargs)


console = _console()
err_console = _console(stderr=True)

_state = {"verbose": False}

# A pipe has no width to fit; a table there is as wide as its longest row, up to this.
PIPE_MAX_WIDTH = 100_000


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def literal(value: Any) -> str:
    r"""``str(value)`` safe for a terminal: control characters (but newline and tab) become visible escapes.

    >>> literal("cat\x1b[2J")
    'cat\\x1b[2J'
    """
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))


def styled(*pieces: Any) -> Text:
    """One line of literal text: each piece is a value (printed with `str`) or a ``(text, style)`` pair.

    Nothing is parsed as markup, so user data can go in any piece.

    >>> styled(("error:", "bold red"), " ", "[/] is a label").plain
    'error: [/] is a label'
    """
    return Text.assemble(*((literal(p[0]), p[1]) if isinstance(p, tuple) else literal(p) for p in pieces))


def say(*pieces: Any, err: bool = False) -> None:
    """Print one line (see `styled`); long lines are left to the terminal, never re-wrapped or cut."""
    (err_console if err else console).print(styled(*pieces), soft_wrap=True)


def new_table(*columns: str, keep: Sequence[str] = (), right: Sequence[str] = (), title: Optional[str] = None) -> Table:
    """A table whose cells are never cut.

    Parameters
    ----------
    *columns : str
        Column headers, in order.
    keep : sequence of str
        Columns holding names, ids or paths, the row's own name first: in a
        terminal too narrow for the whole table they give up width only after
        every other text column has wrapped (the first of them last of all),
        and then fold onto more lines, losing no character.
    right : sequence of str
        Numbers: right-justified, and never narrowed.
    title : str, optional

    Add rows with ``add_row`` (every str cell goes through `literal`) and
    print with `print_table`.
    """
    table = _Table(title=None if title is None else literal(title))
    for c in columns:
        table.add_column(c, justify="right" if c in right else "left", overflow="fold")
        table.kinds.append(("name" if c == keep[0] else "keep") if c in keep else "number" if c in right else "text")
        table.natural.append(_cell_width(c))
        table.headers.append(_cell_width(c))
    return table


class _Table(Table):
    """A rich Table that sanitises its str cells and remembers each column's natural width."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kinds: list[str] = []
        self.natural: list[int] = []
        self.headers: list[int] = []

    def add_row(self, *cells, **kwargs) -> None:
        cells = tuple(literal(c) if isinstance(c, str) else c for c in cells)
        for i, c in enumerate(cells[: len(self.natural)]):
            self.natural[i] = max(self.natural[i], _cell_width(c))
        super().add_row(*cells, **kwargs)


def _cell_width(cell: Any) -> int:
    text = cell.plain if isinstance(cell, Text) else str(cell)
    return max((cell_len(line) for line in text.split("\n")), default=0)


# Narrowing order when a table is wider than the terminal: text columns wrap first (down to
# 10 cells or their header), then ids and names fold (down to 8 or their header; the row's
# name last). Only then anything, numbers included, down to 1 cell.
_NARROWING = (("text", 10), ("keep", 8), ("name", 8), ("number", 1), ("text", 1), ("keep", 1), ("name", 1))


def fit_widths(natural: Sequence[int], kinds: Sequence[str], available: int, *, headers: Optional[Sequence[int]] = None) -> list[int]:
    """Column widths that fit ``available`` cells: one cell at a time off the widest column of each kind, in `_NARROWING` order.

    >>> fit_widths([18, 4, 40], ["name", "number", "text"], 40)
    [18, 4, 18]
    >>> fit_widths([30, 20, 4, 40], ["name", "keep", "number", "text"], 44)
    [22, 8, 4, 10]
    """
    widths = list(natural)
    headers = headers or [0] * len(widths)
    excess = sum(widths) - available
    for kind, least in _NARROWING:
        while excess > 0:
            floors = [max(least, h) if least > 1 else 1 for h in headers]
            cand = [i for i, k in enumerate(kinds) if k == kind and widths[i] > floors[i]]
            if not cand:
                break
            widths[max(cand, key=lambda i: widths[i])] -= 1
            excess -= 1
    return widths


def print_table(table: Table) -> None:
    """Print a table: fitted to a terminal (cells wrap or fold, never cut), at full width in a pipe or file."""
    if not console.is_terminal:
        width = Measurement.get(console, console.options.update_width(PIPE_MAX_WIDTH), table).maximum
        title = _cell_width(table.title) if table.title is not None else 0  # a title wider than the table would wrap
        _console(file=console.file, width=max(int(width), title, 1), force_terminal=False).print(table)
        return
    if isinstance(table, _Table) and table.columns:
        n = len(table.columns)
        available = console.width - 3 * n - 1  # a space either side of each cell, n + 1 rules
        if sum(table.natural) > available:
            for column, w in zip(table.columns, fit_widths(table.natural, table.kinds, available, headers=table.headers)):
                column.width = max(w, 1)
    console.print(table)


def print_json(obj: Any) -> None:
    """Standard JSON on stdout (undefined scores as null, never NaN/Infinity)."""
    sys.stdout.write(json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")


# typer's own exits and usage errors (bad values: exit 2 with usage) pass through. Which classes
# those are depends on the typer version (it vendors click from 0.22 on), so ask typer.
_TYPER_EXCEPTIONS = (typer.Exit, typer.Abort, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


def handle_errors(fn: Callable) -> Callable:
    """Turn errors into one red line on stderr and an exit code (no traceback).

    Exit 2: the input or the memory is at fault (library errors, bad values,
    missing or unreadable files). Exit 1: anything unexpected, named by its
    type; ``vismem --verbose`` shows its traceback. Usage errors (bad flags)
    are typer's own, also exit 2.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _TYPER_EXCEPTIONS:
            raise
        except KeyboardInterrupt:
            say(("interrupted", "bold red"), err=True)
            raise typer.Exit(130) from None
        except (VisualMemoryError, ValueError, TypeError, OSError) as exc:
            if _state["verbose"]:
                raise
            say(("error:", "bold red"), " ", _message(exc), err=True)
            raise typer.Exit(2) from None
        except Exception as exc:  # a bug or an environment problem: still one line, but say what it was
            if _state["verbose"]:
                raise
            say(("error:", "bold red"), f" unexpected {type(exc).__name__}: ", _message(exc),
                " (run `vismem --verbose ...` for the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _message(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "out of memory" + (f" ({exc})" if str(exc) else "")
    text = str(exc).strip()
    return text or type(exc).__name__


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise typer.BadParameter(f"--k must be comma-separated positive integers, e.g. 1,10,50; got {text!r}")
    if not ks or ks[0] < 1:
        raise typer.BadParameter(f"--k values must be >= 1; got {text!r}")
    return ks


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does; show tracebacks.")) -> None:
    _state["verbose"] = verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ..progress import set_default

    set_default(True)  # the library's inner loops (forget's scan, crash recovery on open) show bars


def print_accuracy(result, title: str = "top-1 accuracy") -> None:
    """A table of `EvalResult.accuracy`: one row per vote, one column per k, the best in bold."""
    ks = sorted(next(iter(result.accuracy.values())).keys())
    cols = [f"k={k}" for k in ks]
    table = new_table("vote", *cols, keep=("vote",), right=cols, title=f"{title} ({result.n_queries} queries)")
    best = max(a for accs in result.accuracy.values() for a in accs.values())
    for v, accs in result.accuracy.items():
        table.add_row(v, *[styled((f"{accs[k]:.4f}", "bold" if accs[k] == best else "")) for k in ks])
    print_table(table)
