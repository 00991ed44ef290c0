"""Load the interface definition: `load_spec()` is what the rest of vmikit calls."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from vmikit.abi.loader import parse_spec
from vmikit.abi.model import (
    Annotation,
    Arg,
    Batch,
    Call,
    Constant,
    Family,
    LegacyOnly,
    Spec,
    TypeDef,
    UnknownName,
    Version,
)
from vmikit.errors import UsageError

__all__ = [
    "Annotation", "Arg", "Batch", "Call", "Constant", "Family", "LegacyOnly",
    "Spec", "TypeDef", "UnknownName", "Version", "load_spec", "spec_path",
]


def spec_path() -> Path:
    """Where the packaged vmi.toml lives (shipped as package data)."""
    return Path(__file__).with_name("vmi.toml")


def load_spec(path: Path | None = None) -> Spec:
    """Load and check a spec file (default: the packaged one). Cached per resolved path."""
    return _load(Path(path or spec_path()).resolve())


@lru_cache(maxsize=8)
def _load(path: Path) -> Spec:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"spec file {path} does not exist", "pass an existing vmi.toml (`vmikit spec path` shows the packaged one)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read spec file {path}: {exc}", "check the file's permissions and that it is UTF-8 text") from None
    return parse_spec(text, path)
