"""Progress bars for long work, on stderr so that stdout stays clean for ``--json`` and pipes.

Service functions take ``show_progress``; when it is off (tests, scripts, non-zero ranks) every
bar is a no-op.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True, fields: str = "", **initial):
    """Yield ``update(advance=1, **values)``; ``fields`` is a rich format string over ``task.fields``
    (e.g. ``"loss {task.fields[loss]:.3f}"``) shown after the bar, ``initial`` its first values."""
    if not enabled:
        yield lambda advance=1, **kw: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if fields:
        columns.append(TextColumn(fields))
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=total, **initial)
        yield lambda advance=1, **values: progress.update(task, advance=advance, **values)


@contextmanager
def status_line(text: str, enabled: bool = True):
    """A spinner with ``text`` on stderr for work of unknown length; yields ``say(text)`` to change
    the text. A no-op when not ``enabled``."""
    if not enabled:
        yield lambda text: None
        return
    from rich.console import Console

    with Console(stderr=True).status(text, spinner="dots") as status:
        yield status.update
