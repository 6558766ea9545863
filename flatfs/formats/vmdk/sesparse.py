"""The ESXi seSparse extent (the ``-sesparse.vmdk`` of a snapshot on VMFS 6).

Layout (what QEMU's reader shows of the format; no public specification),
little-endian 64-bit fields, in sectors of 512 bytes. The constant header
(sector 0)::

    magic 0xcafebabe, version (major << 32 | minor: 2.1), capacity,
    grain size (8), grain table size (64), flags (0), 4 reserved (0),
    then offset and size of: the volatile header, the journal header, the
    journal, the grain directory, the grain tables, the free bitmap, the
    back map, the grains.

The volatile header (magic 0xcafecafe, free GT number, next transaction,
replay-journal flag). A set replay-journal flag means the journal holds
writes not yet applied: QEMU refuses such a disk and so does flatfs.

A grain directory entry is 0 (no table: the parent's data) or
``0x1000000000000000 | n``: grain table ``n`` of the grain-table area. A grain
table entry's top nibble is its type: 0 unallocated (the whole entry 0), 1
SCSI-unmapped and 2 zero (both read zeros, the parent is not asked), 3
allocated, whose grain number is bits 48-59 (the low 12 bits) and bits 0-47
(the high ones) of the entry. Every other form is refused where it is read.
"""

from __future__ import annotations

import operator
import struct
from array import array
from typing import Any

from ...errors import CorruptImage, UnsupportedImage
from ...hostio import pread_exact
from ..api import OpenContext
from ..common import le_array
from .descriptor import ExtentLine
from .grains import G_ABSENT, G_BAD, G_DATA, G_ZERO, GrainExtent, GrainTable, mark_past_end, used_tables
from .sparse import MAX_CAPACITY, SECTOR

CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
VERSION = 0x0000000200000001  # 2.1: the one QEMU reads
GRAIN_SECTORS = 8
GT_SECTORS = 64
GTES = GT_SECTORS * SECTOR // 8  # 4096
_CONST = struct.Struct("<26Q")
_VOLATILE = struct.Struct("<4Q")
_AREAS = ("journal header", "journal", "grain directory", "grain tables", "free bitmap", "back map", "grains")
GD_ENTRY = 0x1000000000000000
# grain table entry type (top nibble) -> code; 0 is checked whole, apart
_TYPES = bytes(
    G_ABSENT if b >> 4 == 0 else G_ZERO if b >> 4 in (1, 2) else G_DATA if b >> 4 == 3 else G_BAD
    for b in range(256)
)
_LOW_NIBBLE = bytes(b & 15 for b in range(256))
MAX_AREA = 1 << 54  # sectors: any offset or size larger cannot be in a file


def magic_matches(head: bytes) -> bool:
    return len(head) >= 8 and int.from_bytes(head[:8], "little") == CONST_MAGIC


def _u64(raw: bytes | bytearray) -> array[int]:
    return le_array("Q", raw)


