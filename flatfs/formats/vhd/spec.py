"""VHD (Virtual Hard Disk Image Format Specification 1.0): the footer and the dynamic header.

Pure: bytes in, validated records out; every violation is a one-line
:class:`CorruptImage` (or :class:`UnsupportedImage`) naming the field's offset.
Every number here comes from the specification; the virtual-size rule of
fixed and dynamic disks is QEMU's (see :func:`virtual_size`).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from ...errors import CorruptImage, UnsupportedImage

FOOTER_SIZE = 512
HEADER_SIZE = 1024
SECTOR = 512
COOKIE = b"conectix"
SPARSE_COOKIE = b"cxsparse"
VERSION = 0x00010000
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
UNALLOCATED = 0xFFFFFFFF

FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
DISK_TYPES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}

FEATURE_TEMPORARY = 1
FEATURE_RESERVED = 2  # the specification says it is always set
KNOWN_FEATURES = FEATURE_TEMPORARY | FEATURE_RESERVED

# QEMU's limits (block/vpc.c): the largest CHS geometry (65535 cylinders,
# 16 heads, 255 sectors), and the largest disk it opens, 2040 GiB.
MAX_GEOMETRY_SECTORS = 65535 * 16 * 255
MAX_SECTORS = 0xFF000000
MAX_SIZE = MAX_SECTORS * SECTOR

# Sane bounds on a block: QEMU takes any power of two from one sector; real
# tools write 512 KiB or 2 MiB. Above 256 MiB a block's sector bitmap alone
# would be 64 KiB and nothing writes such disks.
MIN_BLOCK = SECTOR
MAX_BLOCK = 256 << 20
# The BAT is decoded whole at open; this bounds its memory (16M entries, 32 TiB
# of 2 MiB blocks: far beyond the 2040 GiB a VHD can hold).
MAX_BAT_BYTES = 64 << 20

# Creator applications whose images QEMU sizes by current_size; all others by
# their CHS geometry (Virtual PC's rule). "tap\0" is compared with its NUL.
SIZE_BY_CURRENT = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

# Parent locator platform codes (the spec's table)
W2RU, W2KU, WI2R, WI2K, MAC, MACX = b"W2ru", b"W2ku", b"Wi2r", b"Wi2k", b"Mac ", b"MacX"
PLATFORMS = {W2RU, W2KU, WI2R, WI2K, MAC, MACX}
# A locator holds one path: at most 32767 UTF-16 code units (Windows' limit)
MAX_LOCATOR = 65536
LOCATOR_OFFSET = 576  # in the dynamic header
LOCATORS = 8

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_HEADER = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">4sIIIQ")


def checksum(block: bytes | bytearray, at: int) -> int:
    """One's complement of the byte sum of ``block``, its 4-byte checksum field at ``at`` taken as zero."""
    total = sum(block) - sum(block[at : at + 4])
    return ~total & 0xFFFFFFFF


def looks_like_vhd(head: bytes) -> bool:
    """A footer copy at offset 0: a dynamic or differencing disk (QEMU probes the same way)."""
    return head[:8] == COOKIE


@dataclass(frozen=True, slots=True)
class Footer:
    at: int  # where in the file this footer was read
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int

    @property
    def type_name(self) -> str:
        return DISK_TYPES[self.disk_type]

    @property
    def uuid(self) -> str:
        return str(uuid.UUID(bytes=self.unique_id))

    @property
    def creator(self) -> str:
        app = self.creator_app.decode("latin-1").rstrip("\0 ")
        major, minor = self.creator_version >> 16, self.creator_version & 0xFFFF
        host = self.creator_os.decode("latin-1").rstrip("\0 ")
        return f"{app} {major}.{minor} ({host})" if host else f"{app} {major}.{minor}"

    @property
    def geometry_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors


