"""VHDX on-disk structures (MS-VHDX): parse and validate. Pure: no I/O.

Every function takes the bytes of one structure and the path and file offset
it was read from (for one-line errors), and returns a validated record or
raises :class:`CorruptImage` / :class:`UnsupportedImage`. Facts are from the
MS-VHDX specification; limits that the specification does not state are
named here with their reason.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import crc32c as _crc32c

from ...errors import CorruptImage, UnsupportedImage

KiB = 1 << 10
MiB = 1 << 20
TiB = 1 << 40

FILE_ID_SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
HEADER_SIGNATURE = b"head"
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
REGION_SIGNATURE = b"regi"
MAX_REGION_ENTRIES = 2047
METADATA_SIGNATURE = b"metadata"
METADATA_TABLE_SIZE = 64 * KiB
MAX_METADATA_ENTRIES = 2047
MAX_METADATA_ITEM = 1 * MiB  # spec: a metadata item is at most 1 MiB
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
MAX_VIRTUAL_SIZE = 64 * TiB  # spec: the virtual disk size is at most 64 TiB
SECTOR_BITMAP_BLOCK = 1 * MiB
LOG_SECTOR = 4 * KiB

# Region GUIDs
BAT_REGION = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
# Metadata item GUIDs
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
ITEM_NAMES = {
    FILE_PARAMETERS: "File Parameters",
    VIRTUAL_DISK_SIZE: "Virtual Disk Size",
    PAGE83_DATA: "Page 83 Data",
    LOGICAL_SECTOR_SIZE: "Logical Sector Size",
    PHYSICAL_SECTOR_SIZE: "Physical Sector Size",
    PARENT_LOCATOR: "Parent Locator",
}
# The parent locator keys flatfs uses, and the order in which the spec says to try the paths
PARENT_PATH_KEYS = ("relative_path", "volume_path", "absolute_win32_path")
MAX_LOCATOR_ENTRIES = 256  # a locator has a handful of keys; more is hostile

# BAT entry states
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
SB_NOT_PRESENT = 0
SB_PRESENT = 6
STATE_MASK = 0x7
OFFSET_SHIFT = 20  # FileOffsetMB lives in bits 20..63


# -- CRC-32C (Castagnoli), reflected polynomial 0x82F63B78 --------------------------
# In C (the crc32c package: SSE4.2/ARMv8 instructions, a table-driven C routine elsewhere):
# a damaged log is searched within a budget of a few times its length, which a per-byte
# Python loop (about 10 MB/s) could not do in time for a log of 256 MiB.


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``crc`` (0 to start)."""
    return int(_crc32c.crc32c(data, crc))


def checksum_ok(buf: bytes | bytearray | memoryview, at: int = 4) -> bool:
    """Does the CRC-32C at ``buf[at:at+4]`` match ``buf`` with that field zeroed? (No copy.)"""
    view = memoryview(buf)
    stored = int.from_bytes(view[at : at + 4], "little")
    return crc32c(view[at + 4 :], crc32c(b"\0\0\0\0", crc32c(view[:at]))) == stored


def guid(raw: bytes) -> uuid.UUID:
    """A GUID as stored on disk (Windows' mixed-endian layout)."""
    return uuid.UUID(bytes_le=bytes(raw))


# -- headers -----------------------------------------------------------------------

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


@dataclass(frozen=True, slots=True)
class Header:
    at: int
    sequence: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_length: int
    log_offset: int


def parse_header(buf: bytes, at: int) -> Header | str:
    """One of the two headers, or the reason it is not valid (the other may be)."""
    if len(buf) < HEADER_SIZE:
        return "header lies past the end of the file"
    sig, _, seq, fw, dw, lg, log_version, version, log_length, log_offset = _HEADER.unpack_from(buf)
    if sig != HEADER_SIGNATURE:
        return "no header signature"
    if not checksum_ok(buf[:HEADER_SIZE]):
        return "header checksum mismatch"
    if version != 1:
        return f"header version {version} is not 1"
    if log_version != 0:
        return f"log version {log_version} is not 0"
    return Header(at, seq, guid(fw), guid(dw), guid(lg), log_length, log_offset)


