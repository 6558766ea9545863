"""The VHDX target writer (``convert -O vhdx``): dynamic (default) and fixed disks.

Facts from the VHDX Format Specification (MS-VHDX 1.0) this module relies on:
little-endian numbers and GUIDs in their little-endian byte order; the file
type identifier ("vhdxfile", then a UTF-16 creator) at 0; two 4 KiB headers at
64 and 128 KiB and two 64 KiB region tables at 192 and 256 KiB, each with a
CRC-32C over the whole structure with its checksum field zeroed; the header
with the higher sequence number is the current one, and a zero LogGuid means
the log holds nothing to replay; the log, the metadata region and the BAT
region are 1 MiB aligned and sized in whole MiB; the metadata table (no
checksum) lists the File Parameters, Virtual Disk Size, Page 83 Data
(the virtual disk id), Logical and Physical Sector Size items, at offsets of
at least 64 KiB in the region; BAT entries are 64 bits, the state in bits
0-2 and the file offset in MiB in bits 20-63; after every ``chunk ratio``
payload entries ((2^23 x logical sector size) / block size) comes one sector
bitmap entry (NOT_PRESENT in a disk without a parent).

Layout: file identifier, headers, region tables, a 1 MiB empty log at 1 MiB,
the metadata at 2 MiB, the BAT at 3 MiB, then the payload blocks holding
data, in guest order, each FULLY_PRESENT; every other block is NOT_PRESENT
(reads zeros: the disk has no parent). A fixed disk has every block
FULLY_PRESENT at its place in a sparse file (File Parameters'
LeaveBlockAllocated set). The headers and the file identifier are written last.
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
    BAT_REGION,
    FILE_ID_SIGNATURE,
    FILE_PARAMETERS,
    HEADER_OFFSETS,
    HEADER_SIGNATURE,
    HEADER_SIZE,
    LOGICAL_SECTOR_SIZE,
    MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE,
    METADATA_REGION,
    METADATA_SIGNATURE,
    METADATA_TABLE_SIZE,
    MIN_BLOCK_SIZE,
    OFFSET_SHIFT,
    PAGE83_DATA,
    PAYLOAD_FULLY_PRESENT,
    PHYSICAL_SECTOR_SIZE,
    REGION_SIGNATURE,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    VIRTUAL_DISK_SIZE,
    crc32c,
)

MiB = 1 << 20
LOG_OFFSET, LOG_LENGTH = 1 * MiB, 1 * MiB
METADATA_OFFSET, METADATA_LENGTH = 2 * MiB, 1 * MiB
BAT_OFFSET = 3 * MiB
DEFAULT_BLOCK = 32 * MiB  # what Hyper-V makes
PHYSICAL_SECTOR = 4096
CREATOR = "flatfs"
# metadata item flags: bit 1 IsVirtualDisk, bit 2 IsRequired
REQUIRED, VIRTUAL_REQUIRED = 4, 6
LEAVE_BLOCK_ALLOCATED = 1

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_REGION_HEAD = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")
_META_HEAD = struct.Struct("<8sHH20s")
_META_ENTRY = struct.Struct("<16sIIII")

OPTIONS = (
    WriterOption("subformat", "dynamic (default) or fixed", "dynamic", ("dynamic", "fixed")),
    WriterOption(
        "block_size", "payload block size, 1M to 256M, a power of two (default 32M)", DEFAULT_BLOCK, size=True
    ),
    WriterOption("logical_sector_size", "512 (default) or 4096 bytes", "512", ("512", "4096")),
)


class VhdxOptions(NamedTuple):
    subformat: str = "dynamic"
    block_size: int = DEFAULT_BLOCK
    logical_sector_size: int = 512

    @classmethod
    def of(cls, values: Mapping[str, OptionValue]) -> VhdxOptions:
        bs = values.get("block_size", DEFAULT_BLOCK)
        opts = cls(
            subformat=str(values.get("subformat", "dynamic")),
            block_size=bs if isinstance(bs, int) else DEFAULT_BLOCK,
            logical_sector_size=int(values.get("logical_sector_size", 512)),
        )
        b = opts.block_size
        if b < MIN_BLOCK_SIZE or b > MAX_BLOCK_SIZE or b & (b - 1):
            raise ConvertError(f"-o block_size: {b} is not a power of two from 1M to 256M")
        return opts


def check(values: Mapping[str, OptionValue]) -> None:
    VhdxOptions.of(values)


class Geometry(NamedTuple):
    size: int  # virtual size, a whole number of logical sectors
    payload: int  # payload blocks
    ratio: int  # chunk ratio
    entries: int  # BAT entries
    data_start: int  # first payload block's offset


def geometry(size: int, o: VhdxOptions) -> Geometry:
    lss = o.logical_sector_size
    size = -(-size // lss) * lss
    if size > MAX_VIRTUAL_SIZE:
        raise ConvertError(f"a VHDX holds at most 64 TiB; the source is {size} bytes")
    if size == 0:
        raise ConvertError("the source is empty: flatfs writes no VHDX of 0 bytes (its reader wants a size)")
    payload = -(-size // o.block_size)
    ratio = (1 << 23) * lss // o.block_size
    entries = payload + (payload - 1) // ratio if payload else 0
    data_start = BAT_OFFSET + -(-entries * 8 // MiB) * MiB if entries else BAT_OFFSET + MiB
    return Geometry(size, payload, ratio, entries, max(data_start, BAT_OFFSET + MiB))


def _crc_into(buf: bytearray) -> bytearray:
    struct.pack_into("<I", buf, 4, crc32c(buf))
    return buf


class VhdxWriter:
    def __init__(self, sink: Sink, size: int, options: VhdxOptions, path: str) -> None:
        self.sink = sink
        self.o = options
        self.g = geometry(size, options)
        self.fixed = options.subformat == "fixed"
        self.bat = array("Q", [0]) * self.g.entries
        self.next = self.g.data_start
        self.block = -1
        self.host = 0
        if self.fixed:
            for i in range(self.g.payload):
                self._set(i, self.g.data_start + i * options.block_size)

    def _set(self, block: int, host: int) -> None:
        self.bat[block + block // self.g.ratio] = PAYLOAD_FULLY_PRESENT | (host // MiB) << OFFSET_SHIFT

    def write_data(self, offset: int, data: memoryview) -> None:
        bs = self.o.block_size
        if self.fixed:
            self.sink.write([data], self.g.data_start + offset)
            return
        for b, pos, stop in block_pieces(offset, len(data), bs):
            if b != self.block:
                self.block, self.host = b, self.next
                self._set(b, self.host)
                self.next += bs
            self.sink.write([data[pos - offset : stop - offset]], self.host + pos - b * bs)

    def finish(self) -> int:
        g = self.g
        end = g.data_start + g.payload * self.o.block_size if self.fixed else self.next
        bat = array("Q", self.bat)
        if sys.byteorder == "big":
            bat.byteswap()
        self.sink.write([memoryview(bat).cast("B")], BAT_OFFSET)
        self.sink.write([memoryview(self._metadata())], METADATA_OFFSET)
        region = memoryview(self._region_table())
        for at in REGION_TABLE_OFFSETS:
            self.sink.write([region], at)
        file_write, data_write = uuid.uuid4().bytes_le, uuid.uuid4().bytes_le
        for seq, at in enumerate(HEADER_OFFSETS):
            self.sink.write([memoryview(self._header(seq, file_write, data_write))], at)
        ident = bytearray(MiB // 16)
        ident[:8] = FILE_ID_SIGNATURE
        creator = CREATOR.encode("utf-16-le")
        ident[8 : 8 + len(creator)] = creator
        self.sink.write([memoryview(ident)], 0)  # last: until now, plainly not a VHDX
        return max(end, g.data_start)

    def _header(self, seq: int, file_write: bytes, data_write: bytes) -> bytearray:
        buf = bytearray(HEADER_SIZE)
        _HEADER.pack_into(
            buf, 0, HEADER_SIGNATURE, 0, seq, file_write, data_write, bytes(16), 0, 1, LOG_LENGTH, LOG_OFFSET
        )
        return _crc_into(buf)

    def _region_table(self) -> bytearray:
        buf = bytearray(REGION_TABLE_SIZE)
        _REGION_HEAD.pack_into(buf, 0, REGION_SIGNATURE, 0, 2, 0)
        bat_len = self.g.data_start - BAT_OFFSET
        _REGION_ENTRY.pack_into(buf, 16, BAT_REGION.bytes_le, BAT_OFFSET, bat_len, 1)
        _REGION_ENTRY.pack_into(buf, 48, METADATA_REGION.bytes_le, METADATA_OFFSET, METADATA_LENGTH, 1)
        return _crc_into(buf)

    def _metadata(self) -> bytearray:
        o = self.o
        params = struct.pack("<II", o.block_size, LEAVE_BLOCK_ALLOCATED if self.fixed else 0)
        items = [
            (FILE_PARAMETERS, params, REQUIRED),
            (VIRTUAL_DISK_SIZE, struct.pack("<Q", self.g.size), VIRTUAL_REQUIRED),
            (PAGE83_DATA, uuid.uuid4().bytes_le, VIRTUAL_REQUIRED),
            (LOGICAL_SECTOR_SIZE, struct.pack("<I", o.logical_sector_size), VIRTUAL_REQUIRED),
            (PHYSICAL_SECTOR_SIZE, struct.pack("<I", PHYSICAL_SECTOR), VIRTUAL_REQUIRED),
        ]
        buf = bytearray(METADATA_TABLE_SIZE + 4096)
        _META_HEAD.pack_into(buf, 0, METADATA_SIGNATURE, 0, len(items), bytes(20))
        at = METADATA_TABLE_SIZE
        for i, (gid, value, flags) in enumerate(items):
            _META_ENTRY.pack_into(buf, 32 + 32 * i, gid.bytes_le, at, len(value), flags, 0)
            buf[at : at + len(value)] = value
            at += len(value)
        return buf


def open_writer(sink: Sink, size: int, values: Mapping[str, OptionValue], path: str) -> ImageWriter:
    return VhdxWriter(sink, size, VhdxOptions.of(values), path)


def measure(
    size: int, data_runs: Iterable[tuple[int, int]], values: Mapping[str, OptionValue]
) -> tuple[int, int]:
    """(required, fully allocated) file sizes: every block touching a data run is allocated."""
    o = VhdxOptions.of(values)
    g = geometry(size, o)
    full = g.data_start + g.payload * o.block_size
    if o.subformat == "fixed":
        return full, full
    blocks = blocks_touched(data_runs, o.block_size, g.size)
    return g.data_start + blocks * o.block_size, full
