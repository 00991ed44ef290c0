"""The C batch kernel of FlushQueue (``csrc/batch.c``): build, load, and hand it the VMM's arrays.

Why C: after every exit from a guest at ring 3 the host's TLB and caches are cold on this
machine kind, so each numpy call in the handler costs 2.5-4 µs and the ~25 of the numpy fast
path put a floor near 400 ns per entry (docs/bench.md). One ctypes call per batch does the whole
check-then-apply of a uniform batch instead; anything else it declines, with nothing written,
and the Python path (the reference) decides and names the first bad entry.

The shared object is built with the host gcc on first use into ``<cache root>/batch/<sha256>/``,
the hash covering the source, the flags and ``gcc --version`` (as the guest and ROM builds do).
``VMIKIT_BATCH_KERNEL=python`` (or ``DirectMmu(..., batch_kernel=False)``) turns it off, so tests
can compare both paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmikit.abi.model import BATCH_MAX_ENTRIES
from vmikit.cache import cache_dir, cache_error, make_dirs, publish
from vmikit.errors import HostError
from vmikit.hypervisor.pagetables import EVERYTHING, GiB1, MiB2, PAGE, PageTables
from vmikit.toolchain import find_tool, first_error, tool_version

SOURCE = Path(__file__).resolve().parent / "csrc" / "batch.c"
CFLAGS: tuple[str, ...] = ("-O2", "-std=gnu11", "-shared", "-fPIC", "-fno-strict-aliasing",
                           "-Wall", "-Wextra", "-Werror")
ENV = "VMIKIT_BATCH_KERNEL"  # "python": the numpy path only; anything else (or unset): C
ABI = 2  # VMK_ABI in batch.c

# struct vmk_ctx, field by field (each 8 bytes); the loader checks the count against the C side.
FIELDS = ("abi", "regions", "nregions", "scratch", "scratch_words", "where", "where_cap", "entry_words",
          "keys", "nkeys", "fast_level", "fast_facts", "nfast", "verdicts", "ad_bits", "nverdicts",
          "refs", "nrefs", "writable4", "nw4", "writable2", "nw2", "writable1", "nw1", "limit",
          "shadow", "shadow_words", "shadow_base", "shadow_slot", "shadow_of", "nshadow_of", "guest_of", "nguest_of",
          "stale", "stale_cap", "nstale", "everything", "call_id")
_AT = {name: k for k, name in enumerate(FIELDS)}
NSTALE, EVERYTHING_AT, CALL_ID = _AT["nstale"], _AT["everything"], _AT["call_id"]


def enabled_by_default() -> bool:
    return os.environ.get(ENV, "c").strip().lower() != "python"


def default_cache_dir() -> Path:
    return cache_dir("batch")


def _digest(source: str, gcc: str) -> str:
    h = hashlib.sha256()
    for label, data in (("source", source), ("cflags", "\0".join(CFLAGS)), ("gcc", tool_version(gcc))):
        raw = data.encode()
        h.update(label.encode() + b"\0" + len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def build(cache_dir: Path | None = None, source_path: Path = SOURCE) -> Path:
    """The path of the built shared object (built now if the cache has none for this source)."""
    gcc = find_tool("gcc", "build the FlushQueue batch kernel")
    try:
        source = source_path.read_text()
    except OSError as err:  # an install without the package's C sources
        raise HostError(f"cannot read the FlushQueue batch kernel's source {source_path} ({err.strerror or err})",
                        f"reinstall vmikit with its sources (pip install -e .), or set {ENV}=python") from None
    digest = _digest(source, gcc)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / digest
    so = final / "batch.so"
    try:
        if so.is_file():
            return so
        make_dirs(root, root)
        workdir = Path(tempfile.mkdtemp(prefix=".build-batch-", dir=root))
    except OSError as err:
        raise cache_error("batch kernel", root, err) from None
    try:
        (workdir / "batch.c").write_text(source)
        cmd = [gcc, *CFLAGS, "batch.c", "-o", "batch.so"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
        if proc.returncode != 0:
            log = root / "logs" / f"batch-{digest[:16]}.log"
            make_dirs(log.parent, root)
            log.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
            raise HostError(f"building the FlushQueue batch kernel failed: {first_error(proc.stdout + proc.stderr)}",
                            f"full log in {log}; or set {ENV}=python")
        publish(workdir, final, so)
    except OSError as err:
        raise cache_error("batch kernel", root, err) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return so


@functools.cache
def load(path: Path | None = None) -> ctypes.CDLL:
    """The loaded kernel (built first if needed), its layout checked against ``FIELDS``."""
    lib = ctypes.CDLL(str(path or build()))
    lib.vmk_ctx_words.restype = lib.vmk_abi.restype = ctypes.c_uint64
    lib.vmk_ctx_words.argtypes = lib.vmk_abi.argtypes = ()
    if lib.vmk_abi() != ABI or lib.vmk_ctx_words() != len(FIELDS):
        raise HostError("the FlushQueue batch kernel does not match vmikit's view of it",
                        "this is a vmikit bug; please report it (or set VMIKIT_BATCH_KERNEL=python)")
    lib.vmk_flush.restype = ctypes.c_int64
    lib.vmk_flush.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)
    return lib


@dataclass
class ShadowArrays:
    """What the kernel needs of shadow paging (ShadowMmu's own arrays and shadow area)."""

    host: int  # the shadow area's host address
    words: int  # its size in 8-byte words
    base: int  # its guest-physical address
    slot: np.ndarray  # int64, per guest frame (+1): its shadow page's first word in the area
    shadow_of: np.ndarray  # uint64, per guest frame: its shadow page
    guest_of: np.ndarray  # uint64, per shadow page: the guest table


def _ptr(a: np.ndarray, dtype: type) -> int:
    """The address of an array the kernel reads or writes in place (never a copy)."""
    if a.dtype != np.dtype(dtype) or not a.flags.c_contiguous or not a.flags.writeable or not len(a):
        raise ValueError(f"batch kernel: an array of {a.dtype} (want contiguous {np.dtype(dtype)})")
    return int(a.ctypes.data)


class BatchKernel:
    """One PageTables' (and shadow's) context for ``vmk_flush``. The arrays it points at are the
    VMM's own, changed in place by registration and release; a reference to each is kept."""

    def __init__(self, tables: PageTables, entry_words: int, shadow: ShadowArrays | None = None,
                 lib: ctypes.CDLL | None = None) -> None:
        self._lib = lib or load()
        self._flush = self._lib.vmk_flush
        self.tables = tables
        self._ctx = (ctypes.c_uint64 * len(FIELDS))()
        self._addr = ctypes.addressof(self._ctx)
        self._keys_of: object = None  # the keys array the context holds (hypervisor.queueable_keys())
        regions = [r for r in tables.memory.regions]
        self._regions = (ctypes.c_uint64 * (4 * len(regions)))(
            *[v for r in regions for v in (r.gpa, r.end, r.host_addr, int(r.kind == "ram"))])
        self._scratch = np.zeros(BATCH_MAX_ENTRIES * entry_words, np.int64)
        self._where = np.zeros(BATCH_MAX_ENTRIES, np.uint64)
        self._stale = np.zeros(2 * BATCH_MAX_ENTRIES, np.uint64)
        self._keys = (ctypes.c_uint64 * 1)()
        w = tables._writable  # the counts themselves, not the folding properties
        fields: dict[str, int] = {
            "abi": ABI, "regions": ctypes.addressof(self._regions), "nregions": len(regions),
            "scratch": _ptr(self._scratch, np.int64), "scratch_words": len(self._scratch),
            "where": _ptr(self._where, np.uint64), "where_cap": len(self._where), "entry_words": entry_words,
            "keys": ctypes.addressof(self._keys), "nkeys": 0,
            "fast_level": _ptr(tables.fast_level, np.int64), "fast_facts": _ptr(tables.fast_facts, np.int64),
            "nfast": min(len(tables.fast_level), len(tables.fast_facts)),
            "verdicts": _ptr(tables._verdicts, np.int8), "ad_bits": _ptr(tables._ad_bits, np.int64),
            "nverdicts": min(len(tables._verdicts), len(tables._ad_bits)),
            "refs": _ptr(tables._refs, np.int32), "nrefs": len(tables._refs),
            "writable4": _ptr(w[PAGE], np.int32), "nw4": len(w[PAGE]),
            "writable2": _ptr(w[MiB2], np.int32), "nw2": len(w[MiB2]),
            "writable1": _ptr(w[GiB1], np.int32), "nw1": len(w[GiB1]),
            "limit": tables.limit,
            "stale": _ptr(self._stale, np.uint64), "stale_cap": BATCH_MAX_ENTRIES,
        }
        if shadow is not None:
            if len(shadow.slot) < fields["nfast"] or not len(shadow.guest_of) or not shadow.words:
                raise ValueError("batch kernel: shadow arrays smaller than the frame tables")
            fields.update(shadow=shadow.host, shadow_words=shadow.words, shadow_base=shadow.base,
                          shadow_slot=_ptr(shadow.slot, np.int64), shadow_of=_ptr(shadow.shadow_of, np.uint64),
                          nshadow_of=len(shadow.shadow_of), guest_of=_ptr(shadow.guest_of, np.uint64),
                          nguest_of=len(shadow.guest_of))
        self._shadow = shadow  # keeps its arrays alive
        for name, value in fields.items():
            self._ctx[_AT[name]] = value

    def _set_keys(self, keys: np.ndarray) -> None:
        self._keys = (ctypes.c_uint64 * max(1, len(keys)))(*[int(k) for k in keys])
        self._ctx[_AT["keys"]] = ctypes.addressof(self._keys)
        self._ctx[_AT["nkeys"]] = len(keys)
        self._keys_of = keys

    def flush(self, keys: np.ndarray, gpa: int, count: int) -> int | None:
        """Check and apply the batch of ``count`` entries at ``gpa`` whose call IDs must be one of
        ``keys`` (annotation masked off): the call ID of its entries when applied, None when
        declined (nothing written: the general path decides)."""
        if keys is not self._keys_of:
            self._set_keys(keys)
        if self._flush(self._addr, gpa, count) <= 0:
            return None
        ctx = self._ctx
        if ctx[EVERYTHING_AT]:
            self.tables.stale.append(EVERYTHING)
        elif ctx[NSTALE]:
            pairs = self._stale[:2 * ctx[NSTALE]].tolist()
            self.tables.stale += list(zip(pairs[0::2], pairs[1::2]))
        return int(ctx[CALL_ID])

    def close(self) -> None:
        """Point the context at nothing (the regions and arrays it names may go away)."""
        self._ctx[_AT["nfast"]] = 0  # vmk_flush declines every batch from now on
        self._ctx[_AT["nregions"]] = 0
