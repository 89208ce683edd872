"""The ``octpipe`` command: one Typer app, one module per subcommand.

Exit codes: 0 success, 1 an error or some inputs failed, 2 a usage error. An
:class:`~octpipe.errors.OctpipeError` prints as one line; ``-v`` shows the traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import typer

from octpipe import __version__
from octpipe.errors import OctpipeError

__all__ = ["app", "main", "state"]

app = typer.Typer(
    name="octpipe",
    help="Retinal OCT from vendor files to f-AnoGAN anomaly maps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

#: Verbosity set by the root options; read by commands and by :func:`main`.
state = {"verbosity": 0, "progress": True}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"octpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More output; -v shows tracebacks."),
    quiet: int = typer.Option(0, "--quiet", "-q", count=True, help="Less output."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars (default on)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Retinal OCT from vendor files to f-AnoGAN anomaly maps."""
    state["verbosity"] = verbose - quiet
    state["progress"] = progress and sys.stderr.isatty() if progress else False


# Register subcommands (each module adds its command to ``app``; heavy imports stay inside).
from octpipe.cli import calibrate as _calibrate  # noqa: E402,F401
from octpipe.cli import demo as _demo  # noqa: E402,F401
from octpipe.cli import evaluate as _evaluate  # noqa: E402,F401
from octpipe.cli import export as _export  # noqa: E402,F401
from octpipe.cli import info as _info  # noqa: E402,F401
from octpipe.cli import ingest as _ingest  # noqa: E402,F401
from octpipe.cli import layers as _layers  # noqa: E402,F401
from octpipe.cli import patches as _patches  # noqa: E402,F401
from octpipe.cli import phantom as _phantom  # noqa: E402,F401
from octpipe.cli import run as _run  # noqa: E402,F401
from octpipe.cli import score as _score  # noqa: E402,F401
from octpipe.cli import train as _train  # noqa: E402,F401


def _os_error_line(exc: OSError) -> str:
    """``PATH: reason`` for a file-system error (errno text, e.g. "Read-only file system").

    >>> _os_error_line(OSError(30, "Read-only file system", "out/store.zarr"))
    'out/store.zarr: cannot write: Read-only file system'
    >>> _os_error_line(FileNotFoundError(2, "No such file or directory", "a.vol"))
    'a.vol: No such file or directory'
    """
    import errno

    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        reason = f"cannot write: {reason}"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    if exc.filename is None:
        return reason
    path = Path(exc.filename)
    if path.name.startswith(".") and "tmp" in path.name:  # a staging file: name the folder it was going to
        path = path.parent
    return f"{path}: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code (testable entry point).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        0 success, 1 error, 2 usage error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    state["verbosity"] = 0
    code: int
    try:
        # standalone mode: Typer prints usage errors itself and always ends in SystemExit
        app(args=args, prog_name="octpipe")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OctpipeError as exc:
        if state["verbosity"] > 0:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        code = 1
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        code = 130
    except OSError as exc:  # the file system said no (read-only, no permission, disk full): name the path
        if state["verbosity"] > 0:
            traceback.print_exc()
        typer.echo(f"error: {_os_error_line(exc)}", err=True)
        code = 1
    except Exception as exc:  # the floor: commands raise OctpipeError for every input they foresee
        if state["verbosity"] > 0:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"error: unexpected {type(exc).__name__}: {first} (an octpipe bug: run with -v for the "
                   "traceback)", err=True)
        code = 1
    if argv is None:
        raise SystemExit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    main()
