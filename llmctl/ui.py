"""One rich console on stderr, progress bars, and the error printer."""

from __future__ import annotations

import os
import time
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
    """Handle returned by `progress`: `update(advance=1, **fields)` moves the bar and sets the extra columns."""

    def __init__(self, progress: Progress | None, task: int | None, plain: tuple[str, float, int] | None = None) -> None:
        self._progress, self._task = progress, task
        self._plain = plain  # (description, total, every): print a line every N updates instead of redrawing
        self._done = 0.0
        self._start = time.perf_counter()
        self._first = 0.0

    def update(self, advance: float = 1, **fields: object) -> None:
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._done += advance
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=advance, fields=shown)
        elif self._plain is not None:
            description, total, every = self._plain
            if every and (int(self._done) % every == 0 or self._done >= total):
                elapsed = time.perf_counter() - self._start
                rate = (self._done - self._first) / elapsed if elapsed > 0 else 0.0
                eta = (total - self._done) / rate if rate > 0 else 0.0
                console.print(f"{description} {int(self._done)}/{int(total)}  {shown}  eta {eta:.0f}s", highlight=False)


@contextmanager
def progress(total: float, description: str, start: float = 0, log_every: int = 1) -> Iterator[_Bar]:
    """A rich bar with count, elapsed time, ETA and free-form fields; plain lines when stderr is not a terminal.

    Silent off rank 0. `start` is where a resumed job begins; `log_every` spaces the plain lines.
    """
    if not is_main_process():
        yield _Bar(None, None)
        return
    if not console.is_terminal:
        bar = _Bar(None, None, (description, total, log_every))
        bar._done = bar._first = start
        yield bar
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
        task = bar.add_task(description, total=total, completed=start, fields="")
        yield _Bar(bar, task)
