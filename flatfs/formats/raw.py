"""The raw layer: the host file is the guest disk; its holes are ZERO."""

from __future__ import annotations

from ..extents import K_DATA, K_ZERO, Runs
from ..hostio import data_runs, host_size, pread_exact
from .api import Format, HostFile, HostRun, LayerBase, OpenContext


class RawLayer(LayerBase):
    format = "raw"

    def __init__(self, path: str, fd: int, ctx: OpenContext | None = None) -> None:
        self.path = path
        self.fd = fd
        self.file_size = host_size(fd, path)
        # QEMU counts a raw file in whole 512-byte sectors: the tail past the
        # end of the file reads as zeros.
        self.size = -(-self.file_size // 512) * 512

    def runs(self, start: int, end: int) -> Runs:
        out = Runs()
        for s, e, is_data in data_runs(self.fd, self.path, start, min(end, self.size), self.file_size):
            out.add(s, e, K_DATA if is_data else K_ZERO)
        return out

    def readinto(self, offset: int, buf: memoryview) -> None:
        pread_exact(self.fd, self.path, buf, offset)

    def host_files(self) -> tuple[HostFile, ...]:
        return (HostFile(self.path, self.fd),)

    def host_map(self, start: int, end: int) -> list[HostRun]:
        """The guest bytes are the file's bytes at the same offsets (zeros past its end)."""
        out: list[HostRun] = []
        cut = max(start, min(end, self.file_size))
        if cut > start:
            out.append((start, cut - start, self.fd, start))
        if end > cut:
            out.append((cut, end - cut, -1, 0))
        return out


# QEMU also takes its protocol driver "file" as a backing format: the host file, raw
FORMAT = Format("raw", probe=lambda head: True, open=RawLayer, aliases=("file",))
