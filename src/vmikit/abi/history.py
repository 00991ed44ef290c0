"""Released versions of the spec, kept as package data (``versions/vmi-MAJOR.MINOR.toml``).

The packaged ``vmi.toml`` is the newest released version's content; past ones are never
edited, so guests and ROMs can be built for any of them (``vmikit compat``).
"""

from __future__ import annotations

import re
from pathlib import Path

from vmikit.abi.model import Version
from vmikit.abi.spec import spec_path
from vmikit.errors import UsageError

_NAME = re.compile(r"^vmi-(\d+)\.(\d+)\.toml$")
_VERSION = re.compile(r"^(\d+)\.(\d+)$")


def versions_dir() -> Path:
    return Path(__file__).with_name("versions")


def available_versions() -> dict[Version, Path]:
    """Every fixture by version, oldest first."""
    found: dict[Version, Path] = {}
    for path in versions_dir().glob("vmi-*.toml"):
        m = _NAME.match(path.name)
        if m:
            found[Version(int(m.group(1)), int(m.group(2)))] = path
    return dict(sorted(found.items()))


def version_path(version: Version) -> Path:
    path = available_versions().get(version)
    if path is None:
        known = ", ".join(str(v) for v in available_versions()) or "none"
        raise UsageError(f"no spec fixture for version {version}", f"use one of: {known}")
    return path


def resolve(text: str) -> Path:
    """A spec argument: a file path, a fixture version such as ``1.0``, or ``current``."""
    if text == "current":
        return spec_path()
    m = _VERSION.match(text)
    if m and not Path(text).exists():
        return version_path(Version(int(m.group(1)), int(m.group(2))))
    return Path(text)
