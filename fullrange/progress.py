"""The rich progress bar of long work (training, teacher cache, writing .beton files)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(console: Console, enabled: bool, info: bool = False) -> Progress:
    """A bar with description, count, elapsed and remaining time; info=True adds a text field
    `info` (e.g. the loss) that tasks update."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled,
                    transient=False)
