"""Console output: progress for long steps on stderr, results on stdout, errors that end the run."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import click
from rich.console import Console

from .errors import ApplianceError

__all__ = ["ApplianceError", "die", "echo_json", "err", "out", "progress_bar", "step"]

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def die(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise SystemExit(code)


@contextmanager
def step(title: str) -> Iterator[None]:
    """One stage of a long command: a spinner while it runs, then its duration."""
    t0 = time.monotonic()
    if err.is_terminal:
        with err.status(f"{title} ..."):
            yield
    else:
        err.print(f"▸ {title} ...")
        yield
    err.print(f"[green]✓[/] {title} [dim]({time.monotonic() - t0:.1f} s)[/]")


def echo_json(data: object) -> None:
    import json

    click.echo(json.dumps(data, indent=2, sort_keys=True))


@contextmanager
def progress_bar(title: str) -> Iterator[Callable[[int, int], None]]:
    """A transfer's progress: a bar on a terminal, a line per tenth otherwise. Yields update(done, total)."""
    if err.is_terminal:
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=err, transient=True) as bar:
            task = bar.add_task(title, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    shown = [-1]

    def update(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth != shown[0]:
            shown[0] = tenth
            err.print(f"  {title}: {done / 2**20:.0f} of {total / 2**20:.0f} MiB")
    yield update
