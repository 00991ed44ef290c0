"""Build the ROM with the host gcc/binutils, cached by a hash of every input.

Steps: generate entries.S, rom_layout.h, vmi_spec.h and the linker script into a
temporary directory; compile + link at ROM_BASE (data at ROM_DATA_BASE); objcopy the
image section only; pad and patch (image.finalize); check it with parse_rom. The
result goes to <cache root>/<sha256>/rom.bin, the directory renamed into place
atomically so concurrent builders never see half a build.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from vmikit.abi import cheader
from vmikit.abi.model import Spec, unsafe_char
from vmikit.abi.spec import load_spec
from vmikit.cache import cache_dir, cache_error, make_dirs, publish
from vmikit.toolchain import find_tool, first_error, tool_version
from vmikit.errors import HostError
from vmikit.rom import generate
from vmikit.rom.image import RomImage, RomProfile, finalize, parse_rom

CFLAGS: tuple[str, ...] = (
    "-m64", "-std=gnu11", "-ffreestanding", "-fno-pic", "-fno-pie",
    "-mno-red-zone", "-mgeneral-regs-only", "-mcmodel=small",
    "-O2", "-nostdlib", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",  # no memset/memcpy calls: there is no libc
    "-Wall", "-Wextra", "-Werror",
)
LDFLAGS: tuple[str, ...] = ("-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,-z,noexecstack")
IMAGE_SECTION = ".rom"


def default_cache_dir() -> Path:
    return cache_dir("rom")


def _sources(spec: Spec, profile: RomProfile, honour: bool, deprivileged: bool = False,
             smp: bool = False) -> dict[str, str]:
    """Every file of the build by name: hand-written ones and generated ones."""
    src = generate.SOURCE_DIR
    stubs = generate.plan_stubs(spec, profile, honour, deprivileged)
    files = {
        "hcall.S": (src / "hcall.S").read_text(),
        "linker.ld": generate.linker_script((src / "linker.ld.in").read_text()),
        "entries.S": generate.entries_asm(spec, stubs, honour),
        "rom_layout.h": generate.layout_header(spec, profile, honour, deprivileged, smp),
        "vmi_spec.h": cheader.generate(spec),
    }
    if honour:
        files["queue.c"] = (src / "queue.c").read_text()
    for name in ("entries.S", "rom_layout.h", "vmi_spec.h"):
        _check_generated(name, files[name])
    return files


def _check_generated(name: str, text: str) -> None:
    """The last line of defence before gcc: generated text holds no character gcc could read as
    a line end (CR, form feed, ...) or a reader could misread, only LF and tab."""
    for line in text.split("\n"):
        bad = unsafe_char(line.replace("\t", " "))
        if bad is not None:
            raise HostError(f"generated ROM source {name} holds the character U+{ord(bad):04X}",
                            "this is a vmikit bug (the spec loader and the emitters should refuse it); please report it")


def _digest(files: dict[str, str], profile: RomProfile, honour: bool, gcc: str, objcopy: str) -> str:
    h = hashlib.sha256()

    def feed(label: str, data: str) -> None:
        raw = data.encode()
        h.update(label.encode() + b"\0" + len(raw).to_bytes(8, "little") + raw)

    feed("profile", profile.value)
    feed("honour", str(honour))
    feed("cflags", "\0".join(CFLAGS))
    feed("ldflags", "\0".join(LDFLAGS))
    feed("gcc", tool_version(gcc))
    feed("objcopy", tool_version(objcopy))
    for name in sorted(files):
        feed(f"file:{name}", files[name])
    return h.hexdigest()


def _compile(workdir: Path, files: dict[str, str], gcc: str, objcopy: str, log_path: Path) -> bytes:
    """Write the sources, compile, link, extract the image; returns the linked image bytes."""
    for name, text in files.items():
        (workdir / name).write_text(text)
    units = ["entries.S"] + (["queue.c"] if "queue.c" in files else [])
    commands = [
        [gcc, *CFLAGS, *LDFLAGS, "-I.", "-Wl,-T,linker.ld", "-Wl,-Map,rom.map", *units, "-o", "rom.elf"],
        [objcopy, "-O", "binary", "-j", IMAGE_SECTION, "rom.elf", "rom.linked"],
    ]
    log: list[str] = []
    for cmd in commands:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
        log.append("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("\n".join(log))
            raise HostError(f"building the VMI ROM failed: {first_error(proc.stdout + proc.stderr)}",
                            f"full log in {log_path}")
    (workdir / "build.log").write_text("\n".join(log))
    return (workdir / "rom.linked").read_bytes()


def build_rom(profile: RomProfile = RomProfile.FULL, *, honour_annotations: bool = True,
              spec: Spec | None = None, cache_dir: Path | None = None, deprivileged: bool = False,
              smp: bool = False) -> RomImage:
    """Build (or reuse from the cache) the ROM image for this profile and annotation mode;
    ``deprivileged``: for a kernel at ring 3 (no privileged instruction in the image); ``smp``:
    for several vCPUs, each CPU's queue and shared page in its own area reached through GS
    (docs/smp.md; needs an interface with the shared page, 1.3+)."""
    spec = spec or load_spec()
    # An interface without the queue annotation (VMI 1.0) has nothing to honour: the ROM is
    # then the annotation-unaware one, whatever was asked.
    honour_annotations = honour_annotations and "queue" in spec.annotations
    gcc, objcopy = find_tool("gcc", "build the VMI ROM"), find_tool("objcopy", "build the VMI ROM")
    deprivileged = deprivileged and spec.shared is not None  # before 1.3 there is no such model
    if smp and spec.shared is None:
        raise HostError(f"an SMP ROM needs the per-vCPU shared page, which VMI {spec.version} lacks",
                        "use interface 1.3 or later (--spec), or one vCPU")
    files = _sources(spec, profile, honour_annotations, deprivileged, smp)
    digest = _digest(files, profile, honour_annotations, gcc, objcopy)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / digest
    image_path = final / "rom.bin"
    try:
        cached = image_path.is_file()
    except OSError as err:  # a cache another user made, not readable by this one
        raise cache_error("ROM", root, err) from None
    if not cached:
        try:
            make_dirs(root, root)
            workdir = Path(tempfile.mkdtemp(prefix=".build-rom-", dir=root))
        except OSError as err:
            raise cache_error("ROM", root, err) from None
        try:
            image = finalize(_compile(workdir, files, gcc, objcopy, root / "logs" / f"rom-{digest[:16]}.log"))
            parse_rom(image, spec)  # never cache an image the guest would reject
            (workdir / "rom.bin").write_bytes(image)
            publish(workdir, final, image_path)
        except ValueError as err:
            raise HostError(f"the built VMI ROM is invalid: {err}", "this is a vmikit bug; please report it") from err
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        data = image_path.read_bytes()
    except OSError as err:
        raise cache_error("ROM", root, err) from None
    parsed = parse_rom(data, spec)
    return RomImage(parsed.data, profile, honour_annotations, parsed.entries, parsed.raw_entry)
