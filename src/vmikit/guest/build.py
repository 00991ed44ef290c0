"""Build the bundled freestanding guest kernels with the host gcc, with a cache.

A guest is *its own .c file* + *the common runtime* (``src/runtime``: boot code,
IDT, printf, report, page allocator, linker script) + *optional extra sources
and include directories*. Other modules plug in through the last two, e.g. the
VMI layer adds a generated C header directory and its own .c files::

    build_guest("hello")                                   # a bundled guest
    build_guest("vmi_conf", extra_sources=[gen / "vmi.c"],  # a guest registered
                include_dirs=[gen])                         # by another module

or registers a guest once with :func:`register_guest` so that
``build_guest(name)`` and ``vmikit run NAME`` find it.

Every guest also gets the guest VMI layer: ``src/vmi/vmi.c`` is compiled in,
``vmi_spec.h`` is generated from the packaged spec into a content-addressed
directory ``<cache root>/include/<sha256 of the header>/`` that goes on the
include path (so the header's contents are part of the cache key), and the
runtime calls ``vmi_init()`` before ``kmain``. Next to each image,
``<name>.json`` records which ``vmi_spec.h`` the compiler actually used (from
``gcc -M``) and its sha256 (:func:`build_info`).

The result is an ELF32 (``objcopy -O elf32-i386``) multiboot image linked at
1 MiB, the format QEMU's ``-kernel`` and the vmikit loader both take. Images are
cached under ``<cache root>/<sha256>/<name>.elf`` where the hash covers every
input file's name and contents, the compiler flags and ``gcc --version``; a build
happens in a temporary directory and is renamed into place atomically, so
concurrent builders never see half-written images.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmikit.cache import FILE_MODE, cache_dir, cache_error, make_dirs
from vmikit.toolchain import find_tool, first_error, tool_version
from vmikit.errors import HostError, UsageError

if TYPE_CHECKING:
    from vmikit.abi.model import Spec

__all__ = [
    "CFLAGS",
    "LDFLAGS",
    "GuestSpec",
    "available_guests",
    "build_guest",
    "build_info",
    "default_cache_dir",
    "guest_hash",
    "guest_source_dir",
    "guest_spec",
    "register_guest",
    "unregister_guest",
    "vmi_header_dir",
    "vmi_header_text",
]

# Compiler flags for every translation unit (C and .S). Part of the cache key.
CFLAGS: tuple[str, ...] = (
    "-m64",
    "-std=gnu11",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",  # interrupt stubs push onto the interrupted stack
    "-mgeneral-regs-only",  # SSE is never enabled in the guest
    "-mcmodel=small",  # everything lives below 2 GiB
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
)
# Link flags; the linker script is added separately (it is a hashed input).
LDFLAGS: tuple[str, ...] = (
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",  # keeps the multiboot header in the first 8 KiB
    "-Wl,-z,noexecstack",
)

VMI_HEADER = "vmi_spec.h"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SOURCE_SUFFIXES = (".c", ".S")
_HEADER_SUFFIXES = (".h", ".inc")


@dataclass(frozen=True)
class GuestSpec:
    """Everything that goes into one guest image besides the common runtime."""

    name: str
    main_source: Path
    extra_sources: tuple[Path, ...] = ()
    include_dirs: tuple[Path, ...] = ()
    extra_cflags: tuple[str, ...] = ()


# Guests added at run time by other modules (name -> spec); bundled ones are found on disk.
_registered: dict[str, GuestSpec] = {}


def guest_source_dir() -> Path:
    """The directory holding the runtime (``runtime/``, ``include/``) and bundled guests (``guests/``)."""
    return Path(__file__).resolve().parent / "src"


def _bundled(source_dir: Path) -> dict[str, Path]:
    guests = source_dir / "guests"
    if not guests.is_dir():
        return {}
    return {p.stem: p for p in guests.glob("*.c") if p.is_file()}


def available_guests(source_dir: Path | None = None) -> list[str]:
    """Sorted names of the guests ``build_guest`` accepts (bundled and registered)."""
    names = set(_bundled(source_dir or guest_source_dir())) | set(_registered)
    return sorted(names)


def register_guest(
    name: str,
    main_source: Path,
    *,
    extra_sources: Iterable[Path] = (),
    include_dirs: Iterable[Path] = (),
    extra_cflags: Iterable[str] = (),
) -> GuestSpec:
    """Make a guest outside ``src/guests`` buildable by name (replaces an earlier registration).

    ``main_source`` defines ``kmain``; ``extra_sources`` (.c/.S) are compiled and
    linked with it; ``include_dirs`` are searched before the runtime's headers.
    """
    if not _NAME_RE.match(name):
        raise UsageError(f"invalid guest name {name!r}", "use letters, digits, '_', '.' and '-'")
    spec = GuestSpec(
        name=name,
        main_source=Path(main_source),
        extra_sources=tuple(Path(p) for p in extra_sources),
        include_dirs=tuple(Path(p) for p in include_dirs),
        extra_cflags=tuple(extra_cflags),
    )
    _registered[name] = spec
    return spec


def unregister_guest(name: str) -> None:
    """Forget a guest added with :func:`register_guest` (no error if it is not registered)."""
    _registered.pop(name, None)


def guest_spec(name: str, *, source_dir: Path | None = None) -> GuestSpec:
    """The spec for a guest name; raises UsageError naming the choices if unknown."""
    if name in _registered:
        return _registered[name]
    bundled = _bundled(source_dir or guest_source_dir())
    if name in bundled:
        return GuestSpec(name=name, main_source=bundled[name])
    choices = ", ".join(available_guests(source_dir)) or "(none)"
    raise UsageError(f"unknown guest {name!r}", f"choose one of: {choices}")


def default_cache_dir() -> Path:
    return cache_dir("guests")


def vmi_header_text(spec: Spec | Path | None = None) -> str:
    """The guest C header generated from ``spec`` (default: the packaged spec; what ``vmikit spec header`` prints)."""
    from vmikit.abi import load_spec
    from vmikit.abi.cheader import generate

    if spec is None or isinstance(spec, (str, Path)):
        spec = load_spec(Path(spec) if spec is not None else None)
    return generate(spec)


def vmi_header_dir(cache_dir: Path | None = None, spec: Spec | Path | None = None) -> Path:
    """``<cache root>/include/<sha256>/`` holding the generated ``vmi_spec.h`` (written once, atomically).

    ``spec`` builds guests against another interface version (a past spec file, say); the
    directory is content-addressed, so each version's header gets its own.
    """
    data = (vmi_header_text() if spec is None else vmi_header_text(spec)).encode()  # no arg: tests patch it
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = root / "include" / hashlib.sha256(data).hexdigest()
    target = directory / VMI_HEADER
    try:
        if target.is_file() and target.read_bytes() == data:
            return directory
    except OSError as err:  # e.g. a cache made by root whose header is 0600
        raise cache_error("guest", root, err) from None
    try:
        make_dirs(directory, root.parent)
        fd, tmp = tempfile.mkstemp(prefix=".vmi_spec-", dir=directory)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)  # mkstemp makes it 0600
            f.write(data)
        os.replace(tmp, target)
    except OSError as err:
        raise HostError(f"cannot write the generated {VMI_HEADER} under {root}: {err}",
                        "set VMIKIT_CACHE_DIR to a writable directory") from err
    return directory


def build_info(image: Path) -> dict[str, object]:
    """What ``build_guest`` recorded about ``image``: ``vmi_spec_h`` (path) and ``vmi_spec_sha256``."""
    info = Path(image).with_suffix(".json")
    if not info.is_file():
        raise UsageError(f"no build record for {image}", "build the guest with vmikit.guest.build.build_guest")
    return json.loads(info.read_text())


@dataclass(frozen=True)
class _Plan:
    """Resolved inputs of one build: what to compile, with what, and the hash of it all."""

    spec: GuestSpec
    sources: tuple[Path, ...]  # compiled and linked, runtime first, main source last
    include_dirs: tuple[Path, ...]  # extra dirs first, then the runtime's
    linker_script: Path
    hashed_files: tuple[Path, ...]
    cflags: tuple[str, ...]
    digest: str
    vmi_source: Path


def _files_under(directory: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in suffixes)


def _plan(
    name: str,
    *,
    source_dir: Path | None,
    extra_sources: Iterable[Path],
    include_dirs: Iterable[Path],
    gcc: str,
    objcopy: str,
    cache_dir: Path | None = None,
    interface: Spec | Path | None = None,
) -> _Plan:
    src = (source_dir or guest_source_dir()).resolve()
    spec = guest_spec(name, source_dir=src)
    runtime_dir = src / "runtime"
    runtime_include = src / "include"
    vmi_dir = src / "vmi"
    linker_script = runtime_dir / "linker.ld"
    for needed in (linker_script, vmi_dir / "vmi.c"):
        if not needed.is_file():
            raise HostError(f"guest runtime missing: {needed}", "reinstall vmikit")

    extra_src = tuple(Path(p).resolve() for p in (*spec.extra_sources, *extra_sources))
    extra_inc = tuple(Path(p).resolve() for p in (*spec.include_dirs, *include_dirs))
    for path in (spec.main_source, *extra_src):
        if not path.is_file():
            raise UsageError(f"guest {name!r}: source file not found: {path}", "check the path")
    for path in extra_inc:
        if not path.is_dir():
            raise UsageError(f"guest {name!r}: include directory not found: {path}", "check the path")

    # Caller's include dirs first (they may override anything), then the generated spec header,
    # the VMI layer and the runtime.
    includes = (*extra_inc, vmi_header_dir(cache_dir, interface).resolve(), vmi_dir, runtime_include)
    sources = (*_files_under(runtime_dir, _SOURCE_SUFFIXES), *_files_under(vmi_dir, _SOURCE_SUFFIXES),
               *extra_src, spec.main_source.resolve())
    # Headers next to the guest's own source count too (a guest may include "mmu_common.h").
    # dict.fromkeys: no duplicates, and an order that does not depend on where the trees live.
    header_dirs = (*includes, spec.main_source.resolve().parent)
    headers = list(dict.fromkeys(h for d in header_dirs for h in _files_under(d, _HEADER_SUFFIXES)))
    hashed = (*sources, *headers, linker_script)
    cflags = (*CFLAGS, *spec.extra_cflags)

    h = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    feed("guest", name.encode())
    feed("cflags", "\0".join(cflags).encode())
    feed("ldflags", "\0".join(LDFLAGS).encode())
    feed("gcc", tool_version(gcc).encode())
    feed("objcopy", tool_version(objcopy).encode())
    for i, d in enumerate(includes):
        feed(f"include[{i}]", d.name.encode())
    for path in hashed:
        # Name relative to a well-known root where possible so the key does not
        # depend on where the package is installed; contents always count.
        try:
            label = str(path.relative_to(src))
        except ValueError:
            label = path.name
        feed(f"file:{label}", path.read_bytes())
    return _Plan(
        spec=spec,
        sources=tuple(sources),
        include_dirs=includes,
        linker_script=linker_script,
        hashed_files=tuple(hashed),
        cflags=cflags,
        digest=h.hexdigest(),
        vmi_source=vmi_dir / "vmi.c",
    )


def guest_hash(
    name: str,
    *,
    source_dir: Path | None = None,
    extra_sources: Iterable[Path] = (),
    include_dirs: Iterable[Path] = (),
    cache_dir: Path | None = None,
    spec: Spec | Path | None = None,
) -> str:
    """The sha256 cache key ``build_guest`` would use for these inputs."""
    return _plan(
        name,
        source_dir=source_dir,
        extra_sources=extra_sources,
        include_dirs=include_dirs,
        gcc=find_tool("gcc"),
        objcopy=find_tool("objcopy"),
        cache_dir=cache_dir,
        interface=spec,
    ).digest


def _run_toolchain(plan: _Plan, gcc: str, objcopy: str, workdir: Path, log_path: Path) -> Path:
    """Compile + link into ``workdir`` and convert to ELF32; returns the ELF32 path."""
    elf64 = workdir / f"{plan.spec.name}.elf64"
    elf32 = workdir / f"{plan.spec.name}.elf"
    includes = [f"-I{d}" for d in plan.include_dirs]
    deps = workdir / "vmi.d"
    commands = [
        # Which vmi_spec.h the compiler really picks (the include path decides): recorded below.
        [gcc, *plan.cflags, *includes, "-M", "-MF", str(deps), str(plan.vmi_source)],
        [gcc, *plan.cflags, *includes, *LDFLAGS, f"-Wl,-T,{plan.linker_script}",
         *map(str, plan.sources), "-o", str(elf64)],
        [objcopy, "-O", "elf32-i386", str(elf64), str(elf32)],
    ]
    log_parts: list[str] = []
    for cmd in commands:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
        log_parts.append("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0:
            try:
                make_dirs(log_path.parent, log_path.parent.parent)
                log_path.write_text("\n".join(log_parts))
                os.chmod(log_path, FILE_MODE)
            except OSError as err:
                raise HostError(f"building guest {plan.spec.name!r} failed: {first_error(proc.stdout + proc.stderr)}",
                                f"no log could be written ({err.strerror}); set VMIKIT_CACHE_DIR to a writable "
                                "directory and build again") from None
            raise HostError(
                f"building guest {plan.spec.name!r} failed: {first_error(proc.stdout + proc.stderr)}",
                f"full log in {log_path}",
            )
    used = [Path(t) for t in deps.read_text().replace("\\\n", " ").split() if Path(t).name == VMI_HEADER]
    if len(used) != 1:
        raise HostError(f"building guest {plan.spec.name!r}: cannot tell which {VMI_HEADER} was used",
                        "report this to the vmikit developers")
    header = (workdir / used[0]).resolve()
    info = {"vmi_spec_h": str(header), "vmi_spec_sha256": hashlib.sha256(header.read_bytes()).hexdigest(),
            "include_dirs": [str(d) for d in plan.include_dirs]}
    (workdir / f"{plan.spec.name}.json").write_text(json.dumps(info, indent=2) + "\n")
    return elf32


def build_guest(
    name: str,
    *,
    cache_dir: Path | None = None,
    source_dir: Path | None = None,
    extra_sources: Iterable[Path] = (),
    include_dirs: Iterable[Path] = (),
    spec: Spec | Path | None = None,
) -> Path:
    """Build guest ``name`` (or reuse the cached image) and return the ELF32 image path.

    ``cache_dir`` defaults to :func:`default_cache_dir`; ``source_dir`` replaces
    the bundled runtime + guests tree (tests use a copy); ``extra_sources`` and
    ``include_dirs`` are added to those the guest was registered with; ``spec``
    (a Spec or a spec file) generates ``vmi_spec.h`` from another interface version
    than the packaged one (the header's contents are part of the cache key).
    """
    gcc = find_tool("gcc")
    objcopy = find_tool("objcopy")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    plan = _plan(
        name,
        source_dir=source_dir,
        extra_sources=tuple(extra_sources),
        include_dirs=tuple(include_dirs),
        gcc=gcc,
        objcopy=objcopy,
        cache_dir=root,
        interface=spec,
    )
    final = root / plan.digest / f"{name}.elf"
    try:
        if final.is_file():
            return final
    except OSError as err:
        raise cache_error("guest", root, err) from None

    try:
        make_dirs(final.parent, root.parent)
        workdir = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=root))
    except OSError as err:
        raise HostError(f"cannot create guest cache directory {root}: {err}", "set VMIKIT_CACHE_DIR to a writable directory") from err
    try:
        image = _run_toolchain(plan, gcc, objcopy, workdir, root / "logs" / f"{name}-{plan.digest[:16]}.log")
        for output in (image, image.with_suffix(".json")):
            os.chmod(output, FILE_MODE)  # whatever the umask or objcopy chose
        os.replace(image.with_suffix(".json"), final.with_suffix(".json"))  # the record first: the image marks completion
        os.replace(image, final)  # atomic: a racing builder's identical image is simply replaced
    except OSError as err:
        raise cache_error("guest", root, err) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return final
