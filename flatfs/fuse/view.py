"""The flattened chain as one read-only file: no FUSE code here.

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


class View:
    """The flattened chain as one read-only file, optionally inside a folder.

    ``name`` None: single-file root (mounted over a regular file). Otherwise
    the root is a directory holding one file called ``name``. ``top_stat`` is
    the top image's stat (its times become the view's). Every request is
    O(request): sizes, ``data_bytes`` and the data-run index that answers
    SEEK_DATA/SEEK_HOLE are computed once, here, in one pass over the extents
    (a view with too many runs for the index seeks through ``Chain.seek``).
    """

    def __init__(
        self,
        chain: Chain,
        name: str | None,
        top_stat: os.stat_result,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        self.chain = chain
        self.name = name
        self.file_path = "/" if name is None else "/" + name
        self.size = chain.size
        # once: st_blocks and statfs, and the index that answers SEEK_DATA/SEEK_HOLE
        chain.build_index()
        self.data_bytes = chain.data_bytes()
        self._seek = chain.seek
        times = {
            "st_atime": top_stat.st_atime_ns,
            "st_mtime": top_stat.st_mtime_ns,
            "st_ctime": top_stat.st_ctime_ns,
        }
        owner = {"st_uid": os.getuid() if uid is None else uid, "st_gid": os.getgid() if gid is None else gid}
        self._file_attrs = {
            "st_mode": stat.S_IFREG | 0o444,
            "st_nlink": 1,
            "st_size": self.size,
            "st_blocks": (self.data_bytes + 511) // 512,
            "st_blksize": BLKSIZE,
            **times,
            **owner,
        }
        self._dir_attrs = {
            "st_mode": stat.S_IFDIR | 0o555,
            "st_nlink": 2,
            "st_size": 0,
            "st_blocks": 0,
            "st_blksize": BLKSIZE,
            **times,
            **owner,
        }

    def _check_file(self, path: str) -> None:
        if path != self.file_path:
            raise OSError(errno.EISDIR if path == "/" else errno.ENOENT, path)

    def getattr(self, path: str) -> dict[str, int]:
        if path == self.file_path:
            return dict(self._file_attrs)
        if path == "/":
            return dict(self._dir_attrs)
        raise OSError(errno.ENOENT, path)

    def readdir(self, path: str) -> list[str]:
        if path != "/" or self.name is None:
            raise OSError(errno.ENOTDIR, path)
        return [".", "..", self.name]

    def check_open(self, path: str, flags: int) -> None:
        self._check_file(path)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise OSError(errno.EROFS, path)

    def readinto(self, path: str, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; zeros where the chain has no data. Returns bytes filled."""
        self._check_file(path)
        return self.chain.readinto(offset, buf)

    def seek(self, path: str, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE. Never ENOSYS: the kernel would cache it for the mount's life."""
        self._check_file(path)
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise OSError(errno.EINVAL, "whence")
        return self._seek(offset, whence)

    def statfs(self) -> dict[str, int]:
        frsize = 4096
        used = (self.data_bytes + frsize - 1) // frsize
        return {
            "f_bsize": BLKSIZE,
            "f_frsize": frsize,
            "f_blocks": used,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": 1 if self.name is None else 2,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }
