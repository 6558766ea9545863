"""The VDI target writer (``convert -O vdi``): dynamic (default) and static VirtualBox images.

Facts from VirtualBox's VDICore.h (the layout ``spec.py`` reads) this module
relies on: little-endian numbers; the 64-byte text pre-header, the signature
at 64 and version 1.1 at 68; the version 1.1 header (VDIHEADER1PLUS, 0x190
bytes) from 72: image type (1 dynamic, 2 static), flags, description, the
block map's and the data area's offsets, the legacy geometry (its sector
size 512), the disk size, 1 MiB blocks with no extra data, the number of
blocks and of allocated blocks, the create / modify / linkage / parent
modify UUIDs, the LCHS geometry (zeros: "let the guest decide"); a block map
of one u32 per block, a block's index in the data area or 0xFFFFFFFF (free:
zeros in an image without a parent). VirtualBox aligns the block map and the
data area to 1 MiB (VDI_DATA_ALIGN); so does this writer.

A dynamic image stores only the blocks holding data, in guest order; a
static one has every block at its place in a sparse file. The header, with
a fresh creation UUID, is written last.
"""

from __future__ import annotations

import struct
import sys
import uuid
from array import array
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from ...errors import ConvertError
from ..api import ImageWriter, OptionValue, Sink, WriterOption, block_pieces, blocks_touched
from .spec import (
    BLOCK_FREE,
    BLOCK_SIZE,
    HEADER1PLUS_SIZE,
    MAX_BLOCKS,
    SECTOR_SIZE,
    SIGNATURE,
    TYPE_DYNAMIC,
    TYPE_STATIC,
    VERSION_1_1,
)

ALIGN = 1 << 20  # VDI_DATA_ALIGN
PRE_HEADER = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
BMAP_OFFSET = ALIGN

OPTIONS = (WriterOption("subformat", "dynamic (default) or static", "dynamic", ("dynamic", "static")),)

# from offset 64: signature, version, header size, type, flags, description (256), offBlocks,
# offData, legacy C/H/S/sector size, unused, disk size, block size, block extra, blocks,
# blocks allocated, 4 UUIDs, LCHS C/H/S/sector size
_HEADER = struct.Struct("<IIIII256sIIIIIIIQIIII16s16s16s16sIIII")


class VdiOptions(NamedTuple):
    subformat: str = "dynamic"

    @classmethod
    def of(cls, values: Mapping[str, OptionValue]) -> VdiOptions:
        return cls(subformat=str(values.get("subformat", "dynamic")))


def _layout(size: int) -> tuple[int, int, int]:
    """(virtual size in whole sectors, blocks, offset of the data area)."""
    size = -(-size // SECTOR_SIZE) * SECTOR_SIZE
    blocks = -(-size // BLOCK_SIZE)
    if blocks > MAX_BLOCKS:
        raise ConvertError(f"a VDI holds at most {MAX_BLOCKS} blocks of 1 MiB; the source is {size} bytes")
    data = BMAP_OFFSET + -(-blocks * 4 // ALIGN) * ALIGN if blocks else BMAP_OFFSET + ALIGN
    return size, blocks, data


class VdiWriter:
    def __init__(self, sink: Sink, size: int, options: VdiOptions, path: str) -> None:
        self.sink = sink
        self.size, self.blocks, self.data = _layout(size)
        self.static = options.subformat == "static"
        if self.static:
            self.bmap = array("I", range(self.blocks))
            self.allocated = self.blocks
        else:
            self.bmap = array("I", [BLOCK_FREE]) * self.blocks
            self.allocated = 0
        self.block = -1
        self.host = 0

    def write_data(self, offset: int, data: memoryview) -> None:
        if self.static:
            self.sink.write([data], self.data + offset)
            return
        for b, pos, stop in block_pieces(offset, len(data), BLOCK_SIZE):
            if b != self.block:
                self.block = b
                self.bmap[b] = self.allocated
                self.host = self.data + self.allocated * BLOCK_SIZE
                self.allocated += 1
            self.sink.write([data[pos - offset : stop - offset]], self.host + pos - b * BLOCK_SIZE)

    def finish(self) -> int:
        bmap = array("I", self.bmap)
        if sys.byteorder == "big":
            bmap.byteswap()
        self.sink.write([memoryview(bmap).cast("B")], BMAP_OFFSET)
        self.sink.write([memoryview(self._header())], 0)  # last: until now, plainly not a VDI
        return self.data + self.allocated * BLOCK_SIZE

    def _header(self) -> bytearray:
        buf = bytearray(SECTOR_SIZE)
        buf[: len(PRE_HEADER)] = PRE_HEADER
        _HEADER.pack_into(
            buf,
            64,
            SIGNATURE,
            VERSION_1_1,
            HEADER1PLUS_SIZE,
            TYPE_STATIC if self.static else TYPE_DYNAMIC,
            0,
            b"",
            BMAP_OFFSET,
            self.data,
            0,
            0,
            0,
            SECTOR_SIZE,
            0,
            self.size,
            BLOCK_SIZE,
            0,
            self.blocks,
            self.allocated,
            uuid.uuid4().bytes_le,
            uuid.uuid4().bytes_le,
            bytes(16),
            bytes(16),
            0,
            0,
            0,
            SECTOR_SIZE,
        )
        return buf


def open_writer(sink: Sink, size: int, values: Mapping[str, OptionValue], path: str) -> ImageWriter:
    return VdiWriter(sink, size, VdiOptions.of(values), path)


def measure(
    size: int, data_runs: Iterable[tuple[int, int]], values: Mapping[str, OptionValue]
) -> tuple[int, int]:
    """(required, fully allocated) file sizes: every 1 MiB block touching a data run is allocated."""
    size, blocks, data = _layout(size)
    full = data + blocks * BLOCK_SIZE
    if VdiOptions.of(values).subformat == "static":
        return full, full
    return data + blocks_touched(data_runs, BLOCK_SIZE, size) * BLOCK_SIZE, full
