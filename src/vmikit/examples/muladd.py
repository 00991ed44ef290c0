"""An experimental VMI call in a few lines: `vmikit run experiment --extension muladd`.

The file runs with `vmi` bound to the run's registry of experimental (family 0xFF)
calls. A handler gets the call context and the three argument registers and
returns its results; raise HypercallError("INVALID_ARGUMENT") (any spec error) to refuse.
Copy it anywhere and pass its path to `--extension` to start your own.
"""

from vmikit.hypervisor import HypercallError
from vmikit.hypervisor.experimental import ExperimentalCalls

vmi: ExperimentalCalls  # bound by the loader before this file runs


@vmi.register(0x07, "MulAdd")  # call ID 0xFF070000
def mul_add(ctx, a, b, c):
    """a * b + c, and the answer to everything."""
    if a == 0:
        raise HypercallError("INVALID_ARGUMENT")
    return (a * b + c) & (2**64 - 1), 42
