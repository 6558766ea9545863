"""VirtualBox VDI 1.1: the pre-header and header, parsed and validated. Pure: no I/O.

Layout (little-endian), from VirtualBox's VDICore.h: a 64-byte text
pre-header, the signature 0xBEDA107F at 64 and the version at 68, then the
version 1 header from 72 (its own size first). The block map is one u32 per
block: a block index into the data area, or one of two markers. QEMU reads
only version 1.1 images with 1 MiB blocks and 512-byte sectors (what
VirtualBox writes); flatfs accepts the same set and refuses the rest by name.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from ...errors import CorruptImage, UnsupportedImage

SIGNATURE = 0xBEDA107F
SIGNATURE_OFFSET = 64
SIGNATURE_BYTES = struct.pack("<I", SIGNATURE)
VERSION_1_1 = 0x00010001
HEADER_OFFSET = 72  # the version 1 header starts after the pre-header
HEADER1_SIZE = 0x180  # VDIHEADER1: through uuidParentModify
HEADER1PLUS_SIZE = 0x190  # VDIHEADER1PLUS: plus the LCHS geometry (what VirtualBox writes)
HEAD_BYTES = HEADER_OFFSET + HEADER1PLUS_SIZE  # every field flatfs reads lies in here

TYPE_DYNAMIC = 1
TYPE_STATIC = 2
TYPE_UNDO = 3
TYPE_DIFF = 4
TYPE_NAMES = {TYPE_DYNAMIC: "dynamic", TYPE_STATIC: "static", TYPE_UNDO: "undo", TYPE_DIFF: "differencing"}

SECTOR_SIZE = 512
BLOCK_SIZE = 1 << 20  # the only block size QEMU (and VirtualBox by default) uses
# QEMU's limit on the number of blocks (the block map must stay below 2 GiB):
# INT32_MAX / 4, rounded down to whole sectors of the map
MAX_BLOCKS = 0x1FFFFF80

# block map entries
BLOCK_FREE = 0xFFFFFFFF  # not allocated: zeros in a base image, the parent's data in a differencing one
BLOCK_ZERO = 0xFFFFFFFE  # reads as zeros in every image

NULL_UUID = "00000000-0000-0000-0000-000000000000"

# field offsets in the file
O_VERSION = 68
O_HEADER_SIZE = 72
O_TYPE = 76
O_FLAGS = 80
O_OFFSET_BMAP = 340
O_OFFSET_DATA = 344
O_SECTOR_SIZE = 360
O_DISK_SIZE = 368
O_BLOCK_SIZE = 376
O_BLOCK_EXTRA = 380
O_BLOCKS = 384
O_BLOCKS_ALLOCATED = 388
O_UUID_CREATE = 392
O_UUID_MODIFY = 408
O_UUID_LINKAGE = 424
O_UUID_PARENT_MODIFY = 440

_FIXED = struct.Struct("<IIIII")  # signature, version, header size, type, flags (at 64)
_LAYOUT = struct.Struct("<II12xI4xQIIII16s16s16s16s")  # from offBlocks (at 340)


def uuid_text(raw: bytes) -> str:
    """A VDI UUID as VirtualBox prints it: RTUUID keeps its first three fields little-endian."""
    return str(uuid.UUID(bytes_le=raw))


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    header_size: int
    image_type: int
    flags: int
    offset_bmap: int
    offset_data: int
    sector_size: int
    disk_size: int  # as recorded
    block_size: int
    block_extra: int
    blocks: int
    blocks_allocated: int
    uuid_create: str
    uuid_modify: str
    uuid_linkage: str
    uuid_parent_modify: str

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.image_type, str(self.image_type))

    @property
    def is_diff(self) -> bool:
        return self.image_type == TYPE_DIFF

    @property
    def size(self) -> int:
        """The guest size: QEMU rounds an odd disk size up to whole sectors."""
        return -(-self.disk_size // SECTOR_SIZE) * SECTOR_SIZE

    @property
    def bmap_bytes(self) -> int:
        return self.blocks * 4


def looks_like_vdi(head: bytes) -> bool:
    return head[SIGNATURE_OFFSET : SIGNATURE_OFFSET + 4] == SIGNATURE_BYTES


def unpack(head: bytes) -> Header:
    """The header fields, unvalidated. ``head`` must hold HEAD_BYTES bytes."""
    _sig, version, hsize, itype, flags = _FIXED.unpack_from(head, SIGNATURE_OFFSET)
    (obmap, odata, sector, disk, bsize, extra, blocks, alloc, u1, u2, u3, u4) = _LAYOUT.unpack_from(
        head, O_OFFSET_BMAP
    )
    return Header(
        version,
        hsize,
        itype,
        flags,
        obmap,
        odata,
        sector,
        disk,
        bsize,
        extra,
        blocks,
        alloc,
        uuid_text(u1),
        uuid_text(u2),
        uuid_text(u3),
        uuid_text(u4),
    )


def identify(head: bytes) -> dict[str, str]:
    """The identities a child's by-UUID search compares, from a file's head alone ({} if not a VDI)."""
    if len(head) < HEAD_BYTES or not looks_like_vdi(head):
        return {}
    h = unpack(head)
    if h.version != VERSION_1_1:
        return {}
    return {"vdi-uuid-create": h.uuid_create, "vdi-uuid-modify": h.uuid_modify}


def parse_header(path: str, head: bytes, file_size: int) -> Header:
    """Parse and validate the header; every field flatfs uses is checked before use."""
    if len(head) < HEAD_BYTES:
        raise CorruptImage(path, f"file too short for a VDI header ({len(head)} bytes)", 0)
    if not looks_like_vdi(head):
        raise CorruptImage(path, "not a VDI image (bad signature)", SIGNATURE_OFFSET)
    h = unpack(head)
    if h.version != VERSION_1_1:
        raise UnsupportedImage(
            path, f"VDI version {h.version >> 16}.{h.version & 0xFFFF} is not supported (only 1.1)", O_VERSION
        )
    if h.header_size < HEADER1_SIZE:
        raise CorruptImage(
            path,
            f"header size {h.header_size} is smaller than a version 1.1 header ({HEADER1_SIZE})",
            O_HEADER_SIZE,
        )
    if h.image_type == TYPE_UNDO:
        raise UnsupportedImage(path, "VDI undo images (type 3) are not supported", O_TYPE)
    if h.image_type not in (TYPE_DYNAMIC, TYPE_STATIC, TYPE_DIFF):
        raise CorruptImage(path, f"unknown VDI image type {h.image_type}", O_TYPE)
    if h.sector_size != SECTOR_SIZE:
        raise UnsupportedImage(
            path, f"sector size {h.sector_size} is not supported (only 512)", O_SECTOR_SIZE
        )
    if h.block_size != BLOCK_SIZE:
        raise UnsupportedImage(
            path, f"block size {h.block_size} is not supported (only 1 MiB, as QEMU)", O_BLOCK_SIZE
        )
    if h.block_extra:
        # VirtualBox skips it in front of every block, QEMU ignores it: the two
        # read such an image differently, and neither writes one.
        raise UnsupportedImage(
            path, f"block extra data ({h.block_extra} bytes per block) is not supported", O_BLOCK_EXTRA
        )
    if h.blocks > MAX_BLOCKS:
        raise UnsupportedImage(path, f"too many blocks ({h.blocks}, at most {MAX_BLOCKS})", O_BLOCKS)
    if h.size > h.blocks * h.block_size:
        raise CorruptImage(
            path,
            f"disk size {h.disk_size} does not fit in {h.blocks} blocks of {h.block_size} bytes",
            O_DISK_SIZE,
        )
    if h.blocks_allocated > h.blocks:
        raise CorruptImage(
            path,
            f"{h.blocks_allocated} blocks allocated, more than the {h.blocks} blocks",
            O_BLOCKS_ALLOCATED,
        )
    if h.offset_bmap % SECTOR_SIZE:
        raise UnsupportedImage(
            path, f"block map offset 0x{h.offset_bmap:x} is not sector aligned", O_OFFSET_BMAP
        )
    if h.offset_bmap < HEADER_OFFSET + h.header_size:
        raise CorruptImage(path, f"block map at 0x{h.offset_bmap:x} overlaps the header", O_OFFSET_BMAP)
    if h.offset_bmap + h.bmap_bytes > file_size:
        raise CorruptImage(
            path,
            f"block map ({h.blocks} entries at 0x{h.offset_bmap:x}) lies past the end of the file",
            O_OFFSET_BMAP,
        )
    if h.offset_data % SECTOR_SIZE:
        raise UnsupportedImage(path, f"data offset 0x{h.offset_data:x} is not sector aligned", O_OFFSET_DATA)
    if h.offset_data < h.offset_bmap + h.bmap_bytes:
        raise CorruptImage(path, f"data area at 0x{h.offset_data:x} overlaps the block map", O_OFFSET_DATA)
    if h.is_diff and h.uuid_linkage == NULL_UUID:
        raise CorruptImage(path, "differencing image without a parent UUID (uuidLinkage)", O_UUID_LINKAGE)
    return h
