"""The mfusepy glue: the only module that imports mfusepy, and only when a mount needs it.

* :func:`load_mfusepy` imports mfusepy on libfuse 3 (``FUSE_LIBRARY_NAME=fuse3``,
  libfuse 3 loaded by soname), or raises MountError, so that ``flatfs info``
  works on a machine without libfuse.
* :func:`serve` runs libfuse's loop over a :class:`~flatfs.fuse.view.View`
  through two classes built over the loaded mfusepy: an ``Operations`` adapter
  (kernel request -> View call, every exception -> :func:`errno_for`) and
  ``FlatfsFUSE``, a ``FUSE`` subclass that adds the ``lseek`` callback mfusepy
  (<= 3.1.1) declares in its libfuse 3 operations struct but never wraps, reads
  straight into libfuse's reply buffer, and pins the Python thread state of
  libfuse's worker threads.

This relies on mfusepy internals, not only its documented API: ``FUSE._wrapper``
(overridden), the ``fuse_operations`` ctypes struct (its ``lseek`` slot),
``_libfuse_path``, ``fuse_version_major``/``minor`` and the ``encoding``/``errors``
attributes of ``FUSE``. They stay in this one module; pyproject.toml pins
mfusepy to 3.x. mfusepy is untyped: values from it are ``Any`` here and nowhere else.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from typing import Any

from ..errors import MountError
from .view import View, errno_for

ATTR_TIMEOUT = 3600.0  # the view is immutable while mounted: let the kernel cache
LIBFUSE_MIN = (3, 8)  # high-level lseek() appeared in libfuse 3.8
LIBFUSE3_SONAME = "libfuse3.so.3"
PIN_MAX = 64  # libfuse worker threads whose Python thread state we keep
LOGGER = "fuse"  # mfusepy's logger: its per-request lines are noise

_MFUSEPY: Any = None
_GLUE: tuple[Any, Any] | None = None


def load_mfusepy() -> Any:
    """Import mfusepy on libfuse 3, or raise MountError.

    mfusepy picks its library at import time: ``FUSE_LIBRARY_PATH`` if set
    (honoured, but still version-checked here), else
    ``find_library(os.environ["FUSE_LIBRARY_NAME"])``, else ``fuse`` (libfuse 2!)
    before ``fuse3``. We set FUSE_LIBRARY_NAME=fuse3 so libfuse 2 is never
    picked; libfuse 2 has no lseek and would report the whole file as data.
    Without FUSE_LIBRARY_PATH, libfuse 3's soname is tried first: the
    dynamic loader finds it without ``find_library``'s ``ldconfig -p`` run
    (about 15 ms of every mount).
    """
    global _MFUSEPY
    if _MFUSEPY is not None:
        return _MFUSEPY
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
    by_soname = "FUSE_LIBRARY_PATH" not in os.environ and _loadable(LIBFUSE3_SONAME)
    if by_soname:
        os.environ["FUSE_LIBRARY_PATH"] = LIBFUSE3_SONAME
    try:
        import mfusepy
    except ImportError as exc:
        raise MountError(f"cannot import mfusepy ({exc}); install flatfs's dependencies") from None
    except (OSError, AttributeError) as exc:
        raise MountError(f"cannot load libfuse 3 ({exc}); install the fuse3 package (libfuse3-3)") from None
    finally:
        if by_soname:
            del os.environ["FUSE_LIBRARY_PATH"]  # not for our children
    ver = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)
    if ver < LIBFUSE_MIN or ver[0] != 3:
        raise MountError(
            f"{mfusepy._libfuse_path}: libfuse {ver[0]}.{ver[1]} loaded, but flatfs needs libfuse "
            f"{LIBFUSE_MIN[0]}.{LIBFUSE_MIN[1]} or later (earlier versions cannot answer SEEK_DATA/SEEK_HOLE)"
        )
    if not any(f[0] == "lseek" for f in mfusepy.fuse_operations._fields_):
        raise MountError("this mfusepy does not declare lseek in its libfuse 3 operations struct")
    _MFUSEPY = mfusepy
    return mfusepy


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def serve(
    view: View, mountpoint: str, options: dict[str, Any], on_init: Callable[[], None], debug: bool
) -> None:
    """Mount ``view`` at ``mountpoint`` and serve it until unmounted or signalled.

    libfuse runs in the foreground (it never daemonises by itself), multithreaded,
    with the mount ``options``; ``on_init`` is called from libfuse's init(), before
    the kernel gets the INIT reply. Raises RuntimeError when ``fuse_main_real``
    returns non-zero (a failed mount, or a signal handled by libfuse).
    """
    flatfs_fuse, operations = _classes()
    ops = operations(view, on_init, int(options.get("max_read", 0)))
    flatfs_fuse(ops, mountpoint, foreground=True, raw_fi=True, debug=debug, **options)


def _negative_errno(exc: Exception, offset: int) -> int:
    """A direct callback's answer to an exception: ``-errno``.

    Operations turns every exception into a FuseOSError (an OSError with its
    errno set); anything else would be a bug in the glue, mapped by errno_for.
    """
    if isinstance(exc, OSError):
        return -(exc.errno or errno.EIO)
    return -errno_for(exc, None, offset)


def _gilstate_ensure() -> None:
    """One ``PyGILState_Ensure`` on the calling thread (which holds the GIL), never released."""
    ctypes.pythonapi.PyGILState_Ensure()


def _classes() -> tuple[Any, Any]:
    """Build (FlatfsFUSE, Operations) classes over the loaded mfusepy."""
    global _GLUE
    if _GLUE is not None:
        return _GLUE
    m = load_mfusepy()
    fuse_base: Any = m.FUSE
    operations_base: Any = m.Operations

    class Operations(operations_base):  # type: ignore[misc]
        """Thin adapter: kernel request -> View call; every exception -> errno_for."""

        use_ns = True

        def __init__(self, view: View, on_init: Callable[[], None], max_read: int) -> None:
            self.view = view
            self.max_read = max_read
            self._on_init = on_init

        @staticmethod
        def _fail(exc: BaseException, path: str | None, offset: int | None = None) -> OSError:
            fail: OSError = m.FuseOSError(errno_for(exc, path, offset))
            return fail

        def init_with_config(self, conn: Any, config: Any) -> None:
            if conn is not None:
                # libfuse 3 refuses INIT (EPROTO) unless this equals -o max_read.
                conn.max_read = self.max_read
            if config is not None:
                config.kernel_cache = 1  # keep the page cache across opens
                config.entry_timeout = ATTR_TIMEOUT
                config.attr_timeout = ATTR_TIMEOUT
                config.negative_timeout = ATTR_TIMEOUT
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

    class FlatfsFUSE(fuse_base):  # type: ignore[misc]
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
        _DIRECT = frozenset({"lseek", "read"})  # callbacks that return -errno themselves

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
                addr = ctypes.cast(buf, ctypes.c_void_p).value
                mv = memoryview((ctypes.c_ubyte * size).from_address(addr)).cast("B")  # type: ignore[arg-type]
                return self.operations.readinto(self._decode(path), mv, offset, fip)
            except Exception as exc:
                return _negative_errno(exc, offset)

        def _decode(self, path: bytes | None) -> str | None:
            return None if path is None else path.decode(self.encoding, self.errors)

    if hasattr(m.FUSE, "lseek_fuse_3"):
        # A later mfusepy with its own suffixed wrapper: FUSE.__init__ refuses a
        # class that has both names, so ours must take the suffixed one.
        FlatfsFUSE.lseek_fuse_3 = FlatfsFUSE.lseek
        del FlatfsFUSE.lseek

    _GLUE = (FlatfsFUSE, Operations)
    return _GLUE
