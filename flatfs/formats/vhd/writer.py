"""The VHD target writer (``convert -O vpc``): dynamic (default) and fixed disks.

Facts from the Virtual Hard Disk Image Format Specification 1.0 that this
module relies on: big-endian numbers; a 512-byte footer at the end of the
file (a copy at offset 0 of a dynamic disk) whose checksum is the one's
complement of the sum of its bytes with the checksum field zeroed; the
1024-byte dynamic header ("cxsparse") with the same kind of checksum; the
BAT, one 32-bit sector offset per block (0xFFFFFFFF: not allocated); each
block a sector bitmap (bit set: the sector is stored here, most significant
bit first) padded to a whole sector, then the block's data; the CHS geometry
computed by the specification's algorithm (its Appendix).

The virtual size is exactly the source's (what qemu-img calls
``force_size``): ``current_size`` holds it and the geometry is only filled
in as the specification asks. Readers size a disk by ``current_size`` or by
the geometry depending on the creator application; "win " (Hyper-V's) is one
that every reader sizes by ``current_size`` (QEMU's block/vpc.c lists it),
so that is the creator recorded.

Layout of a dynamic disk: footer copy, dynamic header, BAT, then the blocks
holding data in guest order (each block's data 4 KiB aligned), then the
footer. A fixed disk is the guest's bytes at their own offsets in a sparse
file, then the footer. The footer copy at offset 0 (dynamic) is written last.
"""

from __future__ import annotations

import struct
import sys
import time
import uuid
from array import array
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from ...errors import ConvertError
from ..api import ImageWriter, OptionValue, Sink, WriterOption, block_pieces, blocks_touched
from .spec import (
    COOKIE,
    DYNAMIC,
    FEATURE_RESERVED,
    FIXED,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_SIZE,
    NO_OFFSET,
    SECTOR,
    SPARSE_COOKIE,
    VERSION,
)

BLOCK_SIZE = 2 << 20  # what Virtual PC, Hyper-V and QEMU write
BITMAP_SIZE = SECTOR  # 4096 sectors of a 2 MiB block: 512 bytes of bits
DATA_ALIGN = 4096  # each block's data starts on a file system block
CREATOR_APP = b"win "  # sized by current_size by every reader (see the module docstring)
CREATOR_VERSION = 0x000A0000
CREATOR_OS = b"Wi2k"
VHD_EPOCH = 946684800  # 2000-01-01 00:00:00 UTC, the spec's time stamps count from it
FREE = 0xFFFFFFFF

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_HEADER = struct.Struct(">8sQQIIII16sII")

OPTIONS = (
    WriterOption("subformat", "dynamic (default) or fixed", "dynamic", ("dynamic", "fixed")),
    WriterOption(
        "force_size",
        "always on: the virtual size is exactly the source's, never a CHS geometry's",
        "on",
        ("on",),
    ),
)


class VpcOptions(NamedTuple):
    subformat: str = "dynamic"

    @classmethod
    def of(cls, values: Mapping[str, OptionValue]) -> VpcOptions:
        return cls(subformat=str(values.get("subformat", "dynamic")))


def checksum(block: bytes | bytearray) -> int:
    """The one's complement of the byte sum (the checksum field must hold zeros)."""
    return ~sum(block) & 0xFFFFFFFF


def geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for ``size`` bytes: the specification's algorithm."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def footer(size: int, disk_type: int, unique_id: bytes, timestamp: int) -> bytes:
    cyl, heads, spt = geometry(size)
    data_offset = FOOTER_SIZE if disk_type != FIXED else NO_OFFSET
    fields = [COOKIE, FEATURE_RESERVED, VERSION, data_offset, timestamp, CREATOR_APP, CREATOR_VERSION]
    fields += [CREATOR_OS, size, size, cyl, heads, spt, disk_type, 0, unique_id, 0]
    raw = bytearray(FOOTER_SIZE)
    _FOOTER.pack_into(raw, 0, *fields)
    struct.pack_into(">I", raw, 64, checksum(raw))
    return bytes(raw)


def dynamic_header(table_offset: int, entries: int) -> bytes:
    raw = bytearray(HEADER_SIZE)
    _HEADER.pack_into(
        raw, 0, SPARSE_COOKIE, NO_OFFSET, table_offset, VERSION, entries, BLOCK_SIZE, 0, bytes(16), 0, 0
    )
    struct.pack_into(">I", raw, 36, checksum(raw))
    return bytes(raw)


