"""raw: the host file is the guest disk. The layer (its holes are ZERO) and the writer (guest bytes
at their own offsets, what is never written a hole)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..extents import K_DATA, K_ZERO, Runs
from ..hostio import data_runs, host_size, pread_exact
from .api import (
    CopyRun,
    FileSink,
    Format,
    HostFile,
    HostRun,
    LayerBase,
    OpenContext,
    OptionValue,
    Sink,
    TargetWriter,
    copy_runs,
)


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


class RawWriter:
    """A raw image: the guest's bytes at their own offsets; its file is exactly the virtual size."""

    def __init__(self, sink: Sink, size: int) -> None:
        self.sink = sink
        self.size = size

    def write_data(self, offset: int, data: memoryview) -> None:
        self.sink.write([data], offset)

    def copy_data(self, offset: int, length: int, runs: Sequence[CopyRun], buf: memoryview | None) -> None:
        copy_runs(self.sink, offset, runs, buf)

    def finish(self) -> int:
        return self.size


def _open_writer(sink: FileSink, size: int, options: Mapping[str, OptionValue], path: str) -> RawWriter:
    return RawWriter(sink, size)


def _measure(
    size: int, runs: Iterable[tuple[int, int]], options: Mapping[str, OptionValue]
) -> tuple[int, int]:
    return size, size  # what a device or a non-sparse file must hold, as qemu-img measure says


def _writer() -> TargetWriter:
    return TargetWriter((), _open_writer, _measure, in_place=True, copy=_open_writer)


# QEMU also takes its protocol driver "file" as a backing format: the host file, raw
FORMAT = Format("raw", probe=lambda head: True, open=RawLayer, aliases=("file",), writer=_writer)