def current_header(path: str, first: bytes, second: bytes, file_size: int) -> Header:
    """The current header: the valid one with the larger sequence number."""
    a = parse_header(first, HEADER_OFFSETS[0])
    b = parse_header(second, HEADER_OFFSETS[1])
    if isinstance(a, str) and isinstance(b, str):
        raise CorruptImage(path, f"no valid header: {a}; second header: {b}", HEADER_OFFSETS[0])
    if isinstance(a, str):
        h = b
    elif isinstance(b, str):
        h = a
    elif a.sequence == b.sequence and a != Header(a.at, *_fields(b)):
        raise CorruptImage(path, "both headers have the same sequence number but differ", HEADER_OFFSETS[1])
    else:
        h = a if a.sequence >= b.sequence else b
    assert not isinstance(h, str)
    if h.log_offset % MiB or h.log_length % MiB:
        raise CorruptImage(path, "log offset or length is not a multiple of 1 MiB", h.at + 64)
    if h.log_length and (h.log_offset < MiB or h.log_offset + h.log_length > file_size):
        raise CorruptImage(
            path,
            f"log at 0x{h.log_offset:x} (+0x{h.log_length:x}) lies outside the file or over its headers",
            h.at + 64,
        )
    return h


def _fields(h: Header) -> tuple[int, uuid.UUID, uuid.UUID, uuid.UUID, int, int]:
    return (h.sequence, h.file_write_guid, h.data_write_guid, h.log_guid, h.log_length, h.log_offset)


# -- region table ------------------------------------------------------------------

_REGION_HEAD = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")


@dataclass(frozen=True, slots=True)
class Regions:
    at: int
    bat_offset: int
    bat_length: int
    metadata_offset: int
    metadata_length: int


def parse_region_table(path: str, buf: bytes, at: int, file_size: int, log: tuple[int, int]) -> Regions:
    """A region table: signature, CRC-32C, entries; BAT and metadata must be there."""
    if len(buf) < REGION_TABLE_SIZE:
        raise CorruptImage(path, "region table lies past the end of the file", at)
    sig, _, count, _ = _REGION_HEAD.unpack_from(buf)
    if sig != REGION_SIGNATURE:
        raise CorruptImage(path, "no region table signature", at)
    if not checksum_ok(buf[:REGION_TABLE_SIZE]):
        raise CorruptImage(path, "region table checksum mismatch", at)
    if count > MAX_REGION_ENTRIES:
        raise CorruptImage(path, f"region table has {count} entries (at most {MAX_REGION_ENTRIES})", at + 8)
    found: dict[uuid.UUID, tuple[int, int]] = {}
    spans: list[tuple[int, int, int]] = []
    if log[1]:
        spans.append((log[0], log[0] + log[1], -1))
    for i in range(count):
        where = at + 16 + 32 * i
        g, off, length, flags = _REGION_ENTRY.unpack_from(buf, 16 + 32 * i)
        gid = guid(g)
        if gid in found:
            raise CorruptImage(path, f"region {gid} appears twice in the region table", where)
        if gid not in (BAT_REGION, METADATA_REGION):
            if flags & 1:
                raise UnsupportedImage(path, f"unknown required region {gid}", where)
            continue
        if off % MiB or length % MiB or off < MiB or length == 0:
            raise CorruptImage(path, f"region {gid} has a bad offset 0x{off:x} or length 0x{length:x}", where)
        if off + length > file_size:
            raise CorruptImage(path, f"region {gid} at 0x{off:x} lies past the end of the file", where)
        for s, e, _j in spans:
            if off < e and s < off + length:
                raise CorruptImage(path, f"region {gid} overlaps another region or the log", where)
        spans.append((off, off + length, i))
        found[gid] = (off, length)
    for need, name in ((BAT_REGION, "BAT"), (METADATA_REGION, "metadata")):
        if need not in found:
            raise CorruptImage(path, f"region table has no {name} region", at)
    return Regions(at, *found[BAT_REGION], *found[METADATA_REGION])