def _check_size(size: int) -> int:
    if size > MAX_SIZE:
        raise ConvertError(f"a VHD holds at most 2040 GiB; the source is {size} bytes")
    return -(-size // SECTOR) * SECTOR


def _layout(size: int) -> tuple[int, int, int]:
    """(BAT entries, BAT offset, offset of the first block) of a dynamic disk of ``size``."""
    entries = -(-size // BLOCK_SIZE)
    table = FOOTER_SIZE + HEADER_SIZE
    bat_end = table + -(-entries * 4 // SECTOR) * SECTOR
    first = -(-(bat_end + BITMAP_SIZE) // DATA_ALIGN) * DATA_ALIGN - BITMAP_SIZE
    return entries, table, first


class VhdWriter:
    """Writes one VHD through a sink; see the module docstring for the layout."""

    def __init__(self, sink: Sink, size: int, options: VpcOptions, path: str) -> None:
        self.sink = sink
        self.path = path
        self.size = _check_size(size)
        self.fixed = options.subformat == "fixed"
        self.unique_id = uuid.uuid4().bytes
        self.timestamp = (int(time.time()) - VHD_EPOCH) & 0xFFFFFFFF
        entries, self.table, first = _layout(self.size)
        self.bat = array("I", [FREE]) * (0 if self.fixed else entries)
        self.next = first  # where the next block goes
        self.block = -1  # the guest block being filled, its host offset and its bitmap
        self.host = 0
        self.bitmap = bytearray(BITMAP_SIZE)

    def write_data(self, offset: int, data: memoryview) -> None:
        if self.fixed:
            self.sink.write([data], offset)
            return
        for b, pos, stop in block_pieces(offset, len(data), BLOCK_SIZE):
            if b != self.block:
                self._close_block()
                self.block, self.host = b, self.next
                self.bat[b] = self.host // SECTOR
                self.next += BITMAP_SIZE + BLOCK_SIZE
            within = pos - b * BLOCK_SIZE
            self.sink.write([data[pos - offset : stop - offset]], self.host + BITMAP_SIZE + within)
            self._mark(within // SECTOR, -(-(stop - b * BLOCK_SIZE) // SECTOR))

    def _mark(self, first: int, end: int) -> None:
        """Set the bitmap bits of sectors [first, end) of the current block."""
        bm = self.bitmap
        while first < end and first % 8:
            bm[first // 8] |= 0x80 >> (first % 8)
            first += 1
        whole = (end - first) // 8
        if whole > 0:
            bm[first // 8 : first // 8 + whole] = b"\xff" * whole
            first += whole * 8
        while first < end:
            bm[first // 8] |= 0x80 >> (first % 8)
            first += 1

    def _close_block(self) -> None:
        if self.block >= 0:
            self.sink.write([memoryview(self.bitmap)], self.host)
            self.bitmap = bytearray(BITMAP_SIZE)
            self.block = -1

    def finish(self) -> int:
        if self.fixed:
            self.sink.write([memoryview(self._footer())], self.size)
            return self.size + FOOTER_SIZE
        self._close_block()
        foot = memoryview(self._footer())
        bat = array("I", self.bat)
        if sys.byteorder == "little":
            bat.byteswap()
        pad = bytes(-len(bat) * 4 % SECTOR)
        self.sink.write([memoryview(bat).cast("B"), memoryview(pad)], self.table)
        self.sink.write([foot], self.next)
        self.sink.write([memoryview(dynamic_header(self.table, len(self.bat)))], FOOTER_SIZE)
        self.sink.write([foot], 0)  # last: until now the file is plainly not a VHD
        return self.next + FOOTER_SIZE

    def _footer(self) -> bytes:
        return footer(self.size, FIXED if self.fixed else DYNAMIC, self.unique_id, self.timestamp)


def open_writer(sink: Sink, size: int, values: Mapping[str, OptionValue], path: str) -> ImageWriter:
    return VhdWriter(sink, size, VpcOptions.of(values), path)


def measure(
    size: int, data_runs: Iterable[tuple[int, int]], values: Mapping[str, OptionValue]
) -> tuple[int, int]:
    """(required, fully allocated) file sizes: every block touching a data run is allocated."""
    size = _check_size(size)
    if VpcOptions.of(values).subformat == "fixed":
        return size + FOOTER_SIZE, size + FOOTER_SIZE
    entries, _table, first = _layout(size)
    blocks = blocks_touched(data_runs, BLOCK_SIZE, size)
    per = BITMAP_SIZE + BLOCK_SIZE
    return first + blocks * per + FOOTER_SIZE, first + entries * per + FOOTER_SIZE


__all__ = ["OPTIONS", "VhdWriter", "VpcOptions", "measure", "open_writer", "geometry"]
