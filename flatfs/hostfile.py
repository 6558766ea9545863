"""Small helpers over host files: exact preadv, and SEEK_DATA/SEEK_HOLE runs.

Every OSError becomes an ImageIOError naming the file and offset.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from .errors import ImageIOError


def pread_exact(fd: int, path: str, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset``; a short read is an error (the file shrank under us)."""
    want = len(buf)
    done = 0
    while done < want:
        try:
            n = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as exc:
            raise ImageIOError.from_oserror(path, exc, offset + done) from None
        if n <= 0:
            raise ImageIOError(path, f"short read: wanted {want} bytes, file ends early", offset + done)
        done += n


def pread_padded(fd: int, path: str, buf: memoryview, offset: int, file_size: int) -> None:
    """Like pread_exact, but bytes past ``file_size`` read as zeros (qcow2 allows that)."""
    n = max(0, min(len(buf), file_size - offset))
    if n:
        pread_exact(fd, path, buf[:n], offset)
    if n < len(buf):
        buf[n:] = bytes(len(buf) - n)


def data_runs(
    fd: int, path: str, start: int, end: int, expect_size: int | None = None
) -> Iterator[tuple[int, int, bool]]:
    """Yield (start, end, is_data) runs of the host file over [start, end).

    Past the file's end everything is a hole. If the file system cannot tell,
    everything is data: unknown never degrades to zeros. With ``expect_size``
    (the size seen at open), a file that has since shrunk is an error rather
    than a silent run of zeros.
    """
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after pos
                _check_not_shrunk(fd, path, pos, expect_size)
                yield pos, end, False
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end, True
                return
            raise ImageIOError.from_oserror(path, exc, pos) from None
        if data > pos:
            yield pos, min(data, end), False
            pos = data
            if pos >= end:
                return
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # raced with truncation
                yield pos, end, False
                return
            raise ImageIOError.from_oserror(path, exc, pos) from None
        hole = min(hole, end)
        if hole <= pos:  # defensive: never loop forever
            hole = end
        yield pos, hole, True
        pos = hole


def _check_not_shrunk(fd: int, path: str, pos: int, expect_size: int | None) -> None:
    if expect_size is None or pos >= expect_size:
        return
    try:
        now = os.fstat(fd).st_size
    except OSError as exc:
        raise ImageIOError.from_oserror(path, exc, pos) from None
    if now < expect_size:
        err = ImageIOError(path, f"file shrank from {expect_size} to {now} bytes while open", pos)
        raise err
