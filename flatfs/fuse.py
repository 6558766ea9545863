"""The read-only FUSE view of a flattened chain: the only module that imports mfusepy.

Three parts, top to bottom:

* :class:`View` -- FUSE-free. One file (plus, in directory mode, its folder):
  attributes, reads, SEEK_DATA/SEEK_HOLE, statfs. It only translates to the
  chain's ``readinto``/``seek``; :func:`errno_for` is the one place where an
  exception becomes an errno.
* The mfusepy glue, built lazily by :func:`_glue` so that ``flatfs info`` works
  on a machine without libfuse: an ``Operations`` adapter, and a ``FUSE``
  subclass that adds the ``lseek`` callback mfusepy (<= 3.1.1) declares in its
  libfuse 3 operations struct but never wraps, and reads straight into
  libfuse's reply buffer.
* Mount orchestration: mountpoint checks, libfuse 3 forcing, the background
  daemon with its ready pipe, sd_notify, ``umount``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import logging.handlers
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .chain import SEEK_DATA, SEEK_HOLE, Chain, OpenOptions, open_chain
from .errors import FlatfsError, ImageError, MountError

log = logging.getLogger("flatfs.fuse")

FSTYPE_SUBTYPE = "flatfs"  # the mount shows as fstype "fuse.flatfs"
FSTYPE = "fuse." + FSTYPE_SUBTYPE
MAX_READ = 1 << 20  # largest read request we ask the kernel for (max_read, max_pages)
BLKSIZE = 1 << 20  # st_blksize: the I/O size tools should use on the view
ATTR_TIMEOUT = 3600.0  # the view is immutable while mounted: let the kernel cache
LIBFUSE_MIN = (3, 8)  # high-level lseek() appeared in libfuse 3.8
READY_PROBE = 4096  # bytes read through the mount before we call it live
LIBFUSE3_SONAME = "libfuse3.so.3"
PIN_MAX = 64  # libfuse worker threads whose Python thread state we keep


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
        code = getattr(exc, "errno", None) or errno.EIO
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
    key = (path or "", key or message)
    with _log_lock:
        if key in _LOGGED:
            return
        if len(_LOGGED) >= _LOGGED_MAX:
            if len(_LOGGED) == _LOGGED_MAX:
                _LOGGED.add(("", "<suppressed>"))
                log.error("too many distinct errors; not logging any more of them")
            return
        _LOGGED.add(key)
    where = f"{path or '?'}" + (f" at offset 0x{offset:x}" if offset is not None else "")
    log.error("%s: %s", where, message)
    if tb:
        log.error("%s", tb.rstrip())


# ---------------------------------------------------------------------------
# the view: FUSE-free
# ---------------------------------------------------------------------------


def view_name(image: str) -> str:
    """``vm.qcow2`` -> ``vm.raw``: the top image's name without its last suffix, plus .raw."""
    stem, _ = os.path.splitext(os.path.basename(os.path.normpath(image)))
    return (stem or os.path.basename(image)) + ".raw"


class View:
    """The flattened chain as one read-only file, optionally inside a folder.

    ``name`` None: single-file root (mounted over a regular file). Otherwise
    the root is a directory holding one file called ``name``. Every request is
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


# ---------------------------------------------------------------------------
# mfusepy glue (lazy)
# ---------------------------------------------------------------------------

_MFUSEPY: Any = None
_GLUE: tuple[type, type] | None = None


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


def _glue() -> tuple[type, type]:
    """Build (FlatfsFUSE, Operations) classes over the loaded mfusepy."""
    global _GLUE
    if _GLUE is not None:
        return _GLUE
    m = load_mfusepy()

    class FlatfsFUSE(m.FUSE):
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
                mv = memoryview((ctypes.c_ubyte * size).from_address(addr)).cast("B")
                return self.operations.readinto(self._decode(path), mv, offset, fip)
            except Exception as exc:
                return _negative_errno(exc, offset)

        def _decode(self, path: bytes | None) -> str | None:
            return None if path is None else path.decode(self.encoding, self.errors)

    if hasattr(m.FUSE, "lseek_fuse_3"):
        # A later mfusepy with its own suffixed wrapper: FUSE.__init__ refuses a
        # class that has both names, so ours must take the suffixed one.
        FlatfsFUSE.lseek_fuse_3 = FlatfsFUSE.lseek  # type: ignore[attr-defined]
        del FlatfsFUSE.lseek

    class Operations(m.Operations):
        """Thin adapter: kernel request -> View call; every exception -> errno_for."""

        use_ns = True

        def __init__(self, view: View, on_init: Callable[[], None], max_read: int) -> None:
            self.view = view
            self.max_read = max_read
            self._on_init = on_init

        @staticmethod
        def _fail(exc: BaseException, path: str | None, offset: int | None = None) -> m.FuseOSError:
            return m.FuseOSError(errno_for(exc, path, offset))

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

    _GLUE = (FlatfsFUSE, Operations)
    return _GLUE


# ---------------------------------------------------------------------------
# mount table helpers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


def _unescape(s: str) -> str:
    """Undo the kernel's octal escapes (\\040 for space) in /proc/self/mountinfo."""
    if "\\" not in s:
        return s
    out = bytearray()
    raw = s.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def mounts() -> list[MountEntry]:
    """This namespace's mounts, in mount order (a later entry covers an earlier one)."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split()
                try:
                    sep = parts.index("-", 6)
                except ValueError:
                    continue
                out.append(MountEntry(_unescape(parts[4]), parts[sep + 1], _unescape(parts[sep + 2])))
    except OSError:
        pass
    return out


def find_mount(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path`` (already a real path)."""
    found = None
    for e in mounts():
        if e.mountpoint == path:
            found = e
    return found


