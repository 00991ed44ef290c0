"""Freestanding guest kernels: the C runtime under ``src/`` and their cached build.

See :mod:`vmikit.guest.build` for how a guest is put together and how to add one.
"""

from __future__ import annotations

from vmikit.guest.build import (
    GuestSpec,
    available_guests,
    build_guest,
    default_cache_dir,
    guest_hash,
    guest_source_dir,
    guest_spec,
    register_guest,
)

__all__ = [
    "GuestSpec",
    "available_guests",
    "build_guest",
    "default_cache_dir",
    "guest_hash",
    "guest_source_dir",
    "guest_spec",
    "register_guest",
]
