"""A small VHDX writer that follows MS-VHDX, for tests only (QEMU cannot write differencing VHDX).

It writes fixed-layout images: file type identifier, two headers, two region
tables, a 1 MiB log, a 1 MiB metadata region, the BAT, then payload and
sector bitmap blocks. It can put part of the image's true content into
unapplied log entries (the file holds stale bytes there), as a crash would
leave it. Its CRC-32C is computed independently of flatfs's.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field

KiB, MiB = 1 << 10, 1 << 20

BAT_REGION = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
SB_PRESENT = 6

LOG_OFFSET, LOG_LENGTH = 1 * MiB, 1 * MiB
METADATA_OFFSET, METADATA_LENGTH = 2 * MiB, 1 * MiB
BAT_OFFSET = 3 * MiB


def _table() -> list[int]:
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 & -(c & 1))
        out.append(c)
    return out


_T = _table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _T[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def with_crc(buf: bytearray, at: int = 4) -> bytearray:
    buf[at : at + 4] = b"\0\0\0\0"
    buf[at : at + 4] = struct.pack("<I", crc32c(bytes(buf)))
    return buf


def guid_str(g: uuid.UUID) -> str:
    return "{" + str(g) + "}"  # lower case, as libvhdi parses only that


@dataclass
class Parent:
    """What a differencing disk records about its parent."""

    data_write_guid: uuid.UUID
    relative_path: str | None = None
    volume_path: str | None = None
    absolute_win32_path: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class VhdxImage:
    size: int
    block_size: int = 1 * MiB
    logical_sector: int = 512
    physical_sector: int = 4096
    parent: Parent | None = None
    fixed: bool = False
    data_write_guid: uuid.UUID = field(default_factory=uuid.uuid4)
    # block index -> (state, bytearray of the block or None)
    blocks: dict[int, tuple[int, bytearray | None]] = field(default_factory=dict)
    # block index -> bytearray of per-sector presence (1 byte per sector, for building bitmaps)
    present: dict[int, bytearray] = field(default_factory=dict)
    # filled by save(): where things landed in the file
    block_offsets: dict[int, int] = field(default_factory=dict)
    bitmap_offsets: dict[int, int] = field(default_factory=dict)

    @property
    def spb(self) -> int:
        return self.block_size // self.logical_sector

    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * self.logical_sector // self.block_size

    @property
    def nblocks(self) -> int:
        return -(-self.size // self.block_size)

    def write(self, offset: int, data: bytes) -> None:
        """Store guest bytes (whole logical sectors) in this layer."""
        ss = self.logical_sector
        assert offset % ss == 0 and len(data) % ss == 0 and offset + len(data) <= self.size
        pos = 0
        while pos < len(data):
            b, rel = divmod(offset + pos, self.block_size)
            n = min(len(data) - pos, self.block_size - rel)
            state, buf = self.blocks.get(b, (NOT_PRESENT, None))
            if buf is None:
                buf = bytearray(self.block_size)
            buf[rel : rel + n] = data[pos : pos + n]
            pres = self.present.setdefault(b, bytearray(self.spb))
            pres[rel // ss : (rel + n) // ss] = b"\1" * (n // ss)
            self.blocks[b] = (FULLY_PRESENT, buf)
            pos += n

    def set_state(self, block: int, state: int) -> None:
        """Mark a block ZERO, UNMAPPED, UNDEFINED or NOT_PRESENT (its data dropped)."""
        self.blocks[block] = (state, None)
        self.present.pop(block, None)

    def _bat(self) -> tuple[int, list[int]]:
        cr = self.chunk_ratio
        if self.parent is not None:
            n = -(-self.nblocks // cr) * (cr + 1)
        else:
            n = self.nblocks + (self.nblocks - 1) // cr
        return n, [0] * n

    def _metadata(self) -> bytes:
        items: list[tuple[uuid.UUID, bytes, int]] = []  # (guid, data, flags)
        flags = (1 if self.fixed else 0) | (2 if self.parent else 0)
        items.append((FILE_PARAMETERS, struct.pack("<II", self.block_size, flags), 4))
        items.append((VIRTUAL_DISK_SIZE, struct.pack("<Q", self.size), 4 | 2))
        items.append((PAGE83_DATA, uuid.uuid4().bytes_le, 4 | 2))
        items.append((LOGICAL_SECTOR_SIZE, struct.pack("<I", self.logical_sector), 4 | 2))
        items.append((PHYSICAL_SECTOR_SIZE, struct.pack("<I", self.physical_sector), 4 | 2))
        if self.parent is not None:
            p = self.parent
            kv = {"parent_linkage": guid_str(p.data_write_guid)}
            for k in ("relative_path", "volume_path", "absolute_win32_path"):
                v = getattr(p, k)
                if v is not None:
                    kv[k] = v
            kv.update(p.extra)
            items.append((PARENT_LOCATOR, locator(kv), 4))
        table = bytearray(64 * KiB)
        struct.pack_into("<8sHH", table, 0, b"metadata", 0, len(items))
        region = bytearray(METADATA_LENGTH)
        at = 64 * KiB
        for i, (g, data, fl) in enumerate(items):
            struct.pack_into("<16sIIII", table, 32 + 32 * i, g.bytes_le, at, len(data), fl, 0)
            region[at : at + len(data)] = data
            at += -(-len(data) // 4096) * 4096
        region[: len(table)] = table
        return bytes(region)

    def save(self, path: str | os.PathLike[str], *, log: Log | None = None) -> None:
        """Write the image. With ``log``, some of its sectors go into unapplied log entries."""
        bat_n, bat = self._bat()
        bat_len = -(-bat_n * 8 // MiB) * MiB
        end = BAT_OFFSET + bat_len
        cr = self.chunk_ratio
        payload: list[tuple[int, bytes]] = []
        for b in range(self.nblocks):
            state, buf = self.blocks.get(b, (FULLY_PRESENT if self.fixed else NOT_PRESENT, None))
            if self.fixed and buf is None and state == FULLY_PRESENT:
                buf = bytearray(self.block_size)
            idx = b + b // cr
            if buf is None:
                bat[idx] = state
                continue
            pres = self.present.get(b)
            if self.parent is not None and pres is not None and pres.count(1) != self.spb:
                state = PARTIALLY_PRESENT
            self.block_offsets[b] = end
            bat[idx] = state | (end >> 20) << 20
            payload.append((end, bytes(buf)))
            end += self.block_size
        if self.parent is not None:
            for c in range(-(-self.nblocks // cr)):
                bits = bytearray(MiB)
                any_ = False
                for j in range(cr):
                    b = c * cr + j
                    pres = self.present.get(b)
                    if pres is None or b >= self.nblocks:
                        continue
                    if bat[b + b // cr] & 7 != PARTIALLY_PRESENT:
                        continue
                    any_ = True
                    base = j * self.spb
                    for s, v in enumerate(pres):
                        if v:
                            bits[(base + s) >> 3] |= 1 << ((base + s) & 7)
                if any_:
                    self.bitmap_offsets[c] = end
                    bat[c * (cr + 1) + cr] = SB_PRESENT | (end >> 20) << 20
                    payload.append((end, bytes(bits)))
                    end += MiB
        out = bytearray(end)
        out[0:8] = b"vhdxfile"
        creator = "flatfs test writer".encode("utf-16-le")
        out[8 : 8 + len(creator)] = creator
        # region tables
        rt = bytearray(64 * KiB)
        struct.pack_into("<4sIII", rt, 0, b"regi", 0, 2, 0)
        struct.pack_into("<16sQII", rt, 16, BAT_REGION.bytes_le, BAT_OFFSET, bat_len, 1)
        struct.pack_into("<16sQII", rt, 48, METADATA_REGION.bytes_le, METADATA_OFFSET, METADATA_LENGTH, 1)
        with_crc(rt)
        out[192 * KiB : 256 * KiB] = rt
        out[256 * KiB : 320 * KiB] = rt
        out[METADATA_OFFSET : METADATA_OFFSET + METADATA_LENGTH] = self._metadata()
        out[BAT_OFFSET : BAT_OFFSET + 8 * bat_n] = struct.pack(f"<{bat_n}Q", *bat)
        for at, data in payload:
            out[at : at + len(data)] = data
        log_guid = uuid.UUID(int=0)
        if log is not None:
            log_guid = log.guid
            log.apply(out)
        for i, at in enumerate((64 * KiB, 128 * KiB)):
            h = bytearray(4 * KiB)
            struct.pack_into(
                "<4sIQ16s16s16sHHIQ",
                h,
                0,
                b"head",
                0,
                10 + i,
                uuid.uuid4().bytes_le,
                self.data_write_guid.bytes_le,
                log_guid.bytes_le,
                0,
                1,
                LOG_LENGTH,
                LOG_OFFSET,
            )
            out[at : at + 4 * KiB] = with_crc(h)
        with open(path, "wb") as f:
            f.write(out)
        # a sparse file, as Hyper-V's would be: punch nothing, but keep the size exact
        os.truncate(path, len(out))


def locator(kv: dict[str, str]) -> bytes:
    """A VHDX parent locator with these key/value pairs (UTF-16LE)."""
    head = struct.pack("<16sHH", VHDX_LOCATOR_TYPE.bytes_le, 0, len(kv))
    entries = b""
    blob = b""
    base = len(head) + 12 * len(kv)
    for k, v in kv.items():
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        ko = base + len(blob)
        blob += kb
        vo = base + len(blob)
        blob += vb
        entries += struct.pack("<IIHH", ko, vo, len(kb), len(vb))
    return head + entries + blob


@dataclass
class Log:
    """Unapplied log entries. ``sectors``: file offsets (4 KiB aligned) whose true bytes the log
    holds while the file holds ``stale`` bytes there; ``zeros``: (offset, length) ranges the log
    zeroes while the file holds stale bytes. One entry per item, in order, from ``sequence``."""

    sectors: list[int] = field(default_factory=list)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    sequence: int = 1000
    stale: int = 0xEE
    guid: uuid.UUID = field(default_factory=uuid.uuid4)
    old_entries: int = 0  # entries of an older, already applied sequence left before ours

    def apply(self, out: bytearray) -> None:
        size = len(out)
        entries: list[bytes] = []
        seq = self.sequence
        # an old sequence (lower numbers, its own tail) that must be ignored
        pos = 0
        for k in range(self.old_entries):
            entries.append(self._entry(seq - 100 + k, 0, [], [(0x300000, bytes(4096))], size, pos))
            pos += len(entries[-1])
        first = pos
        for off in self.sectors:
            data = bytes(out[off : off + 4096])
            entries.append(self._entry(seq, first, [], [(off, data)], size, pos))
            pos += len(entries[-1])
            out[off : off + 4096] = bytes([self.stale]) * 4096
            seq += 1
        for off, n in self.zeros:
            assert out[off : off + n] == bytes(n)
            entries.append(self._entry(seq, first, [(off, n)], [], size, pos))
            pos += len(entries[-1])
            out[off : off + n] = bytes([self.stale]) * n
            seq += 1
        blob = b"".join(entries)
        assert len(blob) <= LOG_LENGTH
        out[LOG_OFFSET : LOG_OFFSET + len(blob)] = blob

    def _entry(
        self,
        seq: int,
        tail: int,
        zeros: list[tuple[int, int]],
        data: list[tuple[int, bytes]],
        size: int,
        pos: int,
    ) -> bytes:
        nd = len(zeros) + len(data)
        desc_area = -(-(64 + 32 * nd) // 4096) * 4096
        length = desc_area + 4096 * len(data)
        e = bytearray(length)
        struct.pack_into(
            "<4sIIIQII16sQQ", e, 0, b"loge", 0, length, tail, seq, nd, 0, self.guid.bytes_le, size, size
        )
        at = 64
        for off, n in zeros:
            struct.pack_into("<4sIQQQ", e, at, b"zero", 0, n, off, seq)
            at += 32
        sector = desc_area
        for off, d in data:
            struct.pack_into("<4s4s8sQQ", e, at, b"desc", d[4092:4096], d[0:8], off, seq)
            at += 32
            e[sector : sector + 4096] = (
                b"data" + struct.pack("<I", seq >> 32) + d[8:4092] + struct.pack("<I", seq & 0xFFFFFFFF)
            )
            sector += 4096
        return bytes(with_crc(e))
