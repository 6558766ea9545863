"""qcow2 internal snapshots: the snapshot table, read and bounded as QEMU reads it, and choosing one.

Facts from QEMU's docs/interop/qcow2.txt ("Snapshots"): the header's
``nb_snapshots`` entries start at ``snapshots_offset``, each 8-byte aligned:
a 40-byte fixed part (L1 table offset and size, ID and name lengths, date,
VM clock, 32-bit VM state size, extra data size), then the extra data (a
64-bit VM state size, the virtual disk size at the snapshot, the icount;
each present only if the extra data is long enough), the ID string and the
name. Like QEMU at open, only the table's size is checked (extra data and
total bytes bounded); the L1 table of a snapshot is validated when it is
chosen, as QEMU does when it loads one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ...errors import CorruptImage, UnsupportedImage
from .spec import MAX_L1_BYTES, MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOTS_BYTES, SNAPSHOT_HEADER

_ENTRY = struct.Struct(">QIHHIIQII")  # the 40-byte fixed part
WINDOW = 64 << 10  # the table is read this much at a time
NO_ICOUNT = (1 << 64) - 1  # "icount not recorded" (QEMU writes -1)


@dataclass(frozen=True)
class Snapshot:
    """One entry of the snapshot table; ``at`` is its offset in the image."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None
    at: int

    def info(self) -> dict[str, Any]:
        """The entry as ``qemu-img info --output=json`` lists it."""
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            out["icount"] = self.icount
        return out


Reader = Callable[[int, int], bytes]  # (offset, n) -> n bytes; zeros past the end of the file


def walk(path: str, read: Reader, count: int, start: int) -> Iterator[Snapshot]:
    """The ``count`` entries of the table at ``start``, in order; CorruptImage if it is too big."""
    offset = start
    length = 0
    window, window_at = b"", 0
    for i in range(count):
        offset = (offset + 7) & ~7
        length = (length + 7) & ~7
        if not window_at <= offset <= window_at + len(window) - SNAPSHOT_HEADER:
            window, window_at = read(offset, WINDOW), offset
        rel = offset - window_at
        l1_off, l1_size, id_size, name_size, dsec, dnsec, clock, vmsize, extra = _ENTRY.unpack_from(
            window, rel
        )
        if extra > MAX_SNAPSHOT_EXTRA:
            raise CorruptImage(
                path, f"snapshot table entry {i} has too much extra data ({extra} bytes)", offset + 36
            )
        size = SNAPSHOT_HEADER + extra + id_size + name_size
        length += size
        if length > MAX_SNAPSHOTS_BYTES or offset + size - start > (1 << 31) - 1:
            raise CorruptImage(path, f"snapshot table is too big ({count} entries)", start)
        if rel + size > len(window):
            window, window_at = read(offset, max(WINDOW, size)), offset
            rel = 0
        body = window[rel + SNAPSHOT_HEADER : rel + size]
        ext = body[:extra]
        vm_large = struct.unpack_from(">Q", ext, 0)[0] if extra >= 8 else vmsize
        disk = struct.unpack_from(">Q", ext, 8)[0] if extra >= 16 else None
        icount = struct.unpack_from(">Q", ext, 16)[0] if extra >= 24 else None
        names = body[extra:]
        yield Snapshot(
            id=_text(names[:id_size]),
            name=_text(names[id_size : id_size + name_size]),
            l1_table_offset=l1_off,
            l1_size=l1_size,
            date_sec=dsec,
            date_nsec=dnsec,
            vm_clock_nsec=clock,
            vm_state_size=vm_large,
            disk_size=disk,
            icount=None if icount == NO_ICOUNT else icount,
            at=offset,
        )
        offset += size


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def shown(text: str) -> str:
    """A name from the image, safe to print: bytes that are not UTF-8 as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def choose(path: str, snapshots: list[Snapshot], wanted: str) -> Snapshot:
    """The snapshot ``wanted`` names, as ``qemu-img convert -l`` finds it.

    ``snapshot.id=ID`` or ``snapshot.name=NAME`` (both, comma-separated: both
    must match), or a bare word: an ID first, else a name. More than one
    match is ambiguous; none is an error naming what the image has.
    """
    by_id: str | None = None
    by_name: str | None = None
    parts = wanted.split(",")
    if all(p.startswith(("snapshot.id=", "snapshot.name=")) for p in parts):
        for p in parts:
            key, _, value = p.partition("=")
            if key == "snapshot.id":
                by_id = value
            else:
                by_name = value
        found = [
            s
            for s in snapshots
            if (by_id is None or s.id == by_id) and (by_name is None or s.name == by_name)
        ]
    else:
        found = [s for s in snapshots if s.id == wanted] or [s for s in snapshots if s.name == wanted]
    if not found:
        have = ", ".join(f"{shown(s.id)} ({shown(s.name)})" for s in snapshots[:8]) or "none"
        more = ", ..." if len(snapshots) > 8 else ""
        raise UnsupportedImage(path, f"no internal snapshot {wanted!r} (the image has: {have}{more})")
    if len(found) > 1:
        ids = ", ".join(shown(s.id) for s in found[:8])
        raise UnsupportedImage(
            path,
            f"internal snapshot {wanted!r} is ambiguous (IDs {ids}); choose one by ID: -l snapshot.id=ID",
        )
    return found[0]


def check_l1(path: str, snap: Snapshot, cluster_size: int, file_size: int) -> None:
    """The chosen snapshot's L1 table must be a table this file can hold, as QEMU checks it."""
    what = f"L1 table of snapshot {shown(snap.id)} ({shown(snap.name)})"
    if snap.l1_size > MAX_L1_BYTES // 8:
        raise CorruptImage(path, f"{what} is too large ({snap.l1_size} entries)", snap.at + 8)
    length = snap.l1_size * 8
    off = snap.l1_table_offset
    if off % cluster_size:
        raise CorruptImage(path, f"{what} offset 0x{off:x} is not cluster aligned", snap.at)
    if length and (off == 0 or off + length > file_size):
        raise CorruptImage(
            path, f"{what} at 0x{off:x} (+{length} bytes) lies outside the file ({file_size} bytes)", snap.at
        )
