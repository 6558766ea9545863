"""QEMU-compatible advisory image locking.

QEMU's file-posix driver expresses block-layer permissions as OFD byte-range
locks on the image file: byte ``100 + bit`` is read-locked by every user that
*holds* a permission, byte ``200 + bit`` by every user that *does not share*
it. Before it opens, a user checks that nobody holds a permission it will not
share, and that nobody refuses to share a permission it needs.

flatfs opens like ``qemu-img`` opens a read-only image: it holds
CONSISTENT_READ and does not share WRITE or RESIZE. So a running VM that has
the image open for writing makes flatfs refuse, and a VM cannot start writing
an image that flatfs holds. Verified against QEMU's /proc/locks footprint:
a read-only qemu-io holds 100, 201 and 203.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .errors import ImageError

PERM_BASE = 100
SHARED_BASE = 200
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0, 1, 2, 3
PERM_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write", RESIZE: "resize"}

HELD = (CONSISTENT_READ,)
UNSHARED = (WRITE, RESIZE)

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhqqi")
_FLOCK_SIZE = 32  # struct flock on 64-bit Linux, with its padding


class ImageLocked(ImageError):
    errno = errno.EBUSY


def _flock(kind: int, start: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0).ljust(_FLOCK_SIZE, b"\0")


def _locked_by_other(fd: int, byte: int) -> bool:
    out = fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return _FLOCK.unpack(out[: _FLOCK.size])[0] != fcntl.F_UNLCK


def lock_shared_readonly(fd: int, path: str) -> bool:
    """Take a read-only user's locks on ``fd`` (they live as long as the fd).

    Returns False when the file system cannot lock (QEMU then does not lock
    either); raises ImageLocked when another user conflicts.
    """
    try:
        for bit in HELD:
            fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK, PERM_BASE + bit))
        for bit in UNSHARED:
            fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK, SHARED_BASE + bit))
        conflicts = [PERM_NAMES[b] for b in UNSHARED if _locked_by_other(fd, PERM_BASE + b)]
        conflicts += [PERM_NAMES[b] for b in HELD if _locked_by_other(fd, SHARED_BASE + b)]
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            conflicts = ["write"]
        elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOLCK, errno.ENOSYS, errno.EBADF):
            return False
        else:
            raise ImageError(path, f"cannot lock: {exc.strerror}") from None
    if conflicts:
        raise ImageLocked(
            path,
            f"in use by another process (it holds the {conflicts[0]} lock); "
            "use -U/--force-share to read it anyway",
        )
    return True
