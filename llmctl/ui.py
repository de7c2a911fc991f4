"""One rich console on stderr, progress bars, and the error printer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def is_main_process() -> bool:
    """Rank 0 under torchrun / mlx.launch, or a plain single process."""
    for var in ("RANK", "MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "0") != "0":
            return False
    return True


def info(message: str) -> None:
    if is_main_process():
        console.print(message)


def warn(message: str) -> None:
    if is_main_process():
        console.print(f"[yellow]warning:[/] {message}")


def error(message: str, hint: str | None = None) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        console.print(f"[dim]{hint}[/]", highlight=False)


class _Bar:
    """Handle returned by `progress`: `update(advance=1, **fields)` sets the extra columns."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def update(self, advance: float = 1, **fields: object) -> None:
        if self._progress is not None and self._task is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fields.items()}
            text = "  ".join(f"{k} {v}" for k, v in shown.items())
            self._progress.update(self._task, advance=advance, fields=text)


@contextmanager
def progress(total: float, description: str) -> Iterator[_Bar]:
    """A rich bar with count, rate-derived ETA and free-form fields; silent off rank 0."""
    if not is_main_process():
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[fields]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, fields="")
        yield _Bar(bar, task)
