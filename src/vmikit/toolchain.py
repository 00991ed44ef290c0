"""The host toolchain (gcc, objcopy) that builds the guests and the ROM."""

from __future__ import annotations

import functools
import shutil
import subprocess

from vmikit.errors import HostError

INSTALL_HINT = "install it with `apt-get install gcc binutils`"


def find_tool(name: str, purpose: str = "") -> str:
    """The tool's path; HostError naming it, what it is for, and the install command otherwise."""
    path = shutil.which(name)
    if path is None:
        raise HostError(f"{name} not found" + (f" (needed to {purpose})" if purpose else ""), INSTALL_HINT)
    return path


@functools.lru_cache(maxsize=None)
def tool_version(path: str) -> str:
    """``TOOL --version`` (part of every build's cache key)."""
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise HostError(f"cannot run {path} --version: {err}", INSTALL_HINT) from err


def first_error(log: str) -> str:
    """The line of a compiler/linker log that names the problem, for a one-line error."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for pattern in (": error:", "error:", "undefined reference", "overflowed", "fatal"):
        for line in lines:
            if pattern in line:
                return line
    return lines[0] if lines else "no compiler output"
