"""Guests of a given interface version: the same sources built against that version's header."""

from __future__ import annotations

from pathlib import Path

from vmikit.abi.history import version_path
from vmikit.abi.model import Version
from vmikit.guest.build import build_guest, register_guest

COMPAT_SOURCE = Path(__file__).resolve().parent / "guest" / "compat.c"

# workload -> guest: "conformance" is the version-independent conformance guest of this
# package (the bundled conformance.c assumes guest and hypervisor share one version).
GUESTS = {"conformance": "compat", "mmu": "mmu"}


def compat_guest_name(min_version: Version | None = None) -> str:
    """Register (idempotent) the compat guest, optionally demanding a minimum interface version."""
    if min_version is None:
        register_guest("compat", COMPAT_SOURCE)
        return "compat"
    name = f"compat-min-{min_version}"
    register_guest(name, COMPAT_SOURCE, extra_cflags=[f"-DVMI_MIN_VERSION=0x{min_version.packed:08x}u"])
    return name


def build_for(workload: str, version: Version, *, min_version: Version | None = None) -> Path:
    """The image of WORKLOAD's guest built against VERSION's vmi_spec.h (cached by content)."""
    name = compat_guest_name(min_version) if workload == "conformance" else GUESTS[workload]
    return build_guest(name, spec=version_path(version))
