"""ioctl request numbers, computed the way <asm-generic/ioctl.h> does.

A request encodes direction, size of the argument struct, a type byte and a
number, so the struct sizes here are checked by a test against the numbers
the kernel headers define.
"""

from __future__ import annotations

import ctypes

_NRBITS, _TYPEBITS, _SIZEBITS = 8, 8, 14
_NRSHIFT = 0
_TYPESHIFT = _NRSHIFT + _NRBITS
_SIZESHIFT = _TYPESHIFT + _TYPEBITS
_DIRSHIFT = _SIZESHIFT + _SIZEBITS

IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2

KVMIO = 0xAE


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_SIZEBITS} bits")
    return (direction << _DIRSHIFT) | (size << _SIZESHIFT) | (type_ << _TYPESHIFT) | (nr << _NRSHIFT)


def io(nr: int) -> int:
    return ioc(IOC_NONE, KVMIO, nr, 0)


def ior(nr: int, struct: type[ctypes.Structure] | type[ctypes._SimpleCData]) -> int:
    return ioc(IOC_READ, KVMIO, nr, ctypes.sizeof(struct))


def iow(nr: int, struct: type[ctypes.Structure] | type[ctypes._SimpleCData]) -> int:
    return ioc(IOC_WRITE, KVMIO, nr, ctypes.sizeof(struct))


def iowr(nr: int, struct: type[ctypes.Structure] | type[ctypes._SimpleCData]) -> int:
    return ioc(IOC_READ | IOC_WRITE, KVMIO, nr, ctypes.sizeof(struct))


def ioc_size(request: int) -> int:
    """The argument size a request number encodes."""
    return (request >> _SIZESHIFT) & ((1 << _SIZEBITS) - 1)
