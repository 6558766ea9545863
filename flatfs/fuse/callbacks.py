"""The FUSE callbacks: libfuse request -> :class:`~flatfs.fuse.view.View` call.

Two classes over mfusepy's, imported by :func:`flatfs.fuse.glue.serve` only once
:func:`~flatfs.fuse.glue.load_mfusepy` has loaded mfusepy on libfuse 3 (so
``flatfs info`` never needs libfuse): ``Operations``, a thin adapter (kernel
request -> View call, every exception -> :func:`errno_for`), and ``FlatfsFUSE``,
a ``FUSE`` subclass that adds the ``lseek`` callback mfusepy (<= 3.1.1) declares
in its libfuse 3 operations struct but never wraps, reads straight into
libfuse's reply buffer, and pins the Python thread state of libfuse's worker
threads. mfusepy itself is imported by glue.py alone; what it hands back is
``Any`` here, as there.
"""

from __future__ import annotations

import ctypes
import errno
import threading
from collections.abc import Callable
from typing import Any

from .glue import ATTR_TIMEOUT, PIN_MAX, load_mfusepy
from .view import View, errno_for
from .writable import WritableView

_m: Any = load_mfusepy()
WRITABLE_ATTR_TIMEOUT = 0.0  # st_blocks of a writable view changes with every write: never cached
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12  # libfuse's fuse_common.h


def _negative_errno(exc: Exception, offset: int) -> int:
    """A direct callback's answer to an exception: ``-errno``.

    Operations turns every exception into a FuseOSError (an OSError with its
    errno set); anything else would be a bug in the glue, mapped by errno_for.
    """
    if isinstance(exc, OSError):
        return -(exc.errno or errno.EIO)
    return -errno_for(exc, None, offset)


def _buffer(buf: Any, size: int) -> memoryview:
    """libfuse's request buffer (a ctypes pointer) as a memoryview: no copy."""
    addr = ctypes.cast(buf, ctypes.c_void_p).value
    return memoryview((ctypes.c_ubyte * size).from_address(addr)).cast("B")  # type: ignore[arg-type]


def _no_auto_inval_data(conn: Any) -> None:
    """Turn off libfuse's default ``auto_inval_data`` for a writable view.

    With it, and an attribute timeout of 0 (st_blocks follows the writes), the
    kernel sends a GETATTR before every read to learn whether the file changed
    behind its page cache: one more round trip per 4 KiB read. Nothing changes a
    view behind the kernel's back (every write to it comes through this mount,
    and partition files, which alias the disk, are direct_io), so the check is
    never needed. ``stat`` still asks every time.
    """
    conn.want &= ~FUSE_CAP_AUTO_INVAL_DATA
    if hasattr(conn, "want_ext"):  # libfuse 3.17: the 64-bit copy of ``want``
        conn.want_ext &= ~FUSE_CAP_AUTO_INVAL_DATA


def _gilstate_ensure() -> None:
    """One ``PyGILState_Ensure`` on the calling thread (which holds the GIL), never released."""
    ctypes.pythonapi.PyGILState_Ensure()


class Operations(_m.Operations):  # type: ignore[misc]
    """Thin adapter: kernel request -> View call; every exception -> errno_for."""

    use_ns = True

    def __init__(self, view: View, on_init: Callable[[], None], max_read: int) -> None:
        self.view = view
        self.max_read = max_read
        self._on_init = on_init

    @staticmethod
    def _fail(exc: BaseException, path: str | None, offset: int | None = None) -> OSError:
        fail: OSError = _m.FuseOSError(errno_for(exc, path, offset))
        return fail

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            # libfuse 3 refuses INIT (EPROTO) unless this equals -o max_read.
            conn.max_read = self.max_read
            if self.view.writable and self.max_read:
                conn.max_write = self.max_read  # 1 MiB writes, not libfuse's 128 KiB default
            if self.view.writable:
                _no_auto_inval_data(conn)
        if config is not None:
            config.kernel_cache = 1  # keep the page cache across opens
            config.entry_timeout = ATTR_TIMEOUT
            config.attr_timeout = ATTR_TIMEOUT
            config.negative_timeout = ATTR_TIMEOUT
            if self.view.writable:
                # st_blocks follows the writes; the kernel asks again after this
                config.attr_timeout = WRITABLE_ATTR_TIMEOUT
                config.kernel_cache = 0 if getattr(self.view, "direct_io", False) else 1
        self._on_init()

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        try:
            return self.view.getattr(path)
        except Exception as exc:
            raise self._fail(exc, path) from None

    def readdir(self, path: str, fh: Any) -> list[str]:
        try:
            return self.view.readdir(path)
        except Exception as exc:
            raise self._fail(exc, path) from None

    def open(self, path: str, fi: Any) -> int:
        try:
            self.view.check_open(path, fi.flags)
        except Exception as exc:
            raise self._fail(exc, path) from None
        fi.keep_cache = 1  # immutable view: never drop cached pages on open
        fi.fh = 0
        return 0

    def readinto(self, path: str | None, buf: memoryview, offset: int, fi: Any) -> int:
        try:
            return self.view.readinto(path or self.view.file_path, offset, buf)
        except Exception as exc:
            raise self._fail(exc, path, offset) from None

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        # Not called by FlatfsFUSE (it uses readinto); present so that
        # FUSE.__init__ registers the read callback, and correct anyway.
        buf = bytearray(size)
        n = self.readinto(path, memoryview(buf), offset, fh)
        return bytes(buf[:n])

    def lseek(self, path: str | None, off: int, whence: int, fi: Any) -> int:
        try:
            return self.view.seek(path or self.view.file_path, off, whence)
        except Exception as exc:
            raise self._fail(exc, path, off) from None

    def statfs(self, path: str) -> dict[str, int]:
        return self.view.statfs()

    def release(self, path: str | None, fi: Any) -> int:
        return 0


