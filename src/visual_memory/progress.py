"""One progress bar for every long loop (rich), or log lines when no bar is wanted."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator, Optional

log = logging.getLogger(__name__)
LOG_EVERY = 10.0  # seconds between progress log lines when no bar is shown
_default = False  # what ``enabled=None`` means: the CLI turns bars on for the library's inner loops


def set_default(enabled: bool) -> None:
    """Show bars for loops whose caller passed ``progress=None`` (the CLI does; a library user may)."""
    global _default
    _default = bool(enabled)


class _LogBar:
    """No bar: an INFO log line every `LOG_EVERY` s (and at the end) once a loop runs that long."""

    def __init__(self, description: Optional[str], total: Optional[int], unit: str) -> None:
        self._desc, self._total, self._unit = description, total, unit
        self._done = 0
        self._start = self._last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self._done += n
        now = time.monotonic()
        if self._desc and now - self._last >= LOG_EVERY:
            self._last = now
            of = f"/{self._total}" if self._total else ""
            log.info("%s: %d%s %s (%.0f s)", self._desc, self._done, of, self._unit, now - self._start)

    def close(self) -> None:
        took = time.monotonic() - self._start
        if self._desc and took >= LOG_EVERY:
            log.info("%s: done, %d %s in %.0f s", self._desc, self._done, self._unit, took)


class _RichBar:
    def __init__(self, progress, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)


@contextlib.contextmanager
def progress_bar(
    enabled: bool | str | None, *, total: Optional[int], unit: str = "it", description: Optional[str] = None
) -> Iterator[_LogBar | _RichBar]:
    """A rich progress bar if ``enabled`` (a str is its description), else periodic log lines.

    ``enabled=None`` follows `set_default` (off unless the CLI turned bars on).
    ``VISMEM_PROGRESS=0`` silences every bar (useful in logs and CI).
    """
    if enabled is None:
        enabled = _default and (description or True)
    desc = enabled if isinstance(enabled, str) else description
    if not enabled or os.environ.get("VISMEM_PROGRESS", "1") == "0":
        bar = _LogBar(desc, total, unit)
        try:
            yield bar
        finally:
            bar.close()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    description = desc or "working"
    count = DownloadColumn() if unit == "B" else MofNCompleteColumn()
    columns = [
        # markup=False: a description may hold a folder or label name, which is data, not markup.
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        count,
        TextColumn("" if unit == "B" else f"{unit}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    from rich.console import Console
    from rich.markup import escape

    # stderr, so `--json` output on stdout stays machine-readable.
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(escape(description), total=total)
        yield _RichBar(progress, task)