def parse_footer(path: str, raw: bytes, at: int) -> Footer:
    """Validate one 512-byte footer read at file offset ``at``."""
    if len(raw) < FOOTER_SIZE:
        raise CorruptImage(path, "VHD footer is truncated", at)
    f = _FOOTER.unpack_from(raw)
    (cookie, features, version, data_offset, timestamp, app, app_ver, app_os) = f[:8]
    (orig, cur, cyl, heads, secs, dtype, csum, uid, saved) = f[8:]
    if cookie != COOKIE:
        raise CorruptImage(path, "no VHD footer (cookie 'conectix' missing)", at)
    if csum != checksum(raw[:FOOTER_SIZE], 64):
        raise CorruptImage(
            path, f"VHD footer checksum is 0x{csum:08x}, its bytes sum to 0x{checksum(raw, 64):08x}", at + 64
        )
    if features & ~KNOWN_FEATURES:
        raise UnsupportedImage(path, f"VHD footer has unknown feature bits 0x{features:08x}", at + 8)
    if version != VERSION:
        raise UnsupportedImage(path, f"VHD file format version 0x{version:08x} is not 1.0", at + 12)
    if dtype not in DISK_TYPES:
        raise UnsupportedImage(
            path, f"VHD disk type {dtype} is not fixed (2), dynamic (3) or differencing (4)", at + 60
        )
    if saved > 1:
        raise CorruptImage(path, f"VHD saved state is {saved}, not 0 or 1", at + 84)
    return Footer(
        at,
        features,
        version,
        data_offset,
        timestamp,
        app,
        app_ver,
        app_os,
        orig,
        cur,
        cyl,
        heads,
        secs,
        dtype,
        csum,
        uid,
        saved,
    )


def is_fixed_footer(tail: bytes, file_size: int) -> bool:
    """``tail`` (a file's last 512 bytes) is a valid footer of a fixed disk whose sizes fit the
    file: checksum, disk type 2, and the guest disk inside the bytes before it."""
    try:
        f = parse_footer("", tail, file_size - FOOTER_SIZE)
        data = file_size - FOOTER_SIZE
        return f.disk_type == FIXED and 0 < f.current_size <= data and virtual_size("", f) <= data
    except (CorruptImage, UnsupportedImage):
        return False


def virtual_size(path: str, f: Footer) -> int:
    """The guest size in bytes, by QEMU's rule.

    Virtual PC sizes a disk by its CHS geometry, Hyper-V and most other tools by
    the footer's current size (which is usually larger than the geometry). QEMU
    uses the geometry unless the creator application is one known to use the
    current size (``win ``, ``qem2``, ``d2v ``, ``CTXS``, ``tap\\0``), or the
    geometry is the largest one a VHD can record (the disk would be truncated).
    A differencing disk has no Virtual PC history: its current size. Whole
    sectors, rounding down; at most 2040 GiB.
    """
    if (
        f.disk_type == DIFFERENCING
        or f.creator_app in SIZE_BY_CURRENT
        or (f.geometry_sectors == MAX_GEOMETRY_SECTORS)
    ):
        sectors = f.current_size // SECTOR
    else:
        sectors = f.geometry_sectors
    if sectors > MAX_SECTORS:
        raise UnsupportedImage(
            path, f"VHD disk of {sectors * SECTOR} bytes is larger than 2040 GiB", f.at + 48
        )
    return sectors * SECTOR


@dataclass(frozen=True, slots=True)
class Locator:
    index: int
    platform: bytes
    space: int  # bytes reserved for it
    length: int
    offset: int

    @property
    def code(self) -> str:
        return self.platform.decode("latin-1").rstrip()


