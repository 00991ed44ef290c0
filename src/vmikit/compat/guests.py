"""Guests of a given interface version: the same sources built against that version's header."""

from __future__ import annotations

from pathlib import Path

from vmikit.abi.history import version_path
from vmikit.abi.model import Version
from vmikit.guest.build import build_guest, register_guest, unregister_guest

COMPAT_SOURCE = Path(__file__).resolve().parent / "guest" / "compat.c"

# workload -> guest: "conformance" is the version-independent conformance guest of this
# package (the bundled conformance.c assumes guest and hypervisor share one version).
GUESTS = {"conformance": "compat", "mmu": "mmu"}


def _build_compat(version: Version, min_version: Version | None) -> Path:
    """Register the compat guest only for the build: a registered guest is one every
    `vmikit build` builds with the packaged spec, which a VMI_MIN_VERSION above it fails."""
    name = "compat" if min_version is None else f"compat-min-{min_version}"
    flags = [] if min_version is None else [f"-DVMI_MIN_VERSION=0x{min_version.packed:08x}u"]
    register_guest(name, COMPAT_SOURCE, extra_cflags=flags)
    try:
        return build_guest(name, spec=version_path(version))
    finally:
        unregister_guest(name)


def build_for(workload: str, version: Version, *, min_version: Version | None = None) -> Path:
    """The image of WORKLOAD's guest built against VERSION's vmi_spec.h (cached by content)."""
    if workload == "conformance":
        return _build_compat(version, min_version)
    return build_guest(GUESTS[workload], spec=version_path(version))
