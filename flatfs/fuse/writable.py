"""The view with writes (``mount --writable``, ``--overlay``): no FUSE code here.

:class:`WritableView` is the :class:`~flatfs.fuse.view.View` over a writable
disk (a :class:`~flatfs.fuse.scratch.Scratch` layer, or an overlay that keeps
the writes in a qcow2 file): the same files (the whole disk, and with ``-P``
each partition as a window of it), which now accept writes, zero ranges and
discards (``fallocate``), ``fsync``, and a truncate to their own size. Their
size never changes. ``st_blocks`` follows the writes.

Partition files keep the layout the table had at mount. A write that lands
outside every partition while there are partition files (where the tables
live: the MBR, the GPT and its backup, the EBRs) is logged once: the files do
not follow an edited table; remount to see the new one.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from typing import Protocol

from ..chain import Chain
from .view import View, window_data_bytes

log = logging.getLogger("flatfs.fuse")


class WritableDisk(Protocol):
    """What a writable view writes to: a Disk that also takes writes."""

    size: int
    generation: int  # bumped by every change

    def readinto(self, offset: int, buf: memoryview) -> int: ...

    def seek(self, offset: int, whence: int) -> int: ...

    def data_bytes(self) -> int: ...

    def write(self, offset: int, data: bytes | memoryview) -> int: ...

    def fallocate(self, mode: int, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class WritableView(View):
    writable = True
    file_mode = 0o644
    dir_mode = 0o755

    def __init__(
        self,
        chain: Chain,
        name: str | None,
        top_stat: os.stat_result,
        disk: WritableDisk,
        partitions: Sequence[tuple[str, int, int]] = (),
    ) -> None:
        self.wdisk = disk
        super().__init__(chain, name, top_stat, partitions=partitions, disk=disk)
        self._blocks: dict[str, tuple[int, int]] = {}  # path -> (generation, st_blocks)
        parts = [f for p, f in self.files.items() if p != self.file_path]
        self._table_edit_logged = False
        # where no partition is: the tables (MBR, GPT, EBRs) and the gaps
        self._parts = sorted((f.start, f.start + f.length) for f in parts if f.length > 1024)

    @property
    def direct_io(self) -> bool:
        """Partition files alias the disk file: the kernel must not keep a page cache of any of them."""
        return len(self.files) > 1

    def getattr(self, path: str) -> dict[str, int]:
        attrs = super().getattr(path)
        f = self.files.get(path)
        if f is not None:
            gen = self.wdisk.generation
            cached = self._blocks.get(path)
            if cached is None or cached[0] != gen:
                whole = f.start == 0 and f.length == self.size
                data = self.wdisk.data_bytes() if whole else window_data_bytes(self.disk, f.start, f.length)
                cached = (gen, (data + 511) // 512)
                self._blocks[path] = cached
            attrs["st_blocks"] = cached[1]
        return attrs

    def check_open(self, path: str, flags: int) -> None:
        self._file(path)
        if flags & os.O_TRUNC:
            raise OSError(errno.EPERM, "the view's size is fixed")

    def write(self, path: str, offset: int, data: bytes | memoryview) -> int:
        f = self._file(path)
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        n = min(len(data), f.length - offset)
        if n <= 0:
            if not data:
                return 0
            raise OSError(errno.ENOSPC, "write past the end of the view")
        self._note_table_edit(f.start + offset, n)
        return self.wdisk.write(f.start + offset, data[:n] if n < len(data) else data)

    def fallocate(self, path: str, mode: int, offset: int, length: int) -> None:
        f = self._file(path)
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad range")
        length = min(length, f.length - offset)
        if length > 0:
            self.wdisk.fallocate(mode, f.start + offset, length)

    def fsync(self, path: str) -> None:
        self._file(path)
        self.wdisk.flush()

    def truncate(self, path: str, length: int) -> None:
        f = self._file(path)
        if length != f.length:
            raise OSError(errno.EPERM, "the view's size is fixed")

    def statfs(self) -> dict[str, int]:
        out = super().statfs()
        out["f_blocks"] = (self.wdisk.data_bytes() + 4095) // 4096
        return out

    def _note_table_edit(self, offset: int, length: int) -> None:
        if not self._parts or self._table_edit_logged:
            return
        end = offset + length
        for s, e in self._parts:
            if s <= offset and end <= e:
                return
        self._table_edit_logged = True
        log.warning(
            "a write at 0x%x lies outside every partition (where the partition tables are): the "
            "partition files keep the layout they had at mount; remount to see a new one",
            offset,
        )
