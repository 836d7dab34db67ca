"""Progress display (rich) for dask computations started by the CLI."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from dask.callbacks import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
        disable=not sys.stderr.isatty(),
        console=Console(stderr=True),  # stdout carries the result line; keep it clean when piped
    )


class _RichCallback(Callback):
    """Counts finished dask tasks of the local (threaded) scheduler into a rich progress bar."""

    def __init__(self, progress: Progress, description: str) -> None:
        super().__init__()
        self._progress = progress
        self._description = description
        self._task: Any = None

    def _start_state(self, dsk: Any, state: Any) -> None:
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._task = self._progress.add_task(self._description, total=total)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
        if self._task is not None:
            self._progress.advance(self._task)


@contextlib.contextmanager
def dask_progress(description: str) -> Iterator[Progress]:
    """Show a progress bar for dask computations inside the block (threaded scheduler)."""
    progress = make_progress()
    with progress, _RichCallback(progress, description):
        yield progress


@contextlib.contextmanager
def region_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callable (as :func:`ndvi_scale.write.write_cube` takes) drawing a rich bar."""
    progress = make_progress()
    task: list[Any] = []

    def advance(done: int, total: int) -> None:
        if not task:
            task.append(progress.add_task(description, total=total))
        progress.update(task[0], completed=done, total=total)

    with progress:
        yield advance
