"""The ESXi vmfsSparse extent (``COWD``, the ``-delta.vmdk`` of a snapshot on VMFS 5).

Layout (VMware Virtual Disk Format 5.0, "ESX Server Sparse Extent"; libvmdk's
format notes), little-endian, a header of 2048 bytes::

    0     magic "COWD"          4    version (1)      8   flags
    12    capacity (sectors)    16   grain (sectors)  20  GD sector
    24    GD entries            28   next free sector
    32    root: cylinders, heads, sectors | child: parent file name[1024],
          parent generation (at 1056)
    1060  generation            1064 name[60]         1124 description[512]
    1636  saved generation      1648 unclean shutdown

The grain directory holds the sector of each grain table (0: none); a grain
table has 4096 entries, each a grain's sector (0: not here, ask the parent).
There is no zeroed-grain entry. The parent file name in the header is shown,
never followed: the descriptor's ``parentFileNameHint`` names the parent (as
for QEMU, which ignores the header's name too).
"""

from __future__ import annotations

import struct
from array import array
from typing import Any

from ...errors import CorruptImage, UnsupportedImage
from ...hostio import pread_exact
from ..api import OpenContext
from .descriptor import ExtentLine
from .grains import G_ABSENT, G_DATA, GrainExtent, GrainTable, mark_past_end, used_tables
from .sparse import MAX_GD_ENTRIES, MAX_GRAIN_SECTORS, SECTOR, decode_u32

MAGIC = b"COWD"
HEADER_SIZE = 2048
GTES = 4096  # entries per grain table, fixed
_HEAD = struct.Struct("<4sIIIIIII")
_PARENT = slice(32, 32 + 1024)
_GENERATIONS = struct.Struct("<I")


def _text(raw: bytes) -> str:
    """A NUL-terminated name from the header, or "" unless it is printable text (a root
    extent holds its geometry there instead)."""
    try:
        s = raw.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return s if s.isprintable() else ""


class CowdExtent(GrainExtent):
    """A vmfsSparse extent: header, grain directory, grain tables of 4096 sectors."""

    unit = SECTOR

    def __init__(self, path: str, fd: int, line: ExtentLine | None, ctx: OpenContext | None) -> None:
        super().__init__(path, fd)
        self.line = line
        if self.file_size < HEADER_SIZE:
            raise CorruptImage(path, "file is too small for a vmfsSparse (COWD) header", 0)
        raw = bytearray(HEADER_SIZE)
        pread_exact(fd, path, memoryview(raw), 0)
        h = bytes(raw)
        magic, version, flags, capacity, grain, gd, gd_entries, free = _HEAD.unpack_from(h)
        if magic != MAGIC:
            raise CorruptImage(path, "vmfsSparse extent has no COWD magic", 0)
        if version != 1:
            raise UnsupportedImage(path, f"vmfsSparse (COWD) version {version} is not supported", 4)
        if not 1 <= grain <= MAX_GRAIN_SECTORS:
            raise CorruptImage(path, f"grain size of {grain} sectors is invalid", 16)
        self.version, self.flags, self.free_sector = version, flags, free
        self.grain_sectors = grain
        self.grain = grain * SECTOR
        self.span = GTES * self.grain
        self.length = capacity * SECTOR
        need = -(-self.length // self.span)
        if gd_entries < need:
            raise CorruptImage(
                path, f"grain directory of {gd_entries} entries cannot cover the capacity (needs {need})", 24
            )
        if need > MAX_GD_ENTRIES:
            raise CorruptImage(path, f"grain directory of {need} entries is too large", 24)
        self.gd_offset = gd * SECTOR
        self.gd_entries = gd_entries
        if need and (gd == 0 or self.gd_offset + 4 * need > self.file_size):
            raise CorruptImage(path, f"grain directory at sector {gd} lies outside the file", 20)
        if ctx is not None:  # the chain-wide table budget, before the directory is read
            ctx.charge(path, f"a grain directory of {need} entries", 8 * need)
        gdraw = bytearray(4 * need)
        if need:
            pread_exact(fd, path, memoryview(gdraw), self.gd_offset)
        self.gd = decode_u32(bytes(gdraw))
        self.used = used_tables(path, self.gd, 4 * GTES, self.file_size, self.gd_offset)
        self.parent_name = _text(h[_PARENT])
        self.generation = _GENERATIONS.unpack_from(h, 1060)[0]
        self.saved_generation = _GENERATIONS.unpack_from(h, 1636)[0]
        self.unclean = _GENERATIONS.unpack_from(h, 1648)[0]

    def _decode(self, i: int, n: int) -> GrainTable | None:
        sector = self.gd[i]
        if not sector:
            return None
        gt = sector * SECTOR
        if gt + 4 * n > self.file_size:
            raise CorruptImage(
                self.path, f"grain table at 0x{gt:x} lies past the end of the file", self.gd_offset + 4 * i
            )
        raw = bytearray(4 * n)
        pread_exact(self.fd, self.path, memoryview(raw), gt)
        entries = decode_u32(bytes(raw))
        where = array("Q", entries)
        codes = bytes(map(bool, entries)).translate(bytes([G_ABSENT, G_DATA]) + bytes(254))
        codes = mark_past_end(where, codes, -(-self.file_size // SECTOR))
        return GrainTable(where, codes, gt, 4)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.setdefault("type", "VMFSSPARSE")
        d["filename"] = self.path
        d["cluster-size"] = self.grain
        d["version"] = self.version
        d["flags"] = self.flags
        d["grain-directory-entries"] = self.gd_entries
        d["grain-table-entries"] = GTES
        d["generation"] = self.generation
        d["saved-generation"] = self.saved_generation
        if self.parent_name:
            d["parent-file-name"] = self.parent_name
        if self.unclean:
            d["unclean-shutdown"] = True
        return d
