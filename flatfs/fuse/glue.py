"""The mfusepy glue: the only module that imports mfusepy, and only when a mount needs it.

* :func:`load_mfusepy` imports mfusepy on libfuse 3 (``FUSE_LIBRARY_NAME=fuse3``,
  libfuse 3 loaded by soname), or raises MountError, so that ``flatfs info``
  works on a machine without libfuse.
* :func:`serve` runs libfuse's loop over a :class:`~flatfs.fuse.view.View`
  through the classes of :mod:`flatfs.fuse.callbacks` (built over the loaded
  mfusepy, so imported only here, once it is loaded).

This relies on mfusepy internals, not only its documented API: ``FUSE._wrapper``
(overridden), the ``fuse_operations`` ctypes struct (its ``lseek`` slot),
``_libfuse_path``, ``fuse_version_major``/``minor`` and the ``encoding``/``errors``
attributes of ``FUSE``. They stay in this module and callbacks.py; pyproject.toml pins
mfusepy to 3.x. mfusepy is untyped: values from it are ``Any`` in these two modules and nowhere else.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

from ..errors import MountError
from .view import View

ATTR_TIMEOUT = 3600.0  # the view is immutable while mounted: let the kernel cache
LIBFUSE_MIN = (3, 8)  # high-level lseek() appeared in libfuse 3.8
LIBFUSE3_SONAME = "libfuse3.so.3"
PIN_MAX = 64  # libfuse worker threads whose Python thread state we keep
LOGGER = "fuse"  # mfusepy's logger: its per-request lines are noise

_MFUSEPY: Any = None


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
    load_mfusepy()
    from . import callbacks  # its classes subclass mfusepy's: import it only once mfusepy is loaded

    ops_class = callbacks.WritableOperations if view.writable else callbacks.Operations
    ops = ops_class(view, on_init, int(options.get("max_read", 0)))
    callbacks.FlatfsFUSE(ops, mountpoint, foreground=True, raw_fi=True, debug=debug, **options)
