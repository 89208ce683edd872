"""``octpipe run``: a declarative run of named steps from a YAML file in ``pipelines/``.

A run file is plain data: the name of each step is an octpipe command and its keys are that
command's own options and arguments (their Python names, ``spacing_mm`` or ``spacing-mm``),
with the same types and checks as on the command line. Nothing in it is evaluated::

    run: demo                      # marks a run file (a name for messages)
    description: phantoms to anomaly maps
    steps:
      - phantom: {out: demo-output/phantoms, n: 4, seed: 0}
      - ingest: {sources: [demo-output/phantoms], out: demo-output/cohort.zarr}
      - patches: {store: demo-output/cohort.zarr, split: test}

Every step is checked before the first runs (unknown keys, wrong types or values are usage
errors naming the step); the steps then run in order and the run stops at the first that
fails, with its exit code. Each command is resumable on its own (ingest skips finished
volumes, ``train`` takes ``resume: true``, export skips exported volumes), so rerunning a run
file after an interruption continues it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from octpipe.cli import app, state

#: Commands a step may name (not ``run`` or ``demo``: a run file does not start runs).
STEP_COMMANDS = ("phantom", "info", "ingest", "layers", "patches", "train", "calibrate", "score", "evaluate", "export")
#: Top-level keys of a run file.
RUN_KEYS = ("run", "description", "steps")
_PLAIN = (str, int, float, bool)


def _usage(path: Path, message: str) -> typer.BadParameter:
    return typer.BadParameter(f"{path.name}: {message}", param_hint="FILE")


def load_run_file(path: Path) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """``(name, [(command, options), ...])`` of a run file, with its structure checked."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise _usage(path, f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise _usage(path, f"not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict) or "steps" not in data or "run" not in data:
        raise _usage(path, "not a run file (needs 'run: NAME' and 'steps:'; training configs go to "
                           "octpipe train --config)")
    unknown = sorted(set(data) - set(RUN_KEYS))
    if unknown:
        raise _usage(path, f"unknown key(s) {', '.join(unknown)}; a run file has {', '.join(RUN_KEYS)}")
    steps = data["steps"]
    if not isinstance(steps, list) or not steps:
        raise _usage(path, "'steps' must be a non-empty list")
    out = []
    for number, step in enumerate(steps, start=1):
        if not isinstance(step, dict) or len(step) != 1:
            raise _usage(path, f"step {number} must be one 'command: {{options}}' mapping")
        ((command, options),) = step.items()
        if command not in STEP_COMMANDS:
            raise _usage(path, f"step {number}: {command!r} is not a step; one of {', '.join(STEP_COMMANDS)}")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise _usage(path, f"step {number} ({command}): options must be a mapping")
        out.append((command, {str(k).replace("-", "_"): v for k, v in options.items()}))
    return str(data["run"]), out


def _values(value: Any, where: str, key: str) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, _PLAIN) for v in values):
        raise typer.BadParameter(f"{where}: {key} must be a plain value or a list of them, got {value!r}")
    return values


def step_argv(command: str, options: Mapping[str, Any], where: str) -> list[str]:
    """The command line of one step, from the command's own parameters (unknown keys refused).

    >>> step_argv("patches", {"store": "s.zarr", "split": "test", "overwrite": True}, "step 1")
    ['patches', 's.zarr', '--split', 'test', '--overwrite']
    """
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    params = [p for p in cmd.params if p.name != "help"]
    names = {p.name for p in params}
    unknown = sorted(set(options) - names)
    if unknown:
        raise typer.BadParameter(f"{where} ({command}): unknown key(s) {', '.join(unknown)}; "
                               f"{command} takes {', '.join(sorted(n for n in names if n))}")
    positional: list[str] = []
    flags: list[str] = []
    for p in params:
        if p.name not in options:
            continue
        value = options[p.name]
        long = next((o for o in p.opts if o.startswith("--")), p.opts[0]) if p.opts else ""
        if p.param_type_name == "argument":
            positional += [str(v) for v in _values(value, where, p.name)]
        elif getattr(p, "is_flag", False):
            if not isinstance(value, bool):
                raise typer.BadParameter(f"{where} ({command}): {p.name} must be true or false, got {value!r}")
            off = next((o for o in p.secondary_opts if o.startswith("--")), None)
            flags += [long] if value else ([off] if off else [])
        else:
            values = _values(value, where, p.name)
            if len(values) > 1 and not p.multiple:
                raise typer.BadParameter(f"{where} ({command}): {p.name} takes one value, got {value!r}")
            for v in values:
                flags += [long, str(v).lower() if isinstance(v, bool) else str(v)]
    return [command, *positional, *flags]


def _check(command: str, argv: list[str], where: str) -> None:
    """Parse a step's command line as the command would (types, ranges, required values)."""
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    try:
        cmd.make_context(command, list(argv[1:]), resilient_parsing=False)
    except Exception as exc:  # the command's own usage errors (Typer's click classes)
        if not hasattr(exc, "format_message"):
            raise
        raise typer.BadParameter(f"{where} ({command}): {exc.format_message()}", param_hint="FILE") from None


def check_steps(steps: list[tuple[str, dict[str, Any]]], label: str) -> list[list[str]]:
    """The command line of every step, each checked as its command would (usage errors name the step)."""
    lines = []
    for number, (command, options) in enumerate(steps, start=1):
        where = f"{label} step {number}"
        argv = step_argv(command, options, where)
        _check(command, argv, where)
        lines.append(argv)
    return lines


def run_step(argv: list[str], *, verbosity: int | None = None, progress: bool | None = None) -> int:
    """Run one step's command line as ``octpipe`` would; return its exit code.

    The step runs with this run's verbosity and progress (or the ones given) and they are
    restored after it (each step's ``main`` resets them).
    """
    from octpipe.cli import main

    old = state["verbosity"], state["progress"]
    verbosity = old[0] if verbosity is None else verbosity
    progress = old[1] if progress is None else progress
    flags = ["-v"] * max(verbosity, 0) + ["-q"] * max(-verbosity, 0) + ([] if progress else ["--no-progress"])
    try:
        return main([*flags, *argv])
    finally:
        state["verbosity"], state["progress"] = old


@app.command()
def run(
    file: Path = typer.Argument(..., help="A run file (pipelines/NAME.yaml) with run: and steps:."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check every step and print its command line; run "
                                                          "nothing."),
) -> None:
    """Run the named steps of a YAML run file in order, each an octpipe command with its options.

    Every step is checked first (unknown keys and bad values are usage errors naming the step);
    the run stops at the first step that fails, with its exit code. Rerunning continues an
    interrupted run (each command skips what it has finished).

    Example: octpipe run pipelines/demo.yaml
    """
    from octpipe.errors import OctpipeError

    if not file.is_file():
        raise OctpipeError("no such run file", file)
    name, steps = load_run_file(file)
    lines = check_steps(steps, file.name)
    verbosity = state["verbosity"]
    for number, argv in enumerate(lines, start=1):
        if verbosity >= 0:
            typer.echo(f"[{number}/{len(lines)}] octpipe {' '.join(argv)}")
        if dry_run:
            continue
        code = run_step(argv)
        if code != 0:
            typer.echo(f"error: {file.name}: run {name} stopped at step {number} ({argv[0]}), exit code {code}",
                       err=True)
            raise typer.Exit(code)
    if verbosity >= 0 and not dry_run:
        typer.echo(f"run {name}: {len(lines)} steps done")
