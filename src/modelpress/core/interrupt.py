"""Ctrl-C that third-party code cannot swallow.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the interpreter happens to be. When that
is inside a finalizer (``__del__``, a weakref callback) or a library's bare ``except:``, the
exception is printed as "Exception ignored" or dropped, and a long run goes on as if nothing
happened. While :func:`remember_ctrl_c` is active, Ctrl-C still raises at once, and is also
remembered, so the next :func:`check_ctrl_c` (the recipe pipeline calls it between stages and
before writing the final artifact) raises again.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_pending = False


def _on_sigint(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextmanager
def remember_ctrl_c() -> Iterator[None]:
    """Remember Ctrl-C for :func:`check_ctrl_c` during the block. Installs its handler only in
    the main thread and only over Python's default one (a handler of the caller's stays; an
    outer ``remember_ctrl_c`` keeps working for nested blocks)."""
    global _pending
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    _pending = False
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _pending = False


def check_ctrl_c() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed inside :func:`remember_ctrl_c`, even when
    the first ``KeyboardInterrupt`` was swallowed somewhere."""
    if _pending:
        raise KeyboardInterrupt
