"""The hosted sparse extent (``KDMV``, versions 1-3): header, footer and markers. Pure: no I/O.

Layout (VMware Virtual Disk Format 5.0), little-endian, sectors of 512 bytes::

    magic "KDMV", version, flags, capacity, grainSize, descriptorOffset,
    descriptorSize, numGTEsPerGT, rgdOffset, gdOffset, overHead,
    uncleanShutdown, "\\n \\r\\n", compressAlgorithm

The grain directory (GD) holds the sector of each grain table (GT); a GT
entry is a grain's sector, 0 for "not here" and, with the zeroed-grain
flag, 1 for "reads zeros". A streamOptimized extent compresses each grain
with deflate behind a 12-byte grain marker and may keep its GD at the end
(``gdOffset`` = ~0), found through the footer: a copy of the header between
a footer marker and the end-of-stream marker in the last three sectors.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

from ...errors import CorruptImage, UnsupportedImage

MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"  # ESXi vmfsSparse
SECTOR = 512
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
MARKER = struct.Struct("<QII")  # value (lba or sectors), size, type (metadata markers only)
GRAIN_MARKER = struct.Struct("<QI")  # lba, compressed size; the data follows

FLAG_NL_TEST = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESS_NONE, COMPRESS_DEFLATE = 0, 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
NL_CHECK = b"\n \r\n"

# QEMU's limits: a grain of at most 1 GiB, at most 512 entries per grain
# table, a grain directory of at most 32 Mi entries.
MAX_GRAIN_SECTORS = 0x200000
MAX_GTES_PER_GT = 512
MAX_GD_ENTRIES = 32 * 1024 * 1024
MAX_CAPACITY = (1 << 63) // SECTOR
# The embedded descriptor is read whole; QEMU reads at most 1 MiB of it
MAX_DESCRIPTOR_SECTORS = 2048


def looks_like_sparse(head: bytes) -> bool:
    return head[:4] == MAGIC


@dataclass(frozen=True, slots=True)
class SparseHeader:
    version: int
    flags: int
    capacity: int  # sectors
    grain_sectors: int
    desc_offset: int  # sectors
    desc_size: int  # sectors
    gtes_per_gt: int
    rgd_offset: int  # sectors
    gd_offset: int  # sectors (GD_AT_END: see the footer)
    overhead: int  # sectors
    compress: int

    @property
    def grain_size(self) -> int:
        return self.grain_sectors * SECTOR

    @property
    def gt_span(self) -> int:
        """Guest bytes one grain table covers."""
        return self.gtes_per_gt * self.grain_size

    @property
    def gd_entries(self) -> int:
        return -(-self.capacity // (self.gtes_per_gt * self.grain_sectors))

    @property
    def compressed(self) -> bool:
        """Grains are deflate-compressed (QEMU goes by the algorithm field alone)."""
        return self.compress == COMPRESS_DEFLATE

    @property
    def markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def zero_grain(self) -> bool:
        """A grain table entry of 1 means a zeroed grain (otherwise it is sector 1)."""
        return bool(self.flags & FLAG_ZERO_GRAIN)

    def flag_names(self) -> list[str]:
        names = {
            FLAG_NL_TEST: "newline-test",
            FLAG_RGD: "redundant-gt",
            FLAG_ZERO_GRAIN: "zeroed-grain",
            FLAG_COMPRESSED: "compressed",
            FLAG_MARKERS: "markers",
        }
        return [n for bit, n in names.items() if self.flags & bit]


def parse_header(path: str, raw: bytes, file_size: int, at: int = 0, *, footer: bool = False) -> SparseHeader:
    """Parse and validate a sparse header (``raw`` >= 79 bytes, read at ``at``).

    With ``footer`` it is the footer's copy, whose GD offset must be real.
    The GD's position is checked against ``file_size`` unless it is at the end.
    """
    if len(raw) < HEADER.size:
        raise CorruptImage(path, "file is too small for a VMDK sparse header", at)
    (magic, version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead, _unclean, nl, algo) = (
        HEADER.unpack_from(raw)
    )
    what = "footer" if footer else "header"
    if magic != MAGIC:
        raise CorruptImage(path, f"sparse {what} has no KDMV magic", at)
    if not 1 <= version <= 3:
        raise UnsupportedImage(path, f"VMDK sparse extent version {version} is not supported", at + 4)
    if flags & FLAG_NL_TEST and nl != NL_CHECK:
        raise CorruptImage(
            path, "newline check bytes are damaged (was the file copied in text mode?)", at + 73
        )
    if algo not in (COMPRESS_NONE, COMPRESS_DEFLATE):
        raise UnsupportedImage(path, f"compression algorithm {algo} is not supported", at + 77)
    if capacity == 0 and doff:
        raise UnsupportedImage(path, "a sparse extent holding a whole descriptor is not supported", at + 12)
    if capacity >= MAX_CAPACITY:
        raise CorruptImage(path, f"capacity of {capacity} sectors is too large", at + 12)
    if not 1 <= grain <= MAX_GRAIN_SECTORS:
        raise CorruptImage(path, f"grain size of {grain} sectors is invalid", at + 20)
    if not 1 <= gtes <= MAX_GTES_PER_GT:
        raise CorruptImage(path, f"{gtes} entries per grain table is invalid (1 to 512)", at + 44)
    hdr = SparseHeader(version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead, algo)
    if hdr.gd_entries > MAX_GD_ENTRIES:
        raise CorruptImage(path, f"grain directory of {hdr.gd_entries} entries is too large", at + 20)
    if dsize > MAX_DESCRIPTOR_SECTORS:
        raise CorruptImage(path, f"embedded descriptor of {dsize} sectors is too large", at + 36)
    if dsize and (doff > file_size // SECTOR or doff + dsize > -(-file_size // SECTOR)):
        raise CorruptImage(path, "embedded descriptor lies past the end of the file", at + 28)
    if overhead > -(-file_size // SECTOR):
        raise CorruptImage(
            path, f"file is truncated: the header says its grains start at 0x{overhead * SECTOR:x}", at + 64
        )
    if gd == GD_AT_END:
        if footer:
            raise CorruptImage(path, "footer says the grain directory is at the end", at + 56)
    else:
        check_gd(path, hdr, file_size, at + 56)
    return hdr


def check_gd(path: str, hdr: SparseHeader, file_size: int, at: int) -> None:
    if hdr.gd_entries and (hdr.gd_offset == 0 or hdr.gd_offset * SECTOR + hdr.gd_entries * 4 > file_size):
        raise CorruptImage(path, f"grain directory at sector {hdr.gd_offset} lies outside the file", at)


def parse_footer(path: str, raw: bytes, file_size: int, at: int) -> SparseHeader:
    """The footer of a streamOptimized extent: ``raw`` is its last 1536 bytes, read at ``at``."""
    if len(raw) != 3 * SECTOR:
        raise CorruptImage(path, "file is too small for a streamOptimized footer", at)
    _, fsize, ftype = MARKER.unpack_from(raw, 0)
    if fsize != 0 or ftype != MARKER_FOOTER:
        raise CorruptImage(path, "no footer marker before the footer", at)
    eval_, esize, etype = MARKER.unpack_from(raw, 2 * SECTOR)
    if eval_ != 0 or esize != 0 or etype != MARKER_EOS:
        raise CorruptImage(path, "no end-of-stream marker after the footer", at + 2 * SECTOR)
    return parse_header(path, raw[SECTOR : 2 * SECTOR], file_size, at + SECTOR, footer=True)


def decode_u32(raw: bytes) -> array[int]:
    """Little-endian 32-bit entries (a GD or a GT) in one pass."""
    a = array("I")
    if a.itemsize != 4:  # pragma: no cover - every platform we run on has a 4-byte "I"
        a = array("L")
    a.frombytes(raw)
    import sys

    if sys.byteorder == "big":  # pragma: no cover
        a.byteswap()
    return a
