"""One progress bar for every long loop (rich), silent when not wanted."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional


class _NullBar:
    def advance(self, n: int = 1) -> None:
        pass


class _RichBar:
    def __init__(self, progress, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)


@contextlib.contextmanager
def progress_bar(enabled: bool | str, *, total: Optional[int], unit: str = "it") -> Iterator[_NullBar | _RichBar]:
    """A rich progress bar if ``enabled`` (a str is its description), else a no-op.

    ``VISMEM_PROGRESS=0`` silences every bar (useful in logs and CI).
    """
    if not enabled or os.environ.get("VISMEM_PROGRESS", "1") == "0":
        yield _NullBar()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    description = enabled if isinstance(enabled, str) else "working"
    columns = [
        # markup=False: a description may hold a folder or label name, which is data, not markup.
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{unit}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    from rich.console import Console

    # stderr, so `--json` output on stdout stays machine-readable.
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=total)
        yield _RichBar(progress, task)