# -- metadata ----------------------------------------------------------------------

_META_HEAD = struct.Struct("<8sHH20s")
_META_ENTRY = struct.Struct("<16sIIII")


@dataclass(frozen=True, slots=True)
class Item:
    id: uuid.UUID
    offset: int  # from the start of the metadata region
    length: int
    flags: int
    at: int  # where its table entry is, for errors


def parse_metadata_table(path: str, buf: bytes, at: int, region_length: int) -> dict[uuid.UUID, Item]:
    """The metadata table: signature, entries; unknown required items refused."""
    sig, _, count, _ = _META_HEAD.unpack_from(buf)
    if sig != METADATA_SIGNATURE:
        raise CorruptImage(path, "no metadata table signature", at)
    if count > MAX_METADATA_ENTRIES:
        raise CorruptImage(path, f"metadata table has {count} entries (at most {MAX_METADATA_ENTRIES})", at)
    items: dict[uuid.UUID, Item] = {}
    seen: set[tuple[uuid.UUID, bool]] = set()
    for i in range(count):
        where = at + 32 + 32 * i
        g, off, length, flags, _ = _META_ENTRY.unpack_from(buf, 32 + 32 * i)
        gid = guid(g)
        is_user = bool(flags & 1)
        if (gid, is_user) in seen:
            raise CorruptImage(path, f"metadata item {gid} appears twice", where)
        seen.add((gid, is_user))
        if length:
            if length > MAX_METADATA_ITEM or off < METADATA_TABLE_SIZE or off + length > region_length:
                raise CorruptImage(
                    path, f"metadata item {gid} at 0x{off:x} (+0x{length:x}) lies outside its region", where
                )
        elif off:
            raise CorruptImage(path, f"metadata item {gid} has no length but an offset", where)
        if is_user or gid not in ITEM_NAMES:
            if flags & 4:
                raise UnsupportedImage(path, f"unknown required metadata item {gid}", where)
            continue
        items[gid] = Item(gid, off, length, flags, where)
    return items


