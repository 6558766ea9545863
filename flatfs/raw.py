"""The raw layer: the host file is the guest disk; its holes are ZERO."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any

from .errors import ImageIOError
from .extents import Extent, Kind
from .hostfile import data_runs, pread_exact
from .layer import BackingRef, Format, register


class RawLayer:
    format = "raw"
    backing: BackingRef | None = None

    def __init__(self, path: str, fd: int, *, opener: object = None) -> None:
        self.path = path
        self.fd = fd
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                self.file_size = os.lseek(fd, 0, os.SEEK_END)
            else:
                self.file_size = st.st_size
        except OSError as exc:
            raise ImageIOError.from_oserror(path, exc) from None
        # QEMU counts a raw file in whole 512-byte sectors: the tail past the
        # end of the file reads as zeros.
        self.size = -(-self.file_size // 512) * 512

    def extents(self, start: int, end: int) -> Iterator[Extent]:
        for s, e, is_data in data_runs(self.fd, self.path, start, min(end, self.size), self.file_size):
            yield Extent(s, e - s, Kind.DATA if is_data else Kind.ZERO)

    def readinto(self, offset: int, buf: memoryview) -> None:
        pread_exact(self.fd, self.path, buf, offset)

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass  # the chain owns the fd


# QEMU also takes its protocol driver "file" as a backing format: the host file, raw
register(Format("raw", probe=lambda head: True, open=RawLayer, aliases=("file",)))