def _fuse_opt_escape(value: str) -> str:
    """libfuse splits -o on commas; a backslash escapes the next character."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


# ---------------------------------------------------------------------------
# mount
# ---------------------------------------------------------------------------


@dataclass
class MountRequest:
    image: str
    mountpoint: str
    options: OpenOptions = field(default_factory=OpenOptions)
    foreground: bool = False
    allow_other: bool = False
    debug: bool = False
    fuse_options: tuple[str, ...] = ()


def check_mountpoint(mountpoint: str) -> tuple[str, bool]:
    """Return (real path, is_dir); refuse a missing, stale, busy or odd mountpoint."""
    path = os.path.realpath(mountpoint)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"{mountpoint}: mountpoint does not exist") from None
    except OSError as exc:
        dead = exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        hint = f" (a dead FUSE mount? try: flatfs umount {mountpoint})" if dead else ""
        raise MountError(f"{mountpoint}: cannot use as mountpoint: {exc.strerror}{hint}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise MountError(f"{mountpoint}: mountpoint must be a directory or a regular file")
    busy = find_mount(path)
    if busy is not None or (stat.S_ISDIR(st.st_mode) and os.path.ismount(path)):
        what = f" ({busy.fstype} from {busy.source})" if busy else ""
        hint = f"; to unmount it: flatfs umount {mountpoint}" if busy and busy.fstype == FSTYPE else ""
        raise MountError(f"{mountpoint}: already a mount point{what}{hint}")
    return path, stat.S_ISDIR(st.st_mode)


def _fuse_kwargs(req: MountRequest, image: str) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "fsname": _fuse_opt_escape(os.path.abspath(image)),
        "subtype": FSTYPE_SUBTYPE,
        "ro": True,
        "default_permissions": True,
        "max_read": MAX_READ,
    }
    if req.allow_other:
        kw["allow_other"] = True
    for group in req.fuse_options:
        for opt in group.split(","):
            opt = opt.strip()
            if not opt:
                continue
            key, eq, val = opt.partition("=")
            if key == "rw":
                raise MountError("-o rw: the view is read-only")
            if key in ("fsname", "subtype"):
                raise MountError(f"-o {key}: flatfs sets {key} itself (umount relies on it)")
            kw[key] = val if eq else True
    return kw


class StderrCapture:
    """Point fd 2 at a pipe while libfuse mounts, so its one-line complaints
    ("fuse: unknown option(s): ...") can become our one-line error.

    Lines are kept (the last few) and, with ``echo``, copied to the real stderr.
    """

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.lines: list[str] = []
        self._saved: int | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        sys.stderr.flush()
        r, w = os.pipe()
        self._saved = os.dup(2)
        os.dup2(w, 2)
        os.close(w)
        self._thread = threading.Thread(target=self._pump, args=(r,), name="flatfs-stderr", daemon=True)
        self._thread.start()

    def _pump(self, r: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                if self.echo:
                    with self._lock:  # stop() swaps fd 2 back under this lock
                        try:
                            os.write(2 if self._saved is None else self._saved, chunk)
                        except OSError:
                            pass
                pending += chunk
                *done, pending = pending.split(b"\n")
                with self._lock:
                    self.lines.extend(x.decode("utf-8", "replace") for x in done)
                    del self.lines[:-50]
        finally:
            if pending:
                with self._lock:
                    self.lines.append(pending.decode("utf-8", "replace"))
            os.close(r)

    def stop(self) -> None:
        """Give fd 2 back. Idempotent; safe from any thread."""
        with self._lock:
            saved, self._saved = self._saved, None
            if saved is None:
                return
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def last_line(self) -> str | None:
        with self._lock:
            for line in reversed(self.lines):
                line = line.strip()
                if line and not line.startswith("Traceback"):
                    return line
        return None


def sd_notify(address: str | None, message: str) -> None:
    """Send one sd_notify datagram (``READY=1`` ...) to ``address``; no libsystemd needed.

    ``@name`` is an abstract socket; only AF_UNIX addresses are supported.
    """
    if not address:
        return
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        log.warning("NOTIFY_SOCKET=%s: unsupported address, not notifying", address)
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(target)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)


def _detach(mountpoint: str) -> None:
    """Lazily unmount ``mountpoint``, which makes a serving loop return."""
    try:
        subprocess.run(
            ["fusermount3", "-u", "-z", "-q", mountpoint],
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        pass
    if find_mount(mountpoint) is not None and os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(os.fsencode(mountpoint), 2)  # MNT_DETACH


def _bump_readahead(st_dev: int) -> None:
    """Best effort: let buffered readers of the view fetch up to MAX_READ at once.

    The kernel offers FUSE 128 KiB of readahead and libfuse can only lower it;
    the bdi's read_ahead_kb in sysfs can raise it (root only).
    """
    p = f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb"
    try:
        with open(p, "w") as f:
            f.write(str(MAX_READ // 1024))
    except OSError:
        pass


class _Server:
    """One mount: open chain -> View -> FUSE loop, with a ready check from init()."""

    def __init__(
        self,
        req: MountRequest,
        mountpoint: str,
        is_dir: bool,
        on_ready: Callable[[], None],
        echo_stderr: bool,
    ) -> None:
        self.req = req
        self.mountpoint = mountpoint
        self.is_dir = is_dir
        self.on_ready = on_ready
        self.capture = StderrCapture(echo=echo_stderr)
        self.ready = threading.Event()
        self.error: str | None = None
        self.view_path = ""
        self._pre_dev = 0

    def run(self) -> None:
        """Serve until unmounted or signalled. Raises MountError if the mount never got live."""
        FlatfsFUSE, Operations = _glue()
        # The view reads exactly the data it needs, in 1 MiB requests: no readahead (see OpenOptions)
        chain = open_chain(self.req.image, dataclasses.replace(self.req.options, readahead=False))
        try:
            top = chain.layers[0]
            view = View(
                chain, view_name(self.req.image) if self.is_dir else None, os.fstat(chain.host_files()[0].fd)
            )
            self.view_path = os.path.join(self.mountpoint, view.name) if view.name else self.mountpoint
            self._pre_dev = os.stat(self.mountpoint).st_dev
            kwargs = _fuse_kwargs(self.req, top.path)
            ops = Operations(view, self._start_ready_check, int(kwargs.get("max_read", 0)))
            os.chdir("/")  # paths are absolute by now; do not pin a cwd
            self.capture.start()
            try:
                FlatfsFUSE(ops, self.mountpoint, foreground=True, raw_fi=True, debug=self.req.debug, **kwargs)
                failed = None
            except RuntimeError as exc:  # fuse_main_real returned non-zero
                failed = exc
            finally:
                self.capture.stop()
        finally:
            chain.close()
        if self.ready.is_set():
            # Unmounted, or SIGTERM/SIGINT/SIGHUP handled by libfuse (which makes
            # fuse_main_real return 1): a clean shutdown either way.
            if failed is not None:
                log.debug("FUSE loop ended: %s", failed)
            return
        if self.error:
            raise MountError(f"{self.req.mountpoint}: {self.error}")
        detail = self.capture.last_line() or "mount failed"
        raise MountError(f"{self.req.mountpoint}: {detail}")

    def _start_ready_check(self) -> None:
        # Called from libfuse's init(), before the kernel gets the INIT reply:
        # requests through the mount would wait for us, so check from a thread.
        threading.Thread(target=self._ready_check, name="flatfs-ready", daemon=True).start()

    def _ready_check(self) -> None:
        try:
            st = os.stat(self.view_path)
            if st.st_dev == self._pre_dev:
                raise MountError("the mount did not appear (is it in another mount namespace?)")
            fd = os.open(self.view_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.pread(fd, READY_PROBE, 0)
            finally:
                os.close(fd)
            _bump_readahead(st.st_dev)
        except Exception as exc:
            self.error = str(exc) if isinstance(exc, FlatfsError) else f"mount is not usable: {exc}"
            _detach(self.mountpoint)
            return
        self.capture.stop()
        self.ready.set()
        try:
            self.on_ready()
        except Exception:
            log.exception("ready notification failed")


def _setup_logging(debug: bool, to_syslog: bool) -> None:
    root = logging.getLogger("flatfs")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if to_syslog and os.path.exists("/dev/log"):
        try:
            h: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
            h.setFormatter(logging.Formatter(f"flatfs[{os.getpid()}]: %(message)s"))
        except OSError:
            h = logging.NullHandler()
    elif to_syslog:
        h = logging.NullHandler()
    else:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("flatfs: %(message)s"))
    root.handlers[:] = [h]
    mlog = logging.getLogger("fuse")  # mfusepy's logger: its per-request lines are noise
    mlog.setLevel(logging.INFO if debug else logging.WARNING)
    mlog.handlers[:] = [h]
    mlog.propagate = False


def mount(req: MountRequest) -> None:
    """``flatfs mount``: return once the view is live (background) or after unmount (foreground)."""
    mountpoint, is_dir = check_mountpoint(req.mountpoint)
    load_mfusepy()
    foreground = req.foreground or req.debug
    if foreground:
        notify = os.environ.pop("NOTIFY_SOCKET", None)  # not for our children (fusermount3)
        _setup_logging(req.debug, to_syslog=False)
        srv = _Server(
            req,
            mountpoint,
            is_dir,
            echo_stderr=req.debug,
            on_ready=lambda: sd_notify(notify, f"READY=1\nSTATUS=serving {srv.view_path}\n"),
        )
        try:
            srv.run()
        finally:
            if srv.ready.is_set():
                sd_notify(notify, "STOPPING=1\n")
        return
    _daemonize(req, mountpoint, is_dir)


def _daemonize(req: MountRequest, mountpoint: str, is_dir: bool) -> None:
    """Fork; the child serves, the parent waits for "ready" or the child's one-line error."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()  # O_CLOEXEC: fusermount3 & co. never hold it
    pid = os.fork()
    if pid == 0:  # --- the daemon
        code = 1
        try:
            os.close(r)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            _setup_logging(False, to_syslog=True)

            def ready() -> None:
                os.write(w, b"ready\n")
                os.close(w)

            _Server(req, mountpoint, is_dir, on_ready=ready, echo_stderr=False).run()
            code = 0
        except FlatfsError as exc:
            _report(w, str(exc))
        except BaseException as exc:  # a bug: say so in one line, keep the rest for syslog
            log.error("%s", traceback.format_exc())
            _report(w, f"internal error: {exc!r}")
        finally:
            os._exit(code)
    # --- the parent
    os.close(w)
    msg = bytearray()

    def wait_line() -> str:
        while not msg.endswith(b"\n"):
            chunk = os.read(r, 4096)
            if not chunk:
                break
            msg.extend(chunk)
        return msg.decode("utf-8", "replace").strip()

    try:
        text = wait_line()
    except KeyboardInterrupt:
        # The daemon is in its own session and did not see the ^C. Let it
        # finish, then take its mount down again: nothing is left behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if wait_line() == "ready":
            _detach(mountpoint)
        os.waitpid(pid, 0)
        raise MountError(f"{req.mountpoint}: interrupted; nothing mounted") from None
    finally:
        os.close(r)
    if text == "ready":
        return
    _, status = os.waitpid(pid, 0)
    if text.startswith("error "):
        raise MountError(text[len("error ") :])
    raise MountError(
        f"{req.mountpoint}: mount daemon exited before the mount was ready "
        f"(status {os.waitstatus_to_exitcode(status)})"
    )


def _report(w: int, message: str) -> None:
    try:
        os.write(w, ("error " + " ".join(message.split()) + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


# ---------------------------------------------------------------------------
# umount
# ---------------------------------------------------------------------------


def umount(mountpoint: str, lazy: bool = False, quiet: bool = False) -> None:
    """``flatfs umount``: fusermount3 -u, but only for a flatfs mount.

    ``quiet``: succeed silently when nothing is mounted there (for ExecStopPost=).
    A dead mount (its daemon killed) is still a flatfs mount and is unmounted.
    """
    path = os.path.realpath(mountpoint)
    entry = find_mount(path)
    if entry is None:
        if quiet:
            return
        raise MountError(f"{mountpoint}: not mounted")
    if entry.fstype != FSTYPE:
        raise MountError(f"{mountpoint}: not a flatfs mount (it is {entry.fstype} from {entry.source})")
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    try:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot run fusermount3: {exc.strerror}") from None
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        if "busy" in why.lower() and not lazy:
            why += " (use --lazy to detach it now and unmount once it is no longer in use)"
        raise MountError(f"{mountpoint}: {why}")
