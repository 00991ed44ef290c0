"""Output paths checked before the work starts, and the option types every command shares.

A run, a bench or a fuzz campaign can take minutes; finding only afterwards that ``--json``
points into a missing directory loses the results. :class:`OutputPath` checks the path when
the option is parsed, so the command refuses in one line before it starts. The other types
here make run, fuzz and bench agree on what a timeout is.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from vmikit.errors import UsageError
from vmikit.machine import layout


def check_writable(path: Path, option: str) -> Path:
    """``path`` if a file could be written there now; UsageError naming the path and the fix otherwise.

    Nothing is created: a run that fails before writing leaves no empty file behind.
    """
    fix = f"choose a writable path for {option}, or create the directory first"
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"cannot write {option} {path}: it is a directory", f"give a file name for {option}")
    if not parent.exists():
        raise UsageError(f"cannot write {option} {path}: directory {parent} does not exist", fix)
    if not parent.is_dir():
        raise UsageError(f"cannot write {option} {path}: {parent} is not a directory", fix)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UsageError(f"cannot write {option} {path}: permission denied", fix)
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {option} {path}: directory {parent} is not writable", fix)
    return path


class OutputPath(click.ParamType):
    """A file the command will write at the end (``--json``, ``--plot``, ``-o``), checked at parse time."""

    name = "file"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        if isinstance(value, Path):
            path = value
        else:
            path = Path(os.fsdecode(value) if isinstance(value, bytes) else str(value))
        option = param.opts[-1] if param is not None and param.opts else "the output"
        return check_writable(path, option)


class Timeout(click.ParamType):
    """Seconds, finite, > 0 and at most a day: inf or 1e10 would overflow the watchdog's timer and
    nan would fire it at once."""

    name = "seconds"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or not 0 < seconds <= layout.MAX_TIMEOUT_S:
            self.fail(f"{value} is not a time limit in (0, {layout.MAX_TIMEOUT_S:.0f}] seconds", param, ctx)
        return seconds


class Extension(click.ParamType):
    """An extension file, or the name of one shipped with vmikit (``muladd``) when no such file exists."""

    name = "file.py|name"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = value if isinstance(value, Path) else Path(str(value))
        if path.exists():
            return path
        from vmikit.examples import bundled_extensions

        bundled = bundled_extensions()
        name = path.name[:-3] if path.name.endswith(".py") else path.name
        if name in bundled and (path.parent == Path(".") or path.parent.name == "examples"):
            return bundled[name]  # also "examples/muladd.py" outside a checkout, as the README once said
        raise UsageError(f"extension {value} does not exist",
                         f"give a Python file that registers calls, or a bundled one: {', '.join(bundled)}")


OUTPUT = OutputPath()
TIMEOUT = Timeout()
EXTENSION = Extension()
