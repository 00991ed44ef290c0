"""The guest runtime builds, produces loadable multiboot ELF32 images, caches, and boots on QEMU."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmikit.errors import HostError, UsageError
from vmikit.guest import build as gb
from vmikit.machine import layout

BUNDLED = ["divzero", "hang", "hello", "triplefault"]
MULTIBOOT_MAGIC = 0x1BADB002

needs_gcc = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("objcopy") is None,
    reason="gcc/objcopy not installed (apt-get install gcc binutils)",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guest-cache")


@pytest.fixture(scope="module")
def images(cache: Path) -> dict[str, Path]:
    if shutil.which("gcc") is None or shutil.which("objcopy") is None:
        pytest.skip("gcc/objcopy not installed (apt-get install gcc binutils)")
    return {name: gb.build_guest(name, cache_dir=cache) for name in gb.available_guests()}


def _defines(header: Path) -> dict[str, int]:
    pattern = re.compile(r"^\s*#\s*define\s+(\w+)\s+(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b", re.M)
    return {name: int(value, 0) for name, value in pattern.findall(header.read_text())}


def test_board_header_matches_layout() -> None:
    defines = _defines(gb.guest_source_dir() / "include" / "board.h")
    for name in ("PORT_SERIAL", "PORT_EXIT", "PORT_PANIC", "PORT_BENCH", "PT_POOL_BASE", "PT_POOL_SIZE",
                 "DATA_POOL_BASE", "DATA_POOL_SIZE", "EXIT_OK", "EXIT_FAILED_TESTS", "EXIT_EXCEPTION"):
        assert defines[name] == getattr(layout, name), name
    assert defines["KERNEL_BASE"] == layout.HIGH_RAM_BASE


def test_available_guests() -> None:
    assert set(BUNDLED) <= set(gb.available_guests())
    assert gb.available_guests() == sorted(gb.available_guests())


def test_unknown_guest_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"unknown guest 'nope'; choose one of: .*hello"):
        gb.build_guest("nope")


def test_missing_gcc_is_a_host_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gb.shutil, "which", lambda name: None)
    with pytest.raises(HostError, match=r"gcc not found; install it with `apt-get install gcc binutils`"):
        gb.build_guest("hello")


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMIKIT_CACHE_DIR", str(tmp_path))
    assert gb.default_cache_dir() == tmp_path / "guests"


@needs_gcc
@pytest.mark.parametrize("name", BUNDLED)
def test_image_is_multiboot_elf32(images: dict[str, Path], name: str) -> None:
    from elftools.elf.elffile import ELFFile

    path = images[name]
    assert path.name == f"{name}.elf"
    with path.open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 32
        assert elf["e_machine"] == "EM_386"
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads and min(s["p_paddr"] for s in loads) == layout.HIGH_RAM_BASE
        entry = elf["e_entry"]
        assert any(s["p_paddr"] <= entry < s["p_paddr"] + s["p_memsz"] for s in loads)

    head = path.read_bytes()[:8192]
    found = [
        off
        for off in range(0, len(head) - 11, 4)
        if struct.unpack_from("<I", head, off)[0] == MULTIBOOT_MAGIC
    ]
    assert found, "no multiboot header in the first 8 KiB"
    magic, flags, checksum = struct.unpack_from("<III", head, found[0])
    assert flags == 0x3
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0


@needs_gcc
def test_second_build_is_a_cache_hit(
    images: dict[str, Path], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = images["hello"]
    mtime = first.stat().st_mtime_ns

    def no_rebuild(*args: object, **kwargs: object) -> Path:
        raise AssertionError("cache miss: the toolchain ran again")

    monkeypatch.setattr(gb, "_run_toolchain", no_rebuild)
    again = gb.build_guest("hello", cache_dir=cache)
    assert again == first
    assert again.stat().st_mtime_ns == mtime


@needs_gcc
def test_changing_a_source_changes_the_hash(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(gb.guest_source_dir(), src)
    before = gb.guest_hash("hello", source_dir=src)
    assert before == gb.guest_hash("hello")  # the key does not depend on the location

    for edited in (src / "runtime" / "string.c", src / "include" / "board.h", src / "guests" / "hello.c"):
        edited.write_text(edited.read_text() + "\n/* edited */\n")
        after = gb.guest_hash("hello", source_dir=src)
        assert after != before, edited
        before = after

    cache = tmp_path / "cache"
    image = gb.build_guest("hello", cache_dir=cache, source_dir=src)
    assert image.parent.name == before


@needs_gcc
def test_extra_sources_and_include_dirs(tmp_path: Path) -> None:
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "extra.h").write_text("#define EXTRA_ANSWER 42\nint extra_answer(void);\n")
    extra = tmp_path / "extra.c"
    extra.write_text('#include "extra.h"\nint extra_answer(void) { return EXTRA_ANSWER; }\n')
    main = tmp_path / "answer.c"
    main.write_text(
        '#include "lib.h"\n#include "extra.h"\n'
        "void kmain(uint32_t magic, uint32_t mbinfo)\n"
        "{ (void)magic; (void)mbinfo; report(extra_answer() == 42, \"extra\"); exit(report_summary()); }\n"
    )
    try:
        gb.register_guest("answer", main, extra_sources=[extra], include_dirs=[inc])
        assert "answer" in gb.available_guests()
        image = gb.build_guest("answer", cache_dir=tmp_path / "cache")
        assert image.is_file()
        key = gb.guest_hash("answer")
        (inc / "extra.h").write_text("#define EXTRA_ANSWER 42 /* changed */\nint extra_answer(void);\n")
        assert gb.guest_hash("answer") != key
    finally:
        gb._registered.pop("answer", None)


@needs_gcc
def test_compile_error_is_a_host_error_with_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text('#include "lib.h"\nvoid kmain(uint32_t magic, uint32_t mbinfo) { this is not C; }\n')
    try:
        gb.register_guest("bad", bad)
        with pytest.raises(HostError) as info:
            gb.build_guest("bad", cache_dir=tmp_path / "cache")
    finally:
        gb._registered.pop("bad", None)
    message = str(info.value)
    assert "\n" not in message
    assert "building guest 'bad' failed:" in message and "error" in message
    log = Path(message.rsplit("full log in ", 1)[1])
    assert log.is_file() and "bad.c" in log.read_text()


# --- QEMU (stands in for bare hardware) -------------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")


def _qemu(image: Path) -> subprocess.CompletedProcess[str]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    cmd = [
        QEMU, "-kernel", str(image),
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-serial", "stdio", "-display", "none", "-no-reboot",
        "-m", "128", "-accel", "tcg",
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@needs_gcc
def test_hello_on_qemu(images: dict[str, Path]) -> None:
    proc = _qemu(images["hello"])
    lines = proc.stdout.splitlines()
    assert "vmikit hello guest" in lines
    passes = [line for line in lines if line.startswith("PASS: ")]
    assert len(passes) >= 8, proc.stdout
    assert not [line for line in lines if line.startswith("FAIL")], proc.stdout
    assert f"DONE pass={len(passes)} fail=0" in lines
    assert not re.search(r"\d+ passed, \d+ failed", proc.stdout)
    assert proc.returncode == (layout.EXIT_OK << 1) | 1, proc.stdout + proc.stderr


@needs_gcc
def test_divzero_on_qemu(images: dict[str, Path]) -> None:
    proc = _qemu(images["divzero"])
    assert re.search(r"^EXCEPTION: vector 0 \(#DE\) error 0x0 at rip 0x[0-9a-f]+$", proc.stdout, re.M), proc.stdout
    assert proc.returncode == (layout.EXIT_EXCEPTION << 1) | 1, proc.stdout + proc.stderr


# --- the VMI layer in every guest ---------------------------------------------------------

@needs_gcc
def test_every_guest_uses_the_generated_vmi_header(images: dict[str, Path], cache: Path) -> None:
    from vmikit.abi import load_spec
    from vmikit.abi.cheader import generate

    expected = generate(load_spec()).encode()
    header_dir = gb.vmi_header_dir(cache)
    assert header_dir.parent == cache / "include" and (header_dir / "vmi_spec.h").read_bytes() == expected
    for name, image in images.items():
        info = gb.build_info(image)
        assert Path(str(info["vmi_spec_h"])) == (header_dir / "vmi_spec.h").resolve(), name


@needs_gcc
def test_the_spec_header_is_part_of_the_cache_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = gb.vmi_header_text()
    before = gb.guest_hash("hello", cache_dir=tmp_path)
    monkeypatch.setattr(gb, "vmi_header_text", lambda: original + "/* changed */\n")
    assert gb.guest_hash("hello", cache_dir=tmp_path) != before


def test_a_header_beside_the_guest_source_is_part_of_the_key(tmp_path: Path) -> None:
    import shutil

    from vmikit.guest.build import guest_hash, guest_source_dir

    tree = tmp_path / "src"
    shutil.copytree(guest_source_dir(), tree)
    before = guest_hash("mmu", source_dir=tree)
    header = tree / "guests" / "mmu_common.h"
    header.write_text(header.read_text() + "\n/* changed */\n")
    assert guest_hash("mmu", source_dir=tree) != before