@dataclass(frozen=True, slots=True)
class DynamicHeader:
    at: int
    table_offset: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_id: bytes
    parent_timestamp: int
    parent_name: str
    locators: tuple[Locator, ...]

    @property
    def parent_uuid(self) -> str:
        return str(uuid.UUID(bytes=self.parent_id))

    @property
    def bitmap_size(self) -> int:
        """Bytes of a block's sector bitmap: one bit per sector, padded to a whole sector."""
        sectors = self.block_size // SECTOR
        return -(-sectors // (8 * SECTOR)) * SECTOR


def parse_dynamic_header(
    path: str, raw: bytes, at: int, footer: Footer, size: int, file_size: int
) -> DynamicHeader:
    """Validate the dynamic disk header read at ``at`` against the footer and the file."""
    if len(raw) < HEADER_SIZE:
        raise CorruptImage(path, "VHD dynamic disk header lies past the end of the file", at)
    h = _HEADER.unpack_from(raw)
    cookie, data_off, table_off, version, entries, block_size, csum, pid, ptime, _res, pname = h
    if cookie != SPARSE_COOKIE:
        raise CorruptImage(path, "no VHD dynamic disk header (cookie 'cxsparse' missing)", at)
    if csum != checksum(raw[:HEADER_SIZE], 36):
        raise CorruptImage(
            path,
            f"VHD dynamic disk header checksum is 0x{csum:08x}, its bytes sum to "
            f"0x{checksum(raw[:HEADER_SIZE], 36):08x}",
            at + 36,
        )
    if data_off != NO_OFFSET:
        raise CorruptImage(path, f"VHD dynamic disk header data offset is 0x{data_off:x}, not unused", at + 8)
    if version != VERSION:
        raise UnsupportedImage(path, f"VHD dynamic disk header version 0x{version:08x} is not 1.0", at + 24)
    if block_size & (block_size - 1) or not MIN_BLOCK <= block_size <= MAX_BLOCK:
        raise CorruptImage(
            path, f"VHD block size {block_size} is not a power of two from 512 bytes to 256 MiB", at + 32
        )
    need = -(-size // block_size)
    if entries < need:
        raise CorruptImage(
            path,
            f"VHD block table has {entries} entries, the disk's {size} bytes "
            f"need {need} blocks of {block_size}",
            at + 28,
        )
    if table_off % SECTOR or table_off < FOOTER_SIZE:
        raise CorruptImage(path, f"VHD block table offset 0x{table_off:x} is not a sector offset", at + 16)
    if entries * 4 > MAX_BAT_BYTES:
        raise UnsupportedImage(path, f"VHD block table of {entries} entries is too large", at + 28)
    if table_off + entries * 4 > file_size:
        raise CorruptImage(path, f"VHD block table at 0x{table_off:x} runs past the end of the file", at + 16)
    name = ""
    locators: list[Locator] = []
    if footer.disk_type == DIFFERENCING:
        name = _utf16(path, pname, "utf-16-be", "VHD parent name", at + 64)
        for i in range(LOCATORS):
            where = at + LOCATOR_OFFSET + i * _LOCATOR.size
            code, space, length, _r, off = _LOCATOR.unpack_from(raw, LOCATOR_OFFSET + i * _LOCATOR.size)
            if code == b"\0\0\0\0":
                continue
            if code not in PLATFORMS:
                raise CorruptImage(
                    path, f"VHD parent locator {i} has unknown platform code 0x{code.hex()}", where
                )
            # The spec says the space is in sectors, Windows writes bytes: a
            # value below one sector can only be a sector count.
            space_bytes = space * SECTOR if space < SECTOR else space
            if length > space_bytes or length > MAX_LOCATOR:
                raise CorruptImage(
                    path,
                    f"VHD parent locator {i} is {length} bytes long, in a space of {space_bytes}",
                    where + 8,
                )
            if off + length > file_size or (length and off < FOOTER_SIZE):
                raise CorruptImage(
                    path, f"VHD parent locator {i} at 0x{off:x} lies outside the file", where + 16
                )
            locators.append(Locator(i, code, space_bytes, length, off))
    return DynamicHeader(at, table_off, entries, block_size, csum, pid, ptime, name, tuple(locators))


def _utf16(path: str, raw: bytes, codec: str, what: str, at: int) -> str:
    """Decode a NUL-terminated UTF-16 string; bad code units are a corrupt image."""
    n = len(raw) - len(raw) % 2
    for i in range(0, n, 2):
        if raw[i : i + 2] == b"\0\0":
            n = i
            break
    try:
        return raw[:n].decode(codec)
    except UnicodeDecodeError as exc:
        raise CorruptImage(path, f"{what} is not valid UTF-16 ({exc.reason})", at + exc.start) from None


def decode_locator(path: str, loc: Locator, data: bytes) -> str:
    """The path a locator holds: UTF-16LE for W2ru/W2ku, UTF-8 for MacX (a file URL), ASCII for the
    deprecated Wi2r/Wi2k; a Mac alias is an opaque record, shown as its size."""
    if loc.platform in (W2RU, W2KU):
        if len(data) % 2:
            raise CorruptImage(path, f"VHD parent locator {loc.index} has an odd UTF-16 length", loc.offset)
        return _utf16(path, data, "utf-16-le", f"VHD parent locator {loc.index}", loc.offset)
    text = data.split(b"\0", 1)[0]
    if loc.platform == MAC:
        return f"(Mac alias, {len(data)} bytes)"
    try:
        return text.decode("utf-8" if loc.platform == MACX else "ascii")
    except UnicodeDecodeError as exc:
        raise CorruptImage(
            path, f"VHD parent locator {loc.index} is not valid text ({exc.reason})", loc.offset + exc.start
        ) from None
