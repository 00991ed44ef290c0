"""The build cache's entries (guests, their headers, the ROM): modes and errors shared by the builders.

Cache entries are build outputs: readable by everyone whatever the umask (a cache made by root, or
shared by a group, must still be usable), writable by their owner.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmikit.errors import HostError

FILE_MODE = 0o644
DIR_MODE = 0o755


def cache_dir(kind: str) -> Path:
    """``$VMIKIT_CACHE_DIR/KIND``, else ``$XDG_CACHE_HOME/vmikit/KIND``, else ``~/.cache/vmikit/KIND``."""
    root = os.environ.get("VMIKIT_CACHE_DIR")
    if root:
        return Path(root).expanduser() / kind
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vmikit" / kind


def cache_error(what: str, root: Path, err: OSError) -> HostError:
    """One line naming the cache directory, what failed, and how to get a usable cache."""
    detail = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    return HostError(f"cannot use the {what} cache {root} ({detail})",
                     "make it yours or readable (chmod -R a+rX DIR), or set VMIKIT_CACHE_DIR to a writable directory")


def make_dirs(path: Path, top: Path) -> None:
    """``mkdir -p path``, the directories it creates at or below ``top`` made DIR_MODE (not the umask's)."""
    created = []
    here = path
    while not here.exists() and here != here.parent:
        created.append(here)
        here = here.parent
    path.mkdir(parents=True, exist_ok=True)
    for directory in created:
        if directory == top or top in directory.parents:
            os.chmod(directory, DIR_MODE)


def publish(workdir: Path, final: Path, product: Path) -> None:
    """Make a finished build directory the cache entry ``final``: its files FILE_MODE and itself
    DIR_MODE (mkdtemp makes it 0700), then one atomic rename. A racing builder that got there
    first is fine as long as its ``product`` is in place; otherwise the rename's error stands."""
    for output in workdir.iterdir():
        os.chmod(output, FILE_MODE)
    os.chmod(workdir, DIR_MODE)
    try:
        os.rename(workdir, final)
    except OSError:
        if not product.is_file():
            raise
