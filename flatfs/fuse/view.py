"""The flattened chain as one read-only file, and its partitions: no FUSE code here.

:class:`View` answers attributes, ``readdir``, open flags, reads, SEEK_DATA/SEEK_HOLE
and statfs, each with one call into the chain. :func:`errno_for` is the one place
where an exception raised while serving a request becomes an errno, and where it
is logged (once per kind of error).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading
import traceback
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from ..chain import SEEK_DATA, SEEK_HOLE, Chain
from ..errors import FlatfsError, ImageError

log = logging.getLogger("flatfs.fuse")

BLKSIZE = 1 << 20  # st_blksize: the I/O size tools should use on the view


# ---------------------------------------------------------------------------
# errno mapping: the one seam where exceptions become errno values
# ---------------------------------------------------------------------------

_LOGGED: set[tuple[str, str]] = set()
_LOGGED_MAX = 1024
_log_lock = threading.Lock()


def errno_for(exc: BaseException, path: str | None = None, offset: int | None = None) -> int:
    """Map an exception raised while serving a request to a positive errno.

    FlatfsError -> its ``errno`` (EIO unless it carries one), logged once per
    distinct message with the view path and request offset. OSError -> its
    errno (ENXIO from SEEK_DATA is an answer, not a failure). Anything else is
    a bug: logged once with its traceback, EIO to the reader.
    """
    if isinstance(exc, FlatfsError):
        code: int = getattr(exc, "errno", None) or errno.EIO
        _log_once(path, offset, str(exc), None, key=_error_kind(exc))
        return code
    if isinstance(exc, OSError):
        return exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else errno.EIO
    _log_once(path, offset, f"internal error: {exc!r}", traceback.format_exc())
    return errno.EIO


_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")


def _error_kind(exc: FlatfsError) -> str:
    """What makes two errors "the same" for the log: the file and the reason, numbers aside.

    A reader streaming through a broken region hits one error per request,
    each at its own offset (and a short read names its own sizes); one line
    per broken file and kind of damage is enough.
    """
    if isinstance(exc, ImageError):
        return f"{type(exc).__name__}:{exc.path}:{_NUMBERS.sub('#', exc.reason)}"
    return f"{type(exc).__name__}:{_NUMBERS.sub('#', str(exc))}"


def _log_once(
    path: str | None, offset: int | None, message: str, tb: str | None, key: str | None = None
) -> None:
    seen = (path or "", key or message)
    with _log_lock:
        if seen in _LOGGED:
            return
        if len(_LOGGED) >= _LOGGED_MAX:
            if len(_LOGGED) == _LOGGED_MAX:
                _LOGGED.add(("", "<suppressed>"))
                log.error("too many distinct errors; not logging any more of them")
            return
        _LOGGED.add(seen)
    where = f"{path or '?'}" + (f" at offset 0x{offset:x}" if offset is not None else "")
    log.error("%s: %s", where, message)
    if tb:
        log.error("%s", tb.rstrip())


# ---------------------------------------------------------------------------
# the view
# ---------------------------------------------------------------------------


def view_name(image: str) -> str:
    """``vm.qcow2`` -> ``vm.raw``: the top image's name without its last suffix, plus .raw."""
    stem, _ = os.path.splitext(os.path.basename(os.path.normpath(image)))
    return (stem or os.path.basename(image)) + ".raw"


class Disk(Protocol):
    """What the view reads: the chain, or a writable layer over it (``size``, reads, seeks)."""

    size: int

    def readinto(self, offset: int, buf: memoryview) -> int: ...

    def seek(self, offset: int, whence: int) -> int: ...

    def data_bytes(self) -> int: ...


class _File(NamedTuple):
    """One file of the view: a window [start, start + length) of the disk."""

    start: int
    length: int