class WritableOperations(Operations):
    """Operations of a writable view: writes, zero ranges and discards, fsync; never a new size."""

    view: WritableView

    def open(self, path: str, fi: Any) -> int:
        ret: int = super().open(path, fi)
        if self.view.direct_io:
            fi.direct_io = 1  # partition files alias the disk: no page cache to go stale
            fi.keep_cache = 0
        return ret

    def write(self, path: str | None, data: bytes | memoryview, offset: int, fh: Any) -> int:
        try:
            return self.view.write(path or self.view.file_path, offset, data)
        except Exception as exc:
            raise self._fail(exc, path, offset) from None

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: Any) -> int:
        try:
            self.view.fallocate(path or self.view.file_path, mode, offset, size)
        except Exception as exc:
            raise self._fail(exc, path, offset) from None
        return 0

    def fsync(self, path: str | None, datasync: int, fh: Any) -> int:
        try:
            self.view.fsync(path or self.view.file_path)
        except Exception as exc:
            raise self._fail(exc, path) from None
        return 0

    def flush(self, path: str | None, fh: Any) -> int:
        return 0

    def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
        try:
            self.view.truncate(path or self.view.file_path, length)
        except Exception as exc:
            raise self._fail(exc, path) from None
        return 0


class FlatfsFUSE(_m.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with two callbacks of our own, on worker threads that keep their Python state.

    ``lseek``: mfusepy's struct has the libfuse 3 ``lseek`` slot
    (``off_t (*)(const char *, off_t, int, struct fuse_file_info *)``) and
    FUSE.__init__ fills every slot whose name the Operations object has,
    wrapping the FUSE method of the same name with ``_wrapper`` (which
    turns an OSError into ``-errno``). 3.1.1 has no ``FUSE.lseek`` method,
    so we add it; it returns the new offset, or -errno.

    ``read``: the stock wrapper takes ``bytes`` from Operations.read and
    memmoves them into libfuse's buffer. We hand the Operations a
    memoryview of that buffer instead, so data lands in it directly.

    Both are the hot callbacks (``qemu-img map`` sends thousands of
    lseeks) and turn every exception into ``-errno`` themselves, so
    :meth:`_wrapper` calls them directly rather than through mfusepy's
    generic wrapper (its two ``try`` levels and ``**kwargs``).

    Thread states: every callback enters Python through a ctypes callback,
    which on a libfuse worker thread (a thread Python did not start) creates
    a Python thread state with ``PyGILState_Ensure`` and destroys it again
    with ``PyGILState_Release`` when the callback returns: about half the
    cost of a small request such as an lseek. :meth:`_wrapper` pins the
    thread state of each worker thread on its first request (one extra
    ``PyGILState_Ensure``, never released), so later requests on that
    thread reuse it. libfuse keeps its idle workers by default (3.12 and
    later); :data:`PIN_MAX` bounds what threads that come and go (``-o
    max_idle_threads=N``) could leave behind.
    """

    operations: Operations
    _pinned = threading.local()  # per thread state: .on once pinned
    _pin_lock = threading.Lock()
    _pin_count = 0
    _DIRECT = frozenset({"lseek", "read", "write"})  # callbacks that return -errno themselves

    def _wrapper(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not getattr(self._pinned, "on", False):
            self._pin()
        if func.__name__ in self._DIRECT:
            return func(*args)
        return super()._wrapper(func, *args, **kwargs)

    def _pin(self) -> None:
        cls = type(self)
        with cls._pin_lock:
            if cls._pin_count >= PIN_MAX:
                return
            cls._pin_count += 1
        _gilstate_ensure()
        self._pinned.on = True

    def lseek(self, path: bytes | None, off: int, whence: int, fip: Any) -> int:
        try:
            return self.operations.lseek(self._decode(path), off, whence, fip)
        except Exception as exc:
            return _negative_errno(exc, off)

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        if size <= 0:
            return 0
        try:
            return self.operations.readinto(self._decode(path), _buffer(buf, size), offset, fip)
        except Exception as exc:
            return _negative_errno(exc, offset)

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        # Registered only for a writable view (WritableOperations has write). The stock
        # wrapper copies the request into bytes; we hand over a memoryview of libfuse's
        # buffer, valid for this call (the writable disk writes synchronously).
        if size <= 0:
            return 0
        try:
            done: int = self.operations.write(self._decode(path), _buffer(buf, size), offset, fip)
            return done
        except Exception as exc:
            return _negative_errno(exc, offset)

    def _decode(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)


if hasattr(_m.FUSE, "lseek_fuse_3"):
    # A later mfusepy with its own suffixed wrapper: FUSE.__init__ refuses a
    # class that has both names, so ours must take the suffixed one.
    FlatfsFUSE.lseek_fuse_3 = FlatfsFUSE.lseek
    del FlatfsFUSE.lseek
