"""Hostile host input to `vmikit run`: kernel images and command lines (issue 12 findings 7, 9
and 10, issue 13 item 7). Each ends in exit 2 and one `vmikit: error:` line, never a traceback,
and never in a guest loaded where the memory map does not give it RAM."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import vmikit
from vmikit.machine import layout
from vmikit.machine.loader import MULTIBOOT_MAGIC

MB_FLAGS = 0x3  # page-align, memory info


def elf32(paddr: int, filesz: int, memsz: int, entry: int | None = None, *, phoff: int = 52,
          cut: int | None = None) -> bytes:
    """A minimal multiboot ELF32: the header, one PT_LOAD of ``filesz`` bytes at ``paddr`` holding
    the multiboot header and `hlt`s, cut to ``cut`` bytes if given."""
    body_off = 0x1000
    header = struct.pack("<4sBBBB8xHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 2, 3, 1,
                         entry if entry is not None else paddr + 12, phoff, 0, 0, 52, 32, 1, 0, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, body_off, paddr, paddr, filesz, memsz, 7, 0x1000)
    mb = struct.pack("<III", MULTIBOOT_MAGIC, MB_FLAGS, (-(MULTIBOOT_MAGIC + MB_FLAGS)) & 0xFFFFFFFF)
    body = (mb + b"\xf4" * filesz)[:filesz]
    data = bytearray(body_off + filesz)
    data[:52] = header
    data[52:84] = phdr
    data[body_off:] = body
    return bytes(data[:cut] if cut is not None else data)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vmikit: error: ")]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    return errors[0]


def test_the_minimal_image_is_accepted(tmp_path: Path, kvm: str) -> None:
    """The image the other tests corrupt is valid: it loads and runs until the watchdog (hlt)."""
    image = tmp_path / "ok.elf"
    image.write_bytes(elf32(0x100000, 0x40, 0x40))
    proc = vmikit("run", str(image), "--rom", "none", "--timeout", "5")
    assert proc.returncode == 4 and "halted" in proc.stderr, proc.stderr


def test_a_huge_program_header_offset(tmp_path: Path) -> None:
    """An ELF64 whose e_phoff is near 2^64 raised OverflowError from the ELF parser."""
    image = bytearray(elf32(0x100000, 0x40, 0x40))
    ident = struct.pack("<4sBBBB8x", b"\x7fELF", 2, 1, 1, 0)
    header64 = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x10000C, (1 << 64) - 64, 0, 0, 64, 56, 1, 0, 0, 0)
    image[:64] = header64
    bad = tmp_path / "phoff.elf"
    bad.write_bytes(bytes(image))
    assert "truncated" in one_line_error(vmikit("run", str(bad), "--rom", "none"))


def test_truncated_before_the_multiboot_header(tmp_path: Path) -> None:
    """Issue 13 item 7: cut before its multiboot header, an image was called "not a multiboot
    kernel"; it is truncated (shorter than its own headers claim)."""
    image = tmp_path / "cut.elf"
    image.write_bytes(elf32(0x100000, 0x40, 0x40, cut=40))
    line = one_line_error(vmikit("run", str(image), "--rom", "none"))
    assert "truncated" in line and "multiboot header" not in line


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "directory"])
def test_not_a_regular_file(tmp_path: Path, target: str) -> None:
    """`vmikit run /dev/zero` read forever; a FIFO or a directory is refused too."""
    if target == "fifo":
        path = tmp_path / "image.fifo"
        os.mkfifo(path)
    elif target == "directory":
        path = tmp_path
    else:
        path = Path(target)
    assert "not a regular file" in one_line_error(vmikit("run", str(path), "--rom", "none", timeout=30))


@pytest.mark.parametrize("paddr", [layout.ROM_DATA_BASE, layout.ROM_BASE, layout.LOW_RAM_END - 0x20])
def test_a_segment_outside_the_memory_map_is_refused(tmp_path: Path, paddr: int) -> None:
    """Finding 9: a segment over the ROM data area (RAM that backs the VMI layer's buffers, not
    in the memory map) was loaded; the ROM window and the reserved hole are refused too."""
    image = tmp_path / "low.elf"
    image.write_bytes(elf32(paddr, 0x40, 0x40))
    line = one_line_error(vmikit("run", str(image), "--rom", "full"))
    assert "outside the RAM the memory map gives the guest" in line


def test_a_long_command_line_is_refused_not_cut(kvm: str) -> None:
    """Finding 10: a command line over the limit was cut silently, even inside a UTF-8 character."""
    limit = layout.MAX_CMDLINE_BYTES
    line = one_line_error(vmikit("run", "hello", "--cmdline", "x" * (limit - 1) + "é"))
    assert f"{limit + 1} bytes" in line and str(limit) in line
    from vmikit.errors import UsageError
    from vmikit.guest.build import build_guest
    from vmikit.machine.board import Machine

    with pytest.raises(UsageError, match=f"--cmdline is {limit + 1} bytes, more than the {limit}"):  # without the CLI
        Machine(build_guest("hello"), cmdline="x" * (limit - 1) + "é")


def test_a_non_utf8_command_line(kvm: str) -> None:
    """Finding 7: a command line of bytes that are not UTF-8 gave a traceback. The CLI refuses it
    in one line; given to the board directly, its bytes reach the guest whole."""
    proc = subprocess.run([sys.executable, "-m", "vmikit", "run", "hello", "--cmdline", os.fsdecode(b"k=\xff\xfe")],
                          capture_output=True, text=True, errors="replace", timeout=120)
    assert "UTF-8" in one_line_error(proc)
    from vmikit.guest.build import build_guest
    from vmikit.machine.board import Machine

    with Machine(build_guest("hello"), cmdline=os.fsdecode(b"k=\xff\xfe")) as machine:
        assert machine.memory.read(machine.kernel.info_addr + 0x100 + 3 * 24, 16) == b"hello.elf k=\xff\xfe\0v"


def test_a_kernel_linked_over_the_info_block_gets_it_elsewhere(kvm: str, tmp_path: Path) -> None:
    """kvm-unit-tests' realmode test is linked at 0x8000, where the multiboot info goes: the loader
    puts the info block at its other place; a kernel covering both places is refused in one line."""
    from vmikit.machine.board import Machine

    low = tmp_path / "at8000.elf"
    low.write_bytes(elf32(layout.MULTIBOOT_INFO_ADDR, 0x2000, 0x2000))
    with Machine(low, timeout=10) as machine:
        assert machine.kernel.info_addr == layout.MULTIBOOT_INFO_PLACES[1]
        assert machine.memory.read(machine.kernel.info_addr, 4) != b"\0\0\0\0"  # the flags word
        assert machine.memory.read(layout.MULTIBOOT_INFO_ADDR, 4) == struct.pack("<I", MULTIBOOT_MAGIC)
    both = tmp_path / "both.elf"
    both.write_bytes(elf32(layout.MULTIBOOT_INFO_ADDR, 0x1000, layout.LOW_RAM_END - layout.MULTIBOOT_INFO_ADDR))
    line = one_line_error(vmikit("run", str(both), "--rom", "none"))
    assert "overlaps every place for the multiboot info block" in line
