"""Load the interface definition: `load_spec()` is what the rest of vmikit calls."""

from __future__ import annotations

import os
import stat
from functools import lru_cache
from pathlib import Path

from vmikit.abi.loader import MAX_SPEC_BYTES, parse_spec
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
        text = _read(path)
    except FileNotFoundError:
        raise UsageError(f"spec file {path} does not exist", "pass an existing vmi.toml (`vmikit spec path` shows the packaged one)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read spec file {path}: {exc}", "check the file's permissions and that it is UTF-8 text") from None
    return parse_spec(text, path)


def _read(path: Path) -> str:
    """The file's text, refusing what is not a spec-sized regular file (/dev/zero, a FIFO, a
    directory, a huge file) before reading any of it."""
    # O_NONBLOCK: opening a FIFO without a writer would otherwise wait for ever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"spec file {path} is not a regular file", "pass a vmi.toml file, not a device, FIFO or directory")
        data = b""
        while len(data) <= MAX_SPEC_BYTES:  # never more than the bound, however the file grows
            chunk = os.read(fd, MAX_SPEC_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_SPEC_BYTES:
        raise UsageError(f"spec file {path} is larger than {MAX_SPEC_BYTES >> 20} MiB", "pass the right file: a spec is a few KiB")
    return data.decode("utf-8")
