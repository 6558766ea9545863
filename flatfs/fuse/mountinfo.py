"""This mount namespace's mount table, from ``/proc/self/mountinfo``: no FUSE code here."""

from __future__ import annotations

from typing import NamedTuple


class MountEntry(NamedTuple):
    mountpoint: str
    fstype: str
    source: str


def _unescape(s: str) -> str:
    """Undo the kernel's octal escapes (\\040 for space) in /proc/self/mountinfo."""
    if "\\" not in s:
        return s
    out = bytearray()
    raw = s.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def mounts() -> list[MountEntry]:
    """This namespace's mounts, in mount order (a later entry covers an earlier one)."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split()
                try:
                    sep = parts.index("-", 6)
                except ValueError:
                    continue
                out.append(MountEntry(_unescape(parts[4]), parts[sep + 1], _unescape(parts[sep + 2])))
    except OSError:
        pass
    return out


def find_mount(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path`` (already a real path)."""
    found = None
    for e in mounts():
        if e.mountpoint == path:
            found = e
    return found
