"""Extensions shipped with vmikit: ``vmikit run experiment --extension muladd`` finds ``muladd.py`` here.

The files are not imported as modules: each runs through
:func:`vmikit.hypervisor.experimental.load_extension`, which binds ``vmi`` first.
"""

from __future__ import annotations

from pathlib import Path


def bundled_extensions() -> dict[str, Path]:
    """Name (file stem) -> path of every bundled extension."""
    here = Path(__file__).resolve().parent
    return {p.stem: p for p in sorted(here.glob("*.py")) if p.name != "__init__.py"}
