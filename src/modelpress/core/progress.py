"""Progress bars for long-running work (rich), shared by training, calibration and pipelines."""
from __future__ import annotations

import contextvars
import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


def progress_enabled() -> bool:
    return os.environ.get("MODELPRESS_PROGRESS", "1") != "0"


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True):
    """A rich progress bar; yields ``advance(n=1, **fields)``. Silent when disabled
    (``MODELPRESS_PROGRESS=0``, or ``enabled=False``, e.g. on every rank but 0 of a torchrun job)."""
    if not (enabled and progress_enabled()):
        yield lambda n=1, **kw: None
        return
    if not console.is_terminal:  # a log file or a pipe: no live bar, a plain line every 10% / minute
        yield _progress_lines(description, total)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[note]}")]
    with Progress(*columns, console=console, transient=not sys.stderr.isatty()) as prog:
        task = prog.add_task(description, total=total, note="")
        yield lambda n=1, note=None: prog.update(task, advance=n, **({"note": note} if note else {}))


QUIET_S = 10.0  # work shorter than this prints no progress line


def _progress_lines(description: str, total: int | None, every_s: float = 60.0):
    """``advance(n=1, note=None)`` printing ``description: done/total (pct), elapsed, left`` when a
    tenth of the work is done or a minute has passed (after the first :data:`QUIET_S` seconds), so a
    job writing to a file shows how far it is."""
    start = last = time.monotonic()
    state = {"done": 0, "tenth": 0}

    def advance(n: int = 1, note: str | None = None, **_kw) -> None:
        nonlocal last
        state["done"] += n
        now = time.monotonic()
        tenth = int(10 * state["done"] / total) if total else 0
        if now - start < QUIET_S:
            state["tenth"] = tenth
        elif tenth > state["tenth"] or now - last >= every_s:
            state["tenth"], last = tenth, now
            done, elapsed = state["done"], now - start
            left = f", ~{_minutes(elapsed * (total - done) / done)} left" if total and done else ""
            of = f"/{total} ({100 * done / total:.0f}%)" if total else ""
            log(f"{description}: {done}{of}, {_minutes(elapsed)}{left}{f', {note}' if note else ''}")

    return advance


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def log(msg: str) -> None:
    """A progress note on stderr (rich markup allowed); MODELPRESS_QUIET=1 silences it."""
    if os.environ.get("MODELPRESS_QUIET", "0") != "1":
        console.print(msg, highlight=False)


_rebuilding: contextvars.ContextVar[bool] = contextvars.ContextVar("modelpress_rebuilding", default=False)


@contextmanager
def rebuilding_architecture():
    """While an artifact's architecture is rebuilt its own tensors replace the initial weights, so
    :func:`warn_random_init` stays silent."""
    token = _rebuilding.set(True)
    try:
        yield
    finally:
        _rebuilding.reset(token)


def warn_random_init(what: str, why: str = "no weights file given") -> None:
    """One warning line: ``what`` starts from random weights (nothing is ever downloaded)."""
    if not _rebuilding.get():
        log(f"[yellow]warning:[/yellow] {what}: random initialisation ({why}; nothing is downloaded)")
