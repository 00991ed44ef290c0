"""Multiboot v1 loading, the way QEMU's -kernel does it for an ELF kernel.

The image is hostile input: every header field and segment is checked before
anything is copied into guest memory.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from vmikit.errors import ImageError, UsageError
from vmikit.machine import layout
from vmikit.memory import GuestMemory

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192
MB_FLAG_PAGE_ALIGN = 1 << 0
MB_FLAG_MEMORY_INFO = 1 << 1
MB_FLAG_VIDEO_MODE = 1 << 2
MB_FLAG_AOUT_KLUDGE = 1 << 16
_MB_REQUIRED_MASK = 0xFFFF  # bits 0-15: requirements the loader must meet or refuse
_MB_SUPPORTED = MB_FLAG_PAGE_ALIGN | MB_FLAG_MEMORY_INFO

MBI_FLAG_MEM = 1 << 0
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_LOADER_NAME = 1 << 9

MAX_IMAGE_BYTES = 512 << 20  # more than any kernel that fits in guest RAM, with room for debug info

EM_386 = "EM_386"
EM_X86_64 = "EM_X86_64"


@dataclass(frozen=True)
class LoadedKernel:
    entry: int
    lowest: int
    highest: int  # end of the highest loaded byte
    info_addr: int


def find_multiboot_header(data: bytes) -> tuple[int, int] | None:
    """(offset, flags) of the first valid multiboot v1 header in the first 8 KiB."""
    window = data[:MULTIBOOT_SEARCH]
    for off in range(0, len(window) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", window, off)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
    return None


def read_image(path: Path) -> bytes:
    """The whole image file: a regular file of bounded size (not /dev/zero, a FIFO or a directory)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(f"kernel image {path} is not a regular file", "pass an ELF file")
            if info.st_size > MAX_IMAGE_BYTES:
                raise ImageError(f"kernel image {path} is {info.st_size >> 20} MiB, more than the "
                                 f"{MAX_IMAGE_BYTES >> 20} MiB vmikit loads", "strip the image (`strip --strip-debug`)")
            return file.read(MAX_IMAGE_BYTES + 1)[:MAX_IMAGE_BYTES]
    except FileNotFoundError:
        raise ImageError(f"kernel image {path} does not exist", "pass a bundled guest name or an ELF path") from None
    except IsADirectoryError:
        raise ImageError(f"kernel image {path} is not a regular file", "pass an ELF file") from None
    except OSError as exc:
        raise ImageError(f"cannot read kernel image {path}: {exc.strerror}", "check the path and its permissions") from None


