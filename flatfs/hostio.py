"""Host file I/O shared by formats, the chain and consumers.

Exact preadv/pwritev, SEEK_DATA/SEEK_HOLE runs, the size of a file or block
device, and QEMU-compatible image locks. Every OSError becomes an
ImageIOError naming the file and offset.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator, Sequence

from .errors import ImageError, ImageIOError


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
    now = host_size(fd, path)
    if now < expect_size:
        err = ImageIOError(path, f"file shrank from {expect_size} to {now} bytes while open", pos)
        raise err


def host_size(fd: int, path: str) -> int:
    """The size of a regular file, or of a block device (whose st_size is 0)."""
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return st.st_size
    except OSError as exc:
        raise ImageIOError.from_oserror(path, exc) from None


def pwritev_all(fd: int, bufs: Sequence[memoryview | bytes | bytearray], offset: int, path: str) -> int:
    """Write every byte of ``bufs`` at ``offset`` (retrying short writes); return the count."""
    views = [memoryview(b).cast("B") for b in bufs]
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        try:
            n = os.pwritev(fd, views, offset + done)
        except OSError as exc:
            raise ImageIOError.from_oserror(path, exc, offset + done) from None
        if n <= 0:
            raise ImageIOError(path, "write made no progress", offset + done)
        done += n
        while n and views:  # drop what was written; retry the rest
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
    return total


# ---------------------------------------------------------------------------
# QEMU-compatible advisory image locking
# ---------------------------------------------------------------------------
# QEMU's file-posix driver expresses block-layer permissions as OFD byte-range
# locks on the image file: byte ``100 + bit`` is read-locked by every user that
# *holds* a permission, byte ``200 + bit`` by every user that *does not share*
# it. Before it opens, a user checks that nobody holds a permission it will not
# share, and that nobody refuses to share a permission it needs.
#
# flatfs opens like ``qemu-img`` opens a read-only image: it holds
# CONSISTENT_READ and does not share WRITE or RESIZE. So a running VM that has
# the image open for writing makes flatfs refuse, and a VM cannot start writing
# an image that flatfs holds. Verified against QEMU's /proc/locks footprint:
# a read-only qemu-io holds 100, 201 and 203.

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


def _flock(kind: int, start: int, length: int = 1) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0).ljust(_FLOCK_SIZE, b"\0")


def _locked_by_other(fd: int, byte: int) -> bool:
    out = fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return bool(_FLOCK.unpack(out[: _FLOCK.size])[0] != fcntl.F_UNLCK)


_NO_LOCKING = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOLCK, errno.ENOSYS, errno.EBADF)


def _take_locks(fd: int, path: str, held: Sequence[int], unshared: Sequence[int], hint: str) -> bool:
    """Hold the ``held`` permissions, refuse to share ``unshared``; ImageLocked on a conflict."""
    try:
        for bit in held:
            fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK, PERM_BASE + bit))
        for bit in unshared:
            fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK, SHARED_BASE + bit))
        conflicts = [
            f"it holds the {PERM_NAMES[b]} lock" for b in unshared if _locked_by_other(fd, PERM_BASE + b)
        ]
        conflicts += [
            f"it does not share {PERM_NAMES[b]}" for b in held if _locked_by_other(fd, SHARED_BASE + b)
        ]
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            conflicts = ["it holds the write lock"]
        elif exc.errno in _NO_LOCKING:
            return False
        else:
            raise ImageError(path, f"cannot lock: {exc.strerror}") from None
    if conflicts:
        raise ImageLocked(path, f"in use by another process ({conflicts[0]}); {hint}")
    return True


def lock_shared_readonly(fd: int, path: str) -> bool:
    """Take a read-only user's locks on ``fd`` (they live as long as the fd).

    Returns False when the file system cannot lock (QEMU then does not lock
    either); raises ImageLocked when another user conflicts.
    """
    return _take_locks(fd, path, HELD, UNSHARED, "use -U/--force-share to read it anyway")


# A writer (``flatfs convert -n`` into an existing image file or device) holds
# CONSISTENT_READ and WRITE and shares neither WRITE nor RESIZE: a VM using the
# image, a flatfs view of it, or a second ``convert -n`` makes it refuse, and
# none of them can start while it writes.
WRITER_HELD = (CONSISTENT_READ, WRITE)
WRITER_UNSHARED = (WRITE, RESIZE)


def lock_for_writing(fd: int, path: str) -> bool:
    """Take a writer's locks on ``fd`` (``fd`` open read-write; they live as long as the fd)."""
    return _take_locks(fd, path, WRITER_HELD, WRITER_UNSHARED, "refusing to write into it")


def try_lock_whole(fd: int, exclusive: bool) -> bool | None:
    """Try an OFD lock over the whole file: True taken, False held by another, None cannot lock here.

    OFD locks belong to the open file, not to a process: they work between
    threads, across PID namespaces, and (through the lock manager) across
    the hosts of a shared folder. ``exclusive`` needs ``fd`` open for writing.
    """
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _flock(kind, 0, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in _NO_LOCKING:
            return None
        raise
    return True
