"""Host checks for `vmikit doctor`: each names what is missing and the fix."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from vmikit.errors import HostError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    optional: bool = False


def _tool_version(tool: str) -> str | None:
    path = shutil.which(tool)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return path
    return out.splitlines()[0] if out else path


def failure(checks: list[Check]) -> HostError | None:
    """The one-line error for the first required check that failed (None if the host is fit)."""
    failed = [c for c in checks if not c.ok and not c.optional]
    if not failed:
        return None
    first = failed[0]
    more = f" (and {len(failed) - 1} more FAIL above)" if len(failed) > 1 else ""
    return HostError(f"this host cannot run vmikit: {first.name}: {first.detail}{more}",
                     first.fix or "see the FAIL lines above")


def run_checks(device: str = "/dev/kvm") -> list[Check]:
    from vmikit.kvm.api import OPTIONAL_CAPS, REQUIRED_CAPS, Kvm

    checks: list[Check] = []
    try:
        kvm = Kvm(device)
    except HostError as err:
        checks.append(Check("kvm", False, err.cause, err.fix or ""))
    else:
        try:
            checks.append(Check("kvm", True, f"{device} usable, KVM API version {kvm.api_version}"))
            missing = kvm.missing_caps()
            present = [n for n, c in REQUIRED_CAPS.items() if kvm.check_extension(c) > 0]
            checks.append(Check("kvm capabilities", not missing,
                                f"missing {', '.join(missing)}" if missing else f"{', '.join(present)} present",
                                "use a newer Linux kernel"))
            for name, cap in OPTIONAL_CAPS.items():
                value = kvm.check_extension(cap)
                checks.append(Check(f"kvm {name}", value > 0, "present" if value > 0 else "absent",
                                    "not needed to run guests", optional=True))
        finally:
            kvm.close()
    for tool, package, optional, why in (
        ("gcc", "gcc", False, "builds the guests and the ROM"),
        ("objcopy", "binutils", False, "wraps guests as ELF32 for multiboot"),
        ("qemu-system-x86_64", "qemu-system-x86", True, "the bare machine for same-binary checks"),
    ):
        version = _tool_version(tool)
        checks.append(Check(tool, version is not None, f"{version} ({why})" if version else f"not found ({why})",
                            f"apt-get install {package}", optional=optional))
    return checks