def window_seek(disk: Disk, start: int, length: int, offset: int, whence: int) -> int:
    """SEEK_DATA/SEEK_HOLE in the window [start, start + length) of ``disk``, window-relative."""
    if offset < 0:
        raise OSError(errno.EINVAL, "negative offset")
    if offset >= length:
        raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
    end = start + length
    if whence == SEEK_DATA:
        try:
            got = disk.seek(start + offset, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise OSError(errno.ENXIO, os.strerror(errno.ENXIO)) from None
            raise
        if got >= end:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return got - start
    return min(disk.seek(start + offset, SEEK_HOLE), end) - start


def window_data_bytes(disk: Disk, start: int, length: int) -> int:
    """Bytes of data in the window, by a SEEK_DATA/SEEK_HOLE walk (cheap with the data index)."""
    total = pos = 0
    while pos < length:
        try:
            data = window_seek(disk, start, length, pos, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        pos = window_seek(disk, start, length, data, SEEK_HOLE)
        total += pos - data
    return total


class View:
    """The flattened chain as one read-only file, optionally inside a folder, with its partitions.

    ``name`` None: single-file root (mounted over a regular file). Otherwise
    the root is a directory holding one file called ``name`` and, for each
    of ``partitions`` (name, start, length), a file that is that window of the
    disk. ``top_stat`` is the top image's stat (its times become the view's).
    Every request is O(request): sizes, data bytes and the data-run index that
    answers SEEK_DATA/SEEK_HOLE are computed once, here (a view with too many
    runs for the index seeks through ``Chain.seek``).
    """

    def __init__(
        self,
        chain: Chain,
        name: str | None,
        top_stat: os.stat_result,
        uid: int | None = None,
        gid: int | None = None,
        partitions: Sequence[tuple[str, int, int]] = (),
        disk: Disk | None = None,
    ) -> None:
        self.chain = chain
        self.disk: Disk = chain if disk is None else disk
        self.name = name
        self.file_path = "/" if name is None else "/" + name
        self.size = chain.size
        # once: st_blocks and statfs, and the index that answers SEEK_DATA/SEEK_HOLE
        chain.build_index()
        self.data_bytes = chain.data_bytes()
        self.files: dict[str, _File] = {self.file_path: _File(0, self.size)}
        for pname, start, length in partitions:
            self.files["/" + pname] = _File(start, length)
        self._times = {
            "st_atime": top_stat.st_atime_ns,
            "st_mtime": top_stat.st_mtime_ns,
            "st_ctime": top_stat.st_ctime_ns,
        }
        self._owner = {
            "st_uid": os.getuid() if uid is None else uid,
            "st_gid": os.getgid() if gid is None else gid,
        }
        self._attrs = {path: self._file_attrs(f) for path, f in self.files.items()}
        self._dir_attrs = {
            "st_mode": stat.S_IFDIR | self.dir_mode,
            "st_nlink": 2,
            "st_size": 0,
            "st_blocks": 0,
            "st_blksize": BLKSIZE,
            **self._times,
            **self._owner,
        }

    writable = False
    file_mode = 0o444
    dir_mode = 0o555

    def _file_attrs(self, f: _File) -> dict[str, int]:
        data = self.data_bytes if f == (0, self.size) else window_data_bytes(self.disk, f.start, f.length)
        return {
            "st_mode": stat.S_IFREG | self.file_mode,
            "st_nlink": 1,
            "st_size": f.length,
            "st_blocks": (data + 511) // 512,
            "st_blksize": BLKSIZE,
            **self._times,
            **self._owner,
        }

    def _file(self, path: str) -> _File:
        f = self.files.get(path)
        if f is None:
            raise OSError(errno.EISDIR if path == "/" else errno.ENOENT, path)
        return f

    def getattr(self, path: str) -> dict[str, int]:
        attrs = self._attrs.get(path)
        if attrs is not None:
            return dict(attrs)
        if path == "/":
            return dict(self._dir_attrs)
        raise OSError(errno.ENOENT, path)

    def readdir(self, path: str) -> list[str]:
        if path != "/" or self.name is None:
            raise OSError(errno.ENOTDIR, path)
        return [".", "..", *(p[1:] for p in self.files)]

    def check_open(self, path: str, flags: int) -> None:
        self._file(path)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise OSError(errno.EROFS, path)

    def readinto(self, path: str, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; zeros where the chain has no data. Returns bytes filled."""
        f = self._file(path)
        if f.start == 0 and f.length == self.size:
            return self.disk.readinto(offset, buf)
        n = max(0, min(len(buf), f.length - offset))
        return self.disk.readinto(f.start + offset, buf[:n]) if n else 0

    def seek(self, path: str, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE. Never ENOSYS: the kernel would cache it for the mount's life."""
        f = self._file(path)
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise OSError(errno.EINVAL, "whence")
        if f.start == 0 and f.length == self.size:
            return self.disk.seek(offset, whence)
        return window_seek(self.disk, f.start, f.length, offset, whence)

    def statfs(self) -> dict[str, int]:
        frsize = 4096
        used = (self.data_bytes + frsize - 1) // frsize
        return {
            "f_bsize": BLKSIZE,
            "f_frsize": frsize,
            "f_blocks": used,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": 1 if self.name is None else 1 + len(self.files),
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }
