"""A VMDK disk's extents: the base every extent kind shares, ZERO and flat (FLAT, VMFS) extents.

A flat extent is a range of a host file. Its holes are found with SEEK_DATA/SEEK_HOLE and
never read: allocated zeros (ALLOC_ZERO, as ``qemu-img map`` shows them), or,
for a vmfsThin disk (a thin ``-flat.vmdk`` copied off VMFS), holes (ZERO),
which stay holes in the view and in convert. Past the file's end an extent reads
as zeros, one run however long the descriptor claims it is.
"""

from __future__ import annotations

from typing import Any

from ...extents import K_ABSENT, K_ALLOC_ZERO, K_DATA, K_ZERO, Runs
from ...hostio import data_runs, host_size, pread_padded
from .descriptor import ExtentLine
from .sparse import SECTOR

# A flat extent answers at most this much per call (SEEK_DATA/HOLE runs)
FLAT_WINDOW = 256 << 20


class Extent:
    """One extent of a disk: ``length`` guest bytes at ``start``."""

    start = 0
    length = 0
    path = ""
    fd = -1
    line: ExtentLine | None = None

    def runs(self, rel: int, end: int, out: Runs, base: int) -> None:
        raise NotImplementedError

    def readinto(self, rel: int, buf: memoryview) -> None:
        raise NotImplementedError

    def coarse(self, out: Runs) -> None:
        """Where data may lie, from table-level facts only (a flat file: anywhere)."""
        out.add(self.start, self.start + self.length, K_DATA)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"virtual-size": self.length}
        if self.line is not None:
            d["access"] = self.line.access
            d["type"] = self.line.type
            if self.line.filename is not None:
                d["filename"] = self.path
            if self.line.type == "FLAT":
                d["offset"] = self.line.offset * SECTOR
        return d

    def close(self) -> None:
        pass


class ZeroExtent(Extent):
    def __init__(self, length: int, line: ExtentLine) -> None:
        self.length, self.line = length, line

    def runs(self, rel: int, end: int, out: Runs, base: int) -> None:
        out.add(base + rel, base + end, K_ZERO)

    def coarse(self, out: Runs) -> None:
        out.add(self.start, self.start + self.length, K_ABSENT)

    def readinto(self, rel: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))


class FlatExtent(Extent):
    """A range of a host file: its holes read as zeros, past its end too."""

    def __init__(
        self, path: str, fd: int, offset: int, length: int, line: ExtentLine, thin: bool = False
    ) -> None:
        self.path, self.fd, self.offset, self.length, self.line = path, fd, offset, length, line
        self.file_size = host_size(fd, path)
        # A vmfsThin disk's holes are blocks VMFS never allocated: holes (ZERO), as a raw
        # file's. Another flat file's holes are allocated zeros, as QEMU reports them.
        self.hole = K_ZERO if thin else K_ALLOC_ZERO

    def runs(self, rel: int, end: int, out: Runs, base: int) -> None:
        h = self.offset + rel
        if h >= self.file_size:
            # past the file's end: one run however long the extent claims to be
            # (QEMU: allocated, reads as zeros)
            out.add(base + rel, base + end, self.hole)
            return
        end = min(end, rel + FLAT_WINDOW, self.file_size - self.offset)
        for s, e, is_data in data_runs(self.fd, self.path, h, self.offset + end, self.file_size):
            out.add(base + rel + (s - h), base + rel + (e - h), K_DATA if is_data else self.hole)

    def readinto(self, rel: int, buf: memoryview) -> None:
        pread_padded(self.fd, self.path, buf, self.offset + rel, self.file_size)
