"""The ``modelpress`` command line (typer + rich), one module per command group.

Every command has ``--help`` with examples. Errors print one line with the cause and a
hint, and exit with status 2 (1 for an unexpected crash, with the traceback).
"""
from __future__ import annotations

import sys

import typer

from ..core.errors import ModelpressError, ResourceError
from . import info, methods, model, run, search
from .common import err_console, print_error, rows_table

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Make trained PyTorch models smaller and faster, and measure it.\n\n"
                       "Start with [bold]modelpress demo[/bold]; see [bold]modelpress COMMAND --help[/bold].")
for group in (info, model, run, methods, search):
    group.register(app)

__all__ = ["app", "main", "rows_table"]


INTERRUPTED = "interrupted (Ctrl-C); finished stages are saved, rerun the same command to resume"


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("can't allocate memory", "not enough memory")))


def main() -> None:
    """Entry point. Exit status: 0 ok, 2 a ModelpressError (one ``error:`` line + ``hint:``),
    3 a search that met no budget, 130 Ctrl-C, 1 an unexpected crash (with its traceback)."""
    try:
        # Without standalone mode typer *returns* the status of typer.Exit, and of Ctrl-C (130),
        # instead of exiting: pass it on, or `search` over budget and Ctrl-C would exit 0.
        code = app(standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            if code == 130:
                err_console.print(INTERRUPTED)
            sys.exit(code)
    except ModelpressError as err:
        print_error(err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print(INTERRUPTED)
        sys.exit(130)
    except Exception as exc:  # click usage errors are handled here too
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):  # click turns Ctrl-C into Abort
            if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
                err_console.print(INTERRUPTED)
            sys.exit(130)
        if _out_of_memory(exc):
            err = ResourceError(f"out of memory ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                                hint="use smaller batch sizes (eval.batch_sizes, --batch-sizes) or a machine "
                                     "with more memory")
            print_error(err)
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
