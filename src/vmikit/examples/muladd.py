"""An experimental VMI call in a few lines: `vmikit run experiment --extension examples/muladd.py`.

The file runs with `vmi` bound to the run's registry of experimental (family 0xFF)
calls. A handler gets the call context and the three argument registers and
returns its results; raise HypercallError("INVALID_ARGUMENT") (any spec error) to refuse.
"""

from vmikit.hypervisor import HypercallError


@vmi.register(0x07, "MulAdd")  # noqa: F821 - provided by the loader; call ID 0xFF070000
def mul_add(ctx, a, b, c):
    """a * b + c, and the answer to everything."""
    if a == 0:
        raise HypercallError("INVALID_ARGUMENT")
    return (a * b + c) & (2**64 - 1), 42
