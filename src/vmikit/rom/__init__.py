"""The VMI ROM the hypervisor maps at 0xC0000: header, entry table and stubs (docs/rom-abi.md).

    from vmikit.rom import RomProfile, build_rom, parse_rom
    image = build_rom(RomProfile.FULL, honour_annotations=True)   # cached gcc build
    parse_rom(image.data)                                          # what the guest checks
"""

from vmikit.rom.build import build_rom, default_cache_dir
from vmikit.rom.image import RomImage, RomProfile, parse_rom

__all__ = ["RomImage", "RomProfile", "build_rom", "default_cache_dir", "parse_rom"]
