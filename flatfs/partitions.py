"""Partition tables as Linux reads them: MBR (primary, extended, logical) and GPT. Pure: no FUSE.

:func:`read_table` takes a reader of the disk's bytes and its size and returns
the partitions, numbered as Linux numbers them (MBR: slots 1-4, logical
partitions from 5 in chain order; GPT: the entry's index + 1), or a one-line
warning and no partitions when the table is hostile or damaged. Facts from
the UEFI specification (GPT, chapter 5) and the MBR/EBR layout; what Linux
does with them (which damage it skips, how large it makes an extended
partition's device) was checked against ``losetup -P`` and /sys/block.

Stricter than Linux on purpose: overlapping partitions, a partition past the
end of the disk or outside the GPT's usable range, an EBR chain that loops or
leaves its extended partition give a warning and no partition at all, never
a guess.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from typing import NamedTuple

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
EXTENDED_TYPES = (0x05, 0x0F, 0x85)
GPT_PROTECTIVE = 0xEE
GPT_SIGNATURE = b"EFI PART"
GPT_ENTRY_SIZE = 128  # Linux accepts this size only
MAX_GPT_ENTRIES = 16384  # 2 MiB of entries; the spec's minimum array is 128 entries
MAX_LOGICAL = 256 - 5  # Linux's partition numbers stop at 255
EXTENDED_DEVICE_SECTORS = 2  # Linux's device for an extended partition: its first 2 sectors

_MBR_ENTRY = struct.Struct("<B3sB3sII")
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # through the entries' CRC, 92 bytes
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")

Reader = Callable[[int, int], bytes]  # (offset, length) -> bytes (zeros past the end)


class Partition(NamedTuple):
    number: int  # as Linux numbers it: NAME-pN.raw
    start: int  # bytes
    length: int  # bytes
    kind: str  # "primary", "extended", "logical", "gpt"
    type: str  # MBR type byte (hex) or GPT type GUID


class Table(NamedTuple):
    scheme: str | None  # "mbr", "gpt" or None (no partition table)
    partitions: tuple[Partition, ...]
    warning: str | None = None  # set when a table is there but not usable


class _Bad(Exception):
    """A table that is there but hostile or damaged: the reason, one line."""


def read_table(read: Reader, size: int) -> Table:
    """The partitions of a disk of ``size`` bytes whose bytes ``read`` returns."""
    mbr = read(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != MBR_SIGNATURE:
        return Table(None, ())
    entries = [_MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    if any(e[0] not in (0, 0x80) for e in entries):
        return Table(None, ())  # a boot sector (FAT, NTFS) with its own 0x55AA, not a table
    try:
        if any(e[2] == GPT_PROTECTIVE for e in entries):
            return Table("gpt", _gpt(read, size))
        parts = _mbr(read, size, entries)
    except _Bad as exc:
        scheme = "gpt" if any(e[2] == GPT_PROTECTIVE for e in entries) else "mbr"
        return Table(scheme, (), f"{scheme.upper()} partition table not used: {exc}")
    return Table("mbr", parts)


# -- MBR -------------------------------------------------------------------------


def _mbr(
    read: Reader, size: int, entries: list[tuple[int, bytes, int, bytes, int, int]]
) -> tuple[Partition, ...]:
    sectors = size // SECTOR
    out: list[Partition] = []
    extended: tuple[int, int] | None = None
    for slot, (_, _, ptype, _, first, count) in enumerate(entries, 1):
        if count == 0 or ptype == 0:
            continue
        if first == 0 or first + count > sectors:
            raise _Bad(
                f"partition {slot} (sectors {first}+{count}) lies outside the disk ({sectors} sectors)"
            )
        if ptype in EXTENDED_TYPES:
            if extended is not None:
                raise _Bad(f"partition {slot} is a second extended partition")
            extended = (first, count)
            n = min(count, EXTENDED_DEVICE_SECTORS)
            out.append(Partition(slot, first * SECTOR, n * SECTOR, "extended", f"0x{ptype:02x}"))
        else:
            out.append(Partition(slot, first * SECTOR, count * SECTOR, "primary", f"0x{ptype:02x}"))
    if extended is not None:
        out += _logical(read, *extended)
    _no_overlaps([p for p in out if p.kind != "extended"])
    return tuple(out)


def _logical(read: Reader, ext_first: int, ext_count: int) -> list[Partition]:
    """The logical partitions of the EBR chain that starts at the extended partition."""
    out: list[Partition] = []
    seen: set[int] = set()
    ebr, ebr_size = ext_first, ext_count
    ext_end = ext_first + ext_count
    while True:
        if ebr in seen:
            raise _Bad(f"the chain of logical partitions loops back to sector {ebr}")
        seen.add(ebr)
        if not ext_first <= ebr < ext_end:
            raise _Bad(f"a logical partition's table at sector {ebr} lies outside the extended partition")
        sector = read(ebr * SECTOR, SECTOR)
        if sector[510:512] != MBR_SIGNATURE:
            return out  # the end of the chain, as Linux reads it
        entries = [_MBR_ENTRY.unpack_from(sector, 446 + 16 * i) for i in range(4)]
        for i, (_, _, ptype, _, offs, count) in enumerate(entries):
            if count == 0 or ptype in EXTENDED_TYPES or ptype == 0:
                continue
            if i >= 2 and offs + count > ebr_size:
                continue  # Linux: the 3rd and 4th entries of an EBR often hold garbage
            first = ebr + offs
            if offs == 0 or first + count > ext_end:
                raise _Bad(
                    f"logical partition {5 + len(out)} (sectors {first}+{count}) lies outside "
                    f"the extended partition (sectors {ext_first}+{ext_count})"
                )
            if len(out) >= MAX_LOGICAL:
                raise _Bad(f"more than {MAX_LOGICAL} logical partitions")
            out.append(Partition(5 + len(out), first * SECTOR, count * SECTOR, "logical", f"0x{ptype:02x}"))
        nxt = next(((o, c) for _, _, t, _, o, c in entries if c and t in EXTENDED_TYPES), None)
        if nxt is None:
            return out
        ebr, ebr_size = ext_first + nxt[0], nxt[1]


# -- GPT -------------------------------------------------------------------------


def _gpt(read: Reader, size: int) -> tuple[Partition, ...]:
    """The partitions of the primary GPT, or of the backup when the primary is damaged."""
    last = size // SECTOR - 1
    if last < 2:
        raise _Bad("the disk is too small for a GPT")
    try:
        hdr, entries = _gpt_at(read, 1, last)
    except _Bad as primary:
        try:
            hdr, entries = _gpt_at(read, last, last)
        except _Bad as backup:
            raise _Bad(f"primary GPT: {primary}; backup GPT: {backup}") from None
    first_usable, last_usable = hdr[7], hdr[8]
    out = []
    for i in range(len(entries) // GPT_ENTRY_SIZE):
        ptype, _, first, end, _, _ = _GPT_ENTRY.unpack_from(entries, i * GPT_ENTRY_SIZE)
        if ptype == bytes(16):
            continue
        if end < first or first < first_usable or end > last_usable:
            raise _Bad(
                f"partition {i + 1} (LBA {first}-{end}) lies outside the usable range "
                f"(LBA {first_usable}-{last_usable})"
            )
        out.append(
            Partition(
                i + 1, first * SECTOR, (end - first + 1) * SECTOR, "gpt", str(uuid.UUID(bytes_le=ptype))
            )
        )
    _no_overlaps(out)
    return tuple(out)


def _gpt_at(read: Reader, lba: int, last: int) -> tuple[tuple[int, ...], bytes]:
    """The header at ``lba`` and its entries, every check the spec asks for made."""
    raw = read(lba * SECTOR, SECTOR)
    if len(raw) < _GPT_HEADER.size or raw[:8] != GPT_SIGNATURE:
        raise _Bad(f"no GPT header at LBA {lba}")
    hdr = _GPT_HEADER.unpack_from(raw)
    (_, _, hsize, hcrc, _, my_lba, _, first_usable, last_usable, _, entries_lba, count, esize, ecrc) = hdr
    if not _GPT_HEADER.size <= hsize <= SECTOR:
        raise _Bad(f"GPT header at LBA {lba} has a size of {hsize} bytes")
    if zlib.crc32(raw[:16] + bytes(4) + raw[20:hsize]) != hcrc:
        raise _Bad(f"GPT header at LBA {lba} fails its CRC")
    if my_lba != lba:
        raise _Bad(f"GPT header at LBA {lba} says it is at LBA {my_lba}")
    if not first_usable <= last_usable <= last:
        raise _Bad(
            f"GPT header at LBA {lba}: usable LBA {first_usable}-{last_usable} (the disk ends at {last})"
        )
    if esize != GPT_ENTRY_SIZE:
        raise _Bad(f"GPT header at LBA {lba}: entries of {esize} bytes")
    if count > MAX_GPT_ENTRIES:
        raise _Bad(f"GPT header at LBA {lba}: {count} entries")
    length = count * esize
    if entries_lba < 2 or entries_lba + -(-length // SECTOR) > last + 1:
        raise _Bad(f"GPT entries at LBA {entries_lba} (+{length} bytes) lie outside the disk")
    entries = read(entries_lba * SECTOR, length)
    if zlib.crc32(entries) != ecrc:
        raise _Bad(f"GPT entries at LBA {entries_lba} fail their CRC")
    return hdr, entries


def _no_overlaps(parts: list[Partition]) -> None:
    ordered = sorted(parts, key=lambda p: p.start)
    for a, b in zip(ordered, ordered[1:]):
        if a.start + a.length > b.start:
            raise _Bad(f"partitions {a.number} and {b.number} overlap")
