"""Errors a user can cause. Each carries one line naming the cause and the fix.

The CLI prints ``str(err)`` and exits with ``err.exit_status``; nothing else
about the error reaches the terminal unless ``--debug`` asks for a traceback.
"""

from __future__ import annotations


class VmikitError(Exception):
    """Base class: a one-line, user-facing failure with a process exit status."""

    exit_status: int = 2

    def __init__(self, cause: str, fix: str | None = None) -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause}; {fix}" if fix else cause)


class UsageError(VmikitError):
    """Bad input from the user: a missing file, an unknown guest name, a bad option."""

    exit_status = 2


class ImageError(VmikitError):
    """The kernel image cannot be loaded (not ELF, truncated, not multiboot, does not fit)."""

    exit_status = 2


class HostError(VmikitError):
    """The host cannot run guests: no /dev/kvm, no permission, missing capability or tool."""

    exit_status = 3


class GuestCrash(VmikitError):
    """The guest died: triple fault, unhandled exception, KVM internal error, failed entry."""

    exit_status = 4

    def __init__(self, cause: str, fix: str | None = None, dump: str = "") -> None:
        super().__init__(cause, fix)
        self.dump = dump


class GuestHang(GuestCrash):
    """The watchdog stopped a guest that did not finish within its time limit."""

    exit_status = 5
