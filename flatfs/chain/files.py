"""Opening host files safely: the type before the open, one descriptor's identity, the
open-files limit, and what a file's head looks like. The chain's policy (open.py) is built
on these; nothing here knows about images."""

from __future__ import annotations

import codecs
import errno
import os
import resource
import stat
from collections.abc import Callable

from ..formats.api import PROBE_SIZE

# How much of a file an image names as raw data is checked for text, at open
TEXT_PROBE = 4096
_WHITESPACE = dict.fromkeys(map(ord, "\t\n\v\f\r"))


def open_checked(path: str, check: Callable[[os.stat_result], None]) -> int:
    """Open ``path`` for reading only once ``check`` accepted what it is.

    The type is read through an ``O_PATH`` descriptor, which opens nothing
    for reading (a FIFO does not block, a device driver's open is not
    called); the file is then reopened through that descriptor, so the
    check and the open see the same file even if the name is swapped in
    between. ``check`` raises to refuse; an OSError is the caller's to map.
    """
    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(pfd)
        check(st)
        # O_NONBLOCK: a FIFO let through by --allow-special must not block the open
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = os.open(f"/proc/self/fd/{pfd}", flags)
        except FileNotFoundError:  # no /proc: open the name, then verify it is the same file
            fd = os.open(path, flags)
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                raise OSError(errno.ESTALE, "the file changed while it was opened") from None
    finally:
        os.close(pfd)
    return fd


def room_for(count: int) -> None:
    """Raise the soft open-files limit toward the hard one when a deep chain needs ``count``
    descriptors; past the hard limit, the open that fails says EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or count < soft:
        return
    want = max(count, soft * 2)
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (OSError, ValueError):
            pass


def looks_like_text(head: bytes) -> bool:
    """No NUL byte, UTF-8 (a character cut at the end aside), printable or whitespace only;
    but not one byte repeated: a fill pattern (``qemu-io -c 'write -P 0x41'``) holds no secret."""
    if not head or b"\0" in head or head.count(head[:1]) == len(head):
        return False
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return text.translate(_WHITESPACE).isprintable()


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def open_regular(path: str) -> int | None:
    """A read-only fd of ``path`` if it is a regular file, else None: the one safe open of a
    file flatfs merely looks at (a registry, a scanned candidate). Its type is read before
    it is opened (open_checked): a FIFO or a device is never opened, the open could block or
    have side effects."""

    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EPERM, "not a regular file")

    try:
        return open_checked(path, check)
    except OSError:
        return None


def scan_head(path: str) -> bytes | None:
    """The head of a file found by a scan; None unless it is (still) a regular file."""
    fd = open_regular(path)
    if fd is None:
        return None
    try:
        return os.pread(fd, PROBE_SIZE, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
