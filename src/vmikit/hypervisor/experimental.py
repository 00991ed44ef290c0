"""Experimental calls (family 0xFF), registered from Python at run time.

    from vmikit.hypervisor.experimental import ExperimentalCalls

    calls = ExperimentalCalls()

    @calls.register(0x01, "MulAdd")
    def mul_add(ctx, a, b, c):
        return (a * b + c) & (2**64 - 1),   # results go back in R8.. ; raise HypercallError to fail

The guest reaches a registered call through the ROM's raw-call entry with the call ID
``0xFF << 24 | number << 16`` and learns whether it exists with Query.QueryCall.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmikit.errors import UsageError
from vmikit.hypervisor.registry import Handler

EXPERIMENTAL_FAMILY = 0xFF


@dataclass(frozen=True)
class ExperimentalCall:
    number: int
    name: str
    handler: Handler
    doc: str

    @property
    def call_id(self) -> int:
        return (EXPERIMENTAL_FAMILY << 24) | (self.number << 16)


class ExperimentalCalls:
    def __init__(self) -> None:
        self.calls: dict[int, ExperimentalCall] = {}

    def register(self, number: int, name: str, doc: str = "") -> Callable[[Handler], Handler]:
        if not 0 <= number <= 0xFF:
            raise UsageError(f"experimental call number {number} is out of range", "use 0 to 255")
        if number in self.calls:
            raise UsageError(f"experimental call {number:#x} is registered twice ({self.calls[number].name}, {name})",
                             "give each experimental call its own number")

        def wrap(fn: Handler) -> Handler:
            self.calls[number] = ExperimentalCall(number, name, fn, doc or (fn.__doc__ or "").strip())
            return fn

        return wrap


# The registry extension files fill in (see load_extension); the CLI passes it to the hypervisor.
default_calls = ExperimentalCalls()


def load_extension(path: Path, calls: ExperimentalCalls | None = None) -> ExperimentalCalls:
    """Run a Python file that registers experimental calls; it gets ``calls`` as a global named ``vmi``."""
    calls = calls if calls is not None else ExperimentalCalls()
    if not path.is_file():
        raise UsageError(f"extension {path} does not exist", "pass a Python file that registers calls with @vmi.register")
    spec = importlib.util.spec_from_file_location(f"vmikit_extension_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot load extension {path}", "pass a .py file")
    module = importlib.util.module_from_spec(spec)
    module.vmi = calls  # type: ignore[attr-defined]
    try:
        spec.loader.exec_module(module)
    except UsageError:
        raise
    except Exception as exc:  # the user's file: report its error in one line
        raise UsageError(f"extension {path} failed to load: {type(exc).__name__}: {exc}", "fix the extension file") from None
    return calls