class SeSparseExtent(GrainExtent):
    """A seSparse extent: constant and volatile headers, grain directory, grain tables."""

    grain = GRAIN_SECTORS * SECTOR
    unit = GRAIN_SECTORS * SECTOR
    span = GTES * GRAIN_SECTORS * SECTOR

    def __init__(self, path: str, fd: int, line: ExtentLine | None, ctx: OpenContext | None) -> None:
        super().__init__(path, fd)
        self.line = line
        if self.file_size < SECTOR:
            raise CorruptImage(path, "file is too small for a seSparse header", 0)
        raw = bytearray(SECTOR)
        pread_exact(fd, path, memoryview(raw), 0)
        f = _CONST.unpack_from(raw)
        if f[0] != CONST_MAGIC:
            raise CorruptImage(path, "seSparse extent has no constant header magic", 0)
        if f[1] != VERSION:
            raise UnsupportedImage(
                path, f"seSparse version {f[1] >> 32}.{f[1] & 0xFFFFFFFF} is not supported (only 2.1)", 8
            )
        if f[2] > MAX_CAPACITY:
            raise CorruptImage(path, f"capacity of {f[2]} sectors is too large", 16)
        if f[3] != GRAIN_SECTORS:
            raise UnsupportedImage(path, f"seSparse grain of {f[3]} sectors is not supported (only 8)", 24)
        if f[4] != GT_SECTORS:
            raise UnsupportedImage(
                path, f"seSparse grain table of {f[4]} sectors is not supported (only 64)", 32
            )
        if f[5]:
            raise UnsupportedImage(path, f"seSparse flags 0x{f[5]:x} are not supported", 40)
        if any(f[6:10]):
            raise UnsupportedImage(path, "seSparse reserved header fields are set", 48)
        self.length = f[2] * SECTOR
        self._check_areas(f)
        vol_off, gd_off, gd_size, gt_off, gt_size = f[10], f[16], f[17], f[18], f[19]
        self.base = f[24] * SECTOR
        self.gd_offset = gd_off * SECTOR
        self.gt_offset = gt_off * SECTOR
        self.gt_slots = gt_size // GT_SECTORS
        self.gd_capacity = gd_size * SECTOR // 8
        need = -(-self.length // self.span)
        if need > self.gd_capacity:
            raise CorruptImage(
                path,
                f"grain directory of {self.gd_capacity} entries cannot cover the capacity (needs {need})",
                136,
            )
        if self.gd_offset + 8 * need > self.file_size:
            raise CorruptImage(path, f"grain directory at sector {gd_off} lies outside the file", 128)
        if vol_off * SECTOR + SECTOR > self.file_size:
            raise CorruptImage(path, f"volatile header at sector {vol_off} lies outside the file", 80)
        vol = bytearray(_VOLATILE.size)
        pread_exact(fd, path, memoryview(vol), vol_off * SECTOR)
        vmagic, self.free_gt, self.next_txn, replay = _VOLATILE.unpack_from(vol)
        if vmagic != VOLATILE_MAGIC:
            raise CorruptImage(path, "seSparse volatile header has no magic", vol_off * SECTOR)
        if replay:
            raise UnsupportedImage(
                path,
                "seSparse journal must be replayed (the disk was not closed cleanly); "
                "flatfs, like QEMU, does not replay it: consolidate the snapshot on ESXi",
                vol_off * SECTOR + 24,
            )
        if ctx is not None:  # the chain-wide table budget, before the directory is read
            ctx.charge(path, f"a grain directory of {need} entries", 16 * need)
        gdraw = bytearray(8 * need)
        if need:
            pread_exact(fd, path, memoryview(gdraw), self.gd_offset)
        self.gd = _u64(gdraw)
        self.used = used_tables(path, self.gd, GT_SECTORS * SECTOR, self.file_size, self.gd_offset)

    def _check_areas(self, f: tuple[int, ...]) -> None:
        """The volatile header, then each area after the one before it, none past 2^63 bytes."""
        if f[11] < 1 or f[10] < 1:
            raise CorruptImage(self.path, "seSparse volatile header is missing", 80)
        end = f[10] + f[11]
        for k, name in enumerate(_AREAS):
            off, size = f[12 + 2 * k], f[13 + 2 * k]
            if off >= MAX_AREA or size >= MAX_AREA:
                raise CorruptImage(self.path, f"seSparse {name} area is too large", 96 + 16 * k)
            if off < end:
                raise CorruptImage(
                    self.path, f"seSparse {name} area overlaps the area before it", 96 + 16 * k
                )
            end = off + size
        if f[17] < 1 or f[19] < GT_SECTORS:
            raise CorruptImage(self.path, "seSparse grain directory or grain table area is empty", 136)

    def _decode(self, i: int, n: int) -> GrainTable | None:
        e = self.gd[i]
        if not e:
            return None
        at = self.gd_offset + 8 * i
        if e >> 32 != GD_ENTRY >> 32:
            raise CorruptImage(self.path, f"grain directory entry {i} is not a grain table reference", at)
        slot = e & 0xFFFFFFFF
        if slot >= self.gt_slots:
            raise CorruptImage(
                self.path, f"grain directory entry {i} names grain table {slot} of {self.gt_slots}", at
            )
        gt = self.gt_offset + slot * GT_SECTORS * SECTOR
        if gt + 8 * n > self.file_size:
            raise CorruptImage(self.path, f"grain table at 0x{gt:x} lies past the end of the file", at)
        raw = bytearray(8 * n)
        pread_exact(self.fd, self.path, memoryview(raw), gt)
        entries = _u64(raw)
        codes = bytes(raw[7::8]).translate(_TYPES)
        # an "unallocated" entry must be 0 whole
        odd = bytes(map(operator.and_, map(bool, entries), map((G_ABSENT).__eq__, codes)))
        if any(odd):
            codes = bytes(G_BAD if o else c for c, o in zip(codes, odd))
        where = array("Q", bytes(8 * n))
        if G_DATA in codes:
            lo = bytearray(2 * n)
            lo[0::2] = raw[6::8]
            lo[1::2] = bytes(raw[7::8]).translate(_LOW_NIBBLE)
            low = le_array("H", lo)
            hi = bytearray(raw)
            hi[6::8] = bytes(n)
            hi[7::8] = bytes(n)
            is_data = map((G_DATA).__eq__, codes)
            where = array(
                "Q", map(operator.mul, map(operator.or_, map((4096).__mul__, _u64(hi)), low), is_data)
            )
            limit = max(0, -(-(self.file_size - self.base) // self.unit))
            codes = mark_past_end(where, codes, limit)
        return GrainTable(where, codes, gt, 8, entries)

    def _bad(self, t: GrainTable, k: int) -> CorruptImage:
        e = t.raw[k] if t.raw is not None else 0
        if e >> 60 == 3:
            return super()._bad(t, k)
        return CorruptImage(self.path, f"grain table entry of type {e >> 60} is invalid", t.at + 8 * k)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.setdefault("type", "SESPARSE")
        d["filename"] = self.path
        d["cluster-size"] = self.grain
        d["version"] = "2.1"
        d["grain-directory-entries"] = self.gd_capacity
        d["grain-table-entries"] = GTES
        d["grain-tables"] = self.gt_slots
        d["free-grain-table"] = self.free_gt
        return d