@dataclass(slots=True)
class Metadata:
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    logical_sector: int
    physical_sector: int
    page83: uuid.UUID | None
    locator: dict[str, str] = field(default_factory=dict)

    @property
    def chunk_ratio(self) -> int:
        """Payload blocks per sector bitmap block."""
        return (1 << 23) * self.logical_sector // self.block_size

    @property
    def data_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def bat_entries(self) -> int:
        """Entries the BAT must hold (MS-VHDX 2.5: differs with and without a parent)."""
        chunks = -(-self.data_blocks // self.chunk_ratio)
        if self.has_parent:
            return chunks * (self.chunk_ratio + 1)
        return self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio if self.data_blocks else 0


def _need(path: str, items: dict[uuid.UUID, Item], gid: uuid.UUID, size: int, at: int) -> Item:
    item = items.get(gid)
    if item is None:
        raise CorruptImage(path, f"metadata has no {ITEM_NAMES[gid]} item", at)
    if item.length < size:
        raise CorruptImage(path, f"{ITEM_NAMES[gid]} item is {item.length} bytes, not {size}", item.at)
    return item


def parse_metadata(
    path: str, items: dict[uuid.UUID, Item], read: Callable[[Item], bytes], at: int
) -> Metadata:
    """The known metadata items, validated. ``read(item)`` returns an item's bytes."""
    fp = _need(path, items, FILE_PARAMETERS, 8, at)
    block_size, flags = struct.unpack_from("<II", read(fp))
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise CorruptImage(path, f"block size {block_size} is not a power of two in 1 MiB..256 MiB", fp.at)
    ls_item = _need(path, items, LOGICAL_SECTOR_SIZE, 4, at)
    logical = int.from_bytes(read(ls_item)[:4], "little")
    if logical not in (512, 4096):
        raise CorruptImage(path, f"logical sector size {logical} is not 512 or 4096", ls_item.at)
    ps_item = _need(path, items, PHYSICAL_SECTOR_SIZE, 4, at)
    physical = int.from_bytes(read(ps_item)[:4], "little")
    if physical not in (512, 4096):
        raise CorruptImage(path, f"physical sector size {physical} is not 512 or 4096", ps_item.at)
    vs_item = _need(path, items, VIRTUAL_DISK_SIZE, 8, at)
    size = int.from_bytes(read(vs_item)[:8], "little")
    if size == 0 or size > MAX_VIRTUAL_SIZE or size % logical:
        raise CorruptImage(
            path, f"virtual disk size {size} is not a multiple of {logical} up to 64 TiB", vs_item.at
        )
    page83 = None
    p83 = items.get(PAGE83_DATA)
    if p83 is not None and p83.length >= 16:
        page83 = guid(read(p83)[:16])
    md = Metadata(block_size, bool(flags & 1), bool(flags & 2), size, logical, physical, page83)
    if md.has_parent:
        loc = items.get(PARENT_LOCATOR)
        if loc is None or loc.length == 0:
            raise CorruptImage(path, "differencing disk has no Parent Locator item", at)
        md.locator = parse_locator(path, read(loc), loc.at)
    return md


_LOC_HEAD = struct.Struct("<16sHH")
_LOC_ENTRY = struct.Struct("<IIHH")


def parse_locator(path: str, buf: bytes, at: int) -> dict[str, str]:
    """The VHDX parent locator: key/value pairs in UTF-16LE."""
    if len(buf) < _LOC_HEAD.size:
        raise CorruptImage(path, "parent locator is too short", at)
    ltype, _, count = _LOC_HEAD.unpack_from(buf)
    if guid(ltype) != VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedImage(path, f"parent locator type {guid(ltype)} is not the VHDX one", at)
    if count > MAX_LOCATOR_ENTRIES or _LOC_HEAD.size + count * _LOC_ENTRY.size > len(buf):
        raise CorruptImage(path, f"parent locator claims {count} entries, more than it holds", at)
    out: dict[str, str] = {}
    for i in range(count):
        koff, voff, klen, vlen = _LOC_ENTRY.unpack_from(buf, _LOC_HEAD.size + i * _LOC_ENTRY.size)
        texts = []
        for off, n in ((koff, klen), (voff, vlen)):
            if n == 0 or n % 2 or off + n > len(buf) or off < _LOC_HEAD.size + count * _LOC_ENTRY.size:
                raise CorruptImage(path, f"parent locator entry {i} has a bad key or value range", at)
            try:
                texts.append(bytes(buf[off : off + n]).decode("utf-16-le"))
            except UnicodeDecodeError:
                raise CorruptImage(path, f"parent locator entry {i} is not valid UTF-16", at) from None
        key, value = texts
        if key in out:
            raise CorruptImage(path, f"parent locator entry {i}: its key appears twice", at)
        out[key] = value
    if "parent_linkage" not in out:
        raise CorruptImage(path, "parent locator has no parent_linkage", at)
    for k in ("parent_linkage", "parent_linkage2"):
        if k in out:
            try:
                if not out[k].isascii():  # int() would take Unicode digits
                    raise ValueError
                uuid.UUID(out[k])
            except ValueError:
                raise CorruptImage(path, f"parent locator {k} is not a GUID", at) from None
    if not any(out.get(k) for k in PARENT_PATH_KEYS):
        raise CorruptImage(path, "parent locator names no parent path", at)
    return out


def linkage(value: str) -> str:
    """A GUID in the locator's spelling ("{xxxxxxxx-...}"), normalised for comparison."""
    return "{" + str(uuid.UUID(value)).upper() + "}"
