"""Partition tables written from the specs (MBR/EBR layout, UEFI GPT), for tests that need a
table sgdisk or parted would refuse to make (overlaps, loops, bad CRCs); and Linux's own view of
a disk's partitions (``losetup -r -P``, /sys/block), the oracle for ``flatfs mount -P``."""

from __future__ import annotations

import os
import struct
import subprocess
import time
import uuid
import zlib
from pathlib import Path

SECTOR = 512
LINUX_FS = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")


def mbr_entry(ptype: int, first: int, count: int, boot: int = 0) -> bytes:
    return struct.pack("<B3sB3sII", boot, b"\xff\xff\xff", ptype, b"\xff\xff\xff", first, count)


def mbr(*entries: bytes) -> bytes:
    """A sector holding a partition table of up to four entries and the 0x55AA signature."""
    table = b"".join(entries).ljust(64, b"\0")
    return bytes(446) + table + b"\x55\xaa"


def gpt(disk_sectors: int, parts: list[tuple[int, int]], count: int = 128) -> dict[int, bytes]:
    """{byte offset: bytes} of a GPT (protective MBR, both headers, both entry arrays) for
    partitions given as (first LBA, last LBA)."""
    last = disk_sectors - 1
    ents = bytearray(count * 128)
    for i, (first, end) in enumerate(parts):
        struct.pack_into(
            "<16s16sQQQ72s", ents, i * 128, LINUX_FS.bytes_le, uuid.uuid4().bytes_le, first, end, 0, b""
        )
    ent_sectors = -(-len(ents) // SECTOR)
    first_usable, last_usable = 2 + ent_sectors, last - 1 - ent_sectors

    def header(my: int, alt: int, entries_lba: int) -> bytes:
        h = bytearray(
            struct.pack(
                "<8sIIIIQQQQ16sQIII",
                b"EFI PART",
                0x10000,
                92,
                0,
                0,
                my,
                alt,
                first_usable,
                last_usable,
                uuid.UUID(int=7).bytes_le,
                entries_lba,
                count,
                128,
                zlib.crc32(ents),
            )
        )
        struct.pack_into("<I", h, 16, zlib.crc32(h))
        return bytes(h).ljust(SECTOR, b"\0")

    return {
        0: mbr(mbr_entry(0xEE, 1, min(last, 0xFFFFFFFF))),
        SECTOR: header(1, last, 2),
        2 * SECTOR: bytes(ents),
        (last - ent_sectors) * SECTOR: bytes(ents),
        last * SECTOR: header(last, 1, last - ent_sectors),
    }


def write_at(path: Path, pieces: dict[int, bytes], size: int) -> Path:
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    return path


def linux_partitions(dev: str) -> dict[int, tuple[int, int]]:
    """{N: (start, length) in bytes} of ``dev``'s partitions as the kernel sees them (``losetup -P``
    scans asynchronously, so the set is read once it stops changing; ``partx -a`` adds
    them where no scan happened)."""
    name = os.path.basename(dev)
    base = Path("/sys/block") / name
    found: list[Path] = []
    stable = 0
    for attempt in range(100):
        now = sorted(base.glob(f"{name}p*"))
        stable = stable + 1 if now and now == found else 0
        found = now
        if stable >= 5:
            break
        if attempt == 10:
            subprocess.run(["partx", "-a", dev], capture_output=True)
        time.sleep(0.05)
    out = {}
    for p in found:
        n = int(p.name[len(name) + 1 :])
        out[n] = (int((p / "start").read_text()) * SECTOR, int((p / "size").read_text()) * SECTOR)
    return out
