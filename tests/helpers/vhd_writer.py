"""A small VHD writer that follows the VHD 1.0 specification, for tests only.

Linux has no tool that makes differencing VHDs (qemu-img cannot), so the tests
write them here: a footer copy at offset 0, the dynamic disk header, the BAT,
the parent locators' data, each allocated block as its sector bitmap and its
sectors, and the footer at the end. Sectors whose bitmap bit is clear are
filled with ``fill`` so that a reader ignoring the bitmap is caught.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
# Seconds between 1970-01-01 and the VHD epoch, 2000-01-01 (UTC)
VHD_EPOCH = 946684800


def checksum(block: bytes | bytearray) -> int:
    return ~sum(block) & 0xFFFFFFFF


def footer(
    size: int,
    disk_type: int,
    unique_id: bytes,
    *,
    creator: bytes = b"win ",
    data_offset: int = 0xFFFFFFFFFFFFFFFF,
    geometry: tuple[int, int, int] = (0, 16, 63),
) -> bytes:
    cyl, heads, secs = geometry
    if cyl == 0:
        cyl = min(65535, size // (heads * secs * SECTOR))
    raw = bytearray(
        struct.pack(
            ">8sIIQI4sI4sQQHBBII16sB",
            b"conectix",
            2,
            0x00010000,
            data_offset,
            0x2D000000,
            creator,
            0x000A0000,
            b"Wi2k",
            size,
            size,
            cyl,
            heads,
            secs,
            disk_type,
            0,
            unique_id,
            0,
        ).ljust(SECTOR, b"\0")
    )
    struct.pack_into(">I", raw, 64, checksum(raw))
    return bytes(raw)


@dataclass
class Vhd:
    """What to write. ``writes``: (guest offset, bytes), sector aligned; later writes win.

    ``locators``: (platform code, path) pairs, e.g. (b"W2ru", ".\\\\base.vhd").
    """

    size: int
    block_size: int = 2 << 20
    disk_type: int = DYNAMIC
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    unique_id: bytes = field(default_factory=lambda: uuid.uuid4().bytes)
    parent_id: bytes = bytes(16)
    parent_name: str = ""
    locators: list[tuple[bytes, str]] = field(default_factory=list)
    fill: bytes = b"\xee"
    creator: bytes = b"win "

    def write(self, path: Path | str) -> Path:
        bs = self.block_size
        nblocks = -(-self.size // bs)
        bitmap_size = -(-(bs // SECTOR) // (8 * SECTOR)) * SECTOR
        # the sectors each block holds
        blocks: dict[int, dict[int, bytes]] = {}
        for off, data in self.writes:
            assert off % SECTOR == 0 and len(data) % SECTOR == 0, "writes are whole sectors"
            for k in range(0, len(data), SECTOR):
                g = off + k
                blocks.setdefault(g // bs, {})[g % bs // SECTOR] = data[k : k + SECTOR]
        # layout: footer copy, header, BAT, locator data, blocks, footer
        table_off = 3 * SECTOR
        pos = table_off + -(-nblocks * 4 // SECTOR) * SECTOR
        loc_entries = []
        loc_data = []
        for code, text in self.locators:
            enc = text.encode("utf-16-le") if code in (b"W2ru", b"W2ku") else text.encode("utf-8")
            space = -(-len(enc) // SECTOR) * SECTOR or SECTOR
            loc_entries.append(struct.pack(">4sIIIQ", code, space, len(enc), 0, pos))
            loc_data.append((pos, enc))
            pos += space
        bat = [0xFFFFFFFF] * nblocks
        body = []
        for i in sorted(blocks):
            bat[i] = pos // SECTOR
            bitmap = bytearray(bitmap_size)
            data = bytearray(self.fill * bs)
            for s, sector in blocks[i].items():
                bitmap[s // 8] |= 0x80 >> (s % 8)
                data[s * SECTOR : (s + 1) * SECTOR] = sector
            body.append((pos, bytes(bitmap) + bytes(data)))
            pos += bitmap_size + bs
        hdr = bytearray(1024)
        struct.pack_into(
            ">8sQQIIII16sII",
            hdr,
            0,
            b"cxsparse",
            0xFFFFFFFFFFFFFFFF,
            table_off,
            0x00010000,
            nblocks,
            bs,
            0,
            self.parent_id,
            0x2D000000,
            0,
        )
        name = self.parent_name.encode("utf-16-be")[:510]
        hdr[64 : 64 + len(name)] = name
        for k, e in enumerate(loc_entries):
            hdr[576 + 24 * k : 600 + 24 * k] = e
        struct.pack_into(">I", hdr, 36, checksum(hdr))
        foot = footer(self.size, self.disk_type, self.unique_id, creator=self.creator, data_offset=SECTOR)
        with open(path, "wb") as f:
            f.write(foot)
            f.write(hdr)
            f.write(struct.pack(f">{nblocks}I", *bat))
            for at, data in loc_data + body:
                f.seek(at)
                f.write(data)
            f.seek(pos)
            f.write(foot)
        return Path(path)


def unique_id_of(path: Path | str) -> bytes:
    """The unique id in a VHD's footer (the one at the end of the file)."""
    with open(path, "rb") as f:
        f.seek(os.path.getsize(path) - SECTOR + 68)
        return f.read(16)


def compose(size: int, base: bytes, *layers: Vhd) -> bytes:
    """What a chain reads: ``base`` (the bottom's bytes, shorter means zeros), then each layer's writes."""
    out = bytearray(base[:size].ljust(size, b"\0"))
    for lay in layers:
        for off, data in lay.writes:
            out[off : off + len(data)] = data[: max(0, size - off)]
    return bytes(out)