def claimed_size(data: bytes) -> int:
    """How long the ELF file must be by its own header: the end of its program and section
    header tables, or of the ELF header itself if that is cut short."""
    if len(data) < 6:
        return 52
    if data[4] not in (1, 2) or data[5] != 1:
        return 0  # not a class or byte order vmikit loads: the ELF parser says so
    if len(data) < 52:
        return 52 if data[4] == 1 else 64
    if data[4] == 1:
        phoff, shoff = struct.unpack_from("<II", data, 28)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 42)
    elif len(data) >= 64:
        phoff, shoff = struct.unpack_from("<QQ", data, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    else:
        return 64
    return max(phoff + phentsize * phnum if phnum else 0, shoff + shentsize * shnum if shnum else 0)


def load_multiboot(path: Path, memory: GuestMemory, ram_end: int, cmdline: str = "") -> LoadedKernel:
    data = read_image(path)
    if not data.startswith(b"\x7fELF"):
        raise ImageError(f"{path} is not an ELF file", "pass a multiboot ELF kernel (see `vmikit build`)")
    needed = claimed_size(data)
    if needed > len(data):
        raise ImageError(f"{path} is truncated: its ELF header describes {needed} bytes but the file has {len(data)}",
                         "rebuild or re-copy the kernel image")
    # As QEMU's -kernel and GRUB do, the guest's command line starts with the kernel's name, then
    # the arguments: kvm-unit-tests, like a C program, takes the first word for argv[0].
    name = os.fsencode(path.name)[:layout.MAX_IMAGE_NAME_BYTES].replace(b" ", b"_")
    args = encode_cmdline(cmdline)
    cmd = name + b" " + args if args else name
    header = find_multiboot_header(data)
    if header is None:
        raise ImageError(f"{path} is not a multiboot kernel: no multiboot v1 header in its first 8 KiB",
                         "link a multiboot header near the start of the image (as vmikit's guests do)")
    _, mb_flags = header
    unsupported = mb_flags & _MB_REQUIRED_MASK & ~_MB_SUPPORTED
    if unsupported:
        raise ImageError(f"{path} requires multiboot features {unsupported:#x} that vmikit does not provide",
                         "drop the video-mode and other optional requests from its multiboot header")
    try:
        segments = _elf_segments(path, data)
    except ImageError:
        raise
    except (ELFError, struct.error, ValueError, IndexError, KeyError, OverflowError, EOFError, MemoryError) as exc:
        # pyelftools on a hostile header: any of these, from any field
        raise ImageError(f"{path} is a truncated or corrupt ELF file ({type(exc).__name__}: {str(exc)[:200]})",
                         "rebuild the kernel image") from None
    entry, loads = segments
    if not loads:
        raise ImageError(f"{path} has no loadable segments", "rebuild the kernel image")
    for paddr, offset, filesz, memsz in loads:
        if offset + filesz > len(data):
            raise ImageError(f"{path} is truncated: a segment needs bytes up to {offset + filesz:#x} "
                             f"but the file has {len(data):#x}", "rebuild or re-copy the kernel image")
        if memsz < filesz:
            raise ImageError(f"{path} has a segment whose memory size is smaller than its file size",
                             "rebuild the kernel image")
        if not _in_memory_map(paddr, memsz, ram_end) or not memory.is_ram(paddr, memsz):
            hint = (f"give the guest more memory (--memory {((paddr + memsz) >> 20) + 2} or more)"
                    if paddr >= layout.HIGH_RAM_BASE and paddr + memsz > ram_end
                    else f"link the kernel at or above {layout.HIGH_RAM_BASE:#x}")
            raise ImageError(f"{path} loads [{paddr:#x}, {paddr + memsz:#x}) outside the RAM the memory map "
                             "gives the guest", hint)
    # The info block goes where the kernel is not (kvm-unit-tests' realmode test is linked at 0x8000).
    info_addr = next((addr for addr in layout.MULTIBOOT_INFO_PLACES
                      if not any(p < addr + layout.MULTIBOOT_INFO_MAX and p + m > addr for p, _, _, m in loads)), None)
    if info_addr is None:
        raise ImageError(f"{path} overlaps every place for the multiboot info block "
                         f"({', '.join(f'{a:#x}' for a in layout.MULTIBOOT_INFO_PLACES)})",
                         f"link the kernel at or above {layout.HIGH_RAM_BASE:#x}")
    if not any(paddr <= entry < paddr + memsz for paddr, _, _, memsz in loads):
        raise ImageError(f"{path} has its entry point {entry:#x} outside its loaded segments", "rebuild the kernel image")
    for paddr, offset, filesz, memsz in loads:
        memory.write(paddr, data[offset:offset + filesz])
        memory.zero(paddr + filesz, memsz - filesz)
    lowest = min(p for p, *_ in loads)
    highest = max(p + m for p, _, _, m in loads)
    info = write_multiboot_info(memory, ram_end, cmd, info_addr)
    return LoadedKernel(entry=entry, lowest=lowest, highest=highest, info_addr=info)


def _in_memory_map(paddr: int, size: int, ram_end: int) -> bool:
    """Inside one usable range of the memory map the guest is given: not the ROM window, the
    hypervisor's data area below 1 MiB or anything beyond RAM, even where a region backs it."""
    return (0 <= paddr and paddr + size <= layout.LOW_RAM_END) or \
        (layout.HIGH_RAM_BASE <= paddr and paddr + size <= ram_end)


def encode_cmdline(cmdline: str) -> bytes:
    """The command line's bytes: passed whole (bytes from a non-UTF-8 argv come back as they were)
    or refused, never cut."""
    try:
        cmd = cmdline.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise UsageError("--cmdline holds characters that are not text", "pass plain text or UTF-8") from None
    if len(cmd) > layout.MAX_CMDLINE_BYTES:
        raise UsageError(f"--cmdline is {len(cmd)} bytes, more than the {layout.MAX_CMDLINE_BYTES} a multiboot "
                         "command line holds here", "shorten the command line")
    if b"\0" in cmd:
        raise UsageError("--cmdline holds a NUL byte, which would end it early", "drop the NUL byte")
    return cmd


def _elf_segments(path: Path, data: bytes) -> tuple[int, list[tuple[int, int, int, int]]]:
    import io

    elf = ELFFile(io.BytesIO(data))
    machine = elf["e_machine"]
    if machine not in (EM_386, EM_X86_64):
        raise ImageError(f"{path} is an ELF for {machine}, not x86", "build the kernel for x86")
    loads = []
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
            continue
        loads.append((seg["p_paddr"], seg["p_offset"], seg["p_filesz"], seg["p_memsz"]))
    entry = elf["e_entry"]
    if elf.elfclass == 64 and entry >= 1 << 32:
        raise ImageError(f"{path} has a 64-bit entry point {entry:#x}", "the multiboot entry must be a 32-bit physical address")
    return entry, loads


def write_multiboot_info(memory: GuestMemory, ram_end: int, cmdline: bytes,
                         base: int = layout.MULTIBOOT_INFO_ADDR) -> int:
    """The multiboot info block, memory map, command line and loader name at ``base``."""
    mmap_addr = base + 0x100
    entries = [
        (0, layout.LOW_RAM_END, 1),
        (layout.LOW_RAM_END, 0x100000 - layout.LOW_RAM_END, 2),  # EBDA, VGA, ROM window, BIOS
        (layout.HIGH_RAM_BASE, ram_end - layout.HIGH_RAM_BASE, 1),
    ]
    mmap = b"".join(struct.pack("<IQQI", 20, addr, length, kind) for addr, length, kind in entries)
    cmdline_addr = mmap_addr + len(mmap)
    if len(cmdline) > layout.MAX_IMAGE_NAME_BYTES + 1 + layout.MAX_CMDLINE_BYTES or b"\0" in cmdline:
        raise ValueError("the command line does not fit; encode_cmdline checks it")
    cmd = cmdline + b"\0"
    name_addr = cmdline_addr + len(cmd)
    name = b"vmikit\0"
    info = bytearray(116)
    struct.pack_into("<III", info, 0, MBI_FLAG_MEM | MBI_FLAG_CMDLINE | MBI_FLAG_MMAP | MBI_FLAG_LOADER_NAME,
                     layout.LOW_RAM_END // 1024, (ram_end - layout.HIGH_RAM_BASE) // 1024)
    struct.pack_into("<I", info, 16, cmdline_addr)
    struct.pack_into("<II", info, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, name_addr)
    memory.zero(base, layout.MULTIBOOT_INFO_MAX)
    memory.write(base, bytes(info))
    memory.write(mmap_addr, mmap)
    memory.write(cmdline_addr, cmd)
    memory.write(name_addr, name)
    return base
