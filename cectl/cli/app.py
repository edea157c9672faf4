"""The Typer app, the options several commands share, and the entry point."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated

import typer

from cectl import render
from cectl.errors import CectlError
from cectl.render import err

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train Context Encoders at scale: shard, train, sweep, evaluate, inpaint.")
# click's UsageError, which Typer (with its own copy of click) exports only as a base class.
UsageError = typer.BadParameter.__mro__[1]
DEFAULT_STORE = "cectl-store"
StoreOption = Annotated[str, typer.Option("--store", help="runs live here (path or s3://)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
CheckpointArgument = Annotated[str, typer.Argument(help="checkpoint folder (path or s3://)")]
GpusOption = Annotated[int, typer.Option(help="workers (GPUs) per node")]
AddressOption = Annotated[str | None, typer.Option(
    help="Ray cluster (default: RAY_ADDRESS, else a new local instance)")]


def ray_output_to_stderr() -> contextlib.AbstractContextManager:
    """Ray and Tune print their own messages (tables, lost workers) on stdout: send them to
    stderr with the progress, so that stdout holds cectl's report alone (JSON with --json)."""
    return contextlib.redirect_stdout(sys.stderr)


def run(argv: list[str]) -> int:
    """Run one command line in this process; its exit code: 0, 1 (a failure), 2 (bad
    input or usage), 130 (interrupted)."""
    try:
        # Not standalone: usage errors come here as exceptions, to be printed as one
        # sentence like every other error rather than in Typer's box.
        code = app(args=argv, prog_name="cectl", standalone_mode=False)
    except UsageError as e:  # an unknown option, a value of the wrong type
        if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
            _print_error(f"{e.format_message()}{where}")
        return e.exit_code
    except CectlError as e:
        _print_error(str(e))
        return e.exit_code
    except Exception as e:  # never a bare traceback, unless asked for
        if os.environ.get("CECTL_DEBUG"):
            raise
        _print_error(f"unexpected {type(e).__name__}: {e} (set CECTL_DEBUG=1 for the traceback)")
        return 1
    if code == 130:  # Typer turns Ctrl-C in a command into exit code 130
        # The same `cectl train` again would start a new run (or be refused its name).
        err.print("interrupted: `cectl train --resume --name RUN` continues the run (RUN: the "
                  "name it printed when it started)" if argv[:1] == ["train"]
                  else "interrupted: run the same command again to resume")
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


def _print_error(message: str) -> None:
    """The one way errors reach the user: credentials in URLs masked."""
    from cectl.storage import mask_userinfo

    render.error(err, mask_userinfo(message))
