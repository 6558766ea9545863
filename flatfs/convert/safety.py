"""TARGET appears whole or not at all: a temporary file, fsync, rename, signals, stale temporaries.

The image is written into a temporary file next to TARGET
(``.NAME.flatfs-tmp-PID-RANDOM``, locked by its writer), fsynced and renamed
into place without replacing anything (unless ``force``), and the folder is
fsynced. Any error, SIGINT, SIGTERM, SIGHUP or a full disk removes the
temporary file and leaves no TARGET (an existing TARGET replaced with
``force`` stays untouched). Temporary files left by a killed run are removed
by the next run in the same folder once nobody holds their lock.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..chain import Chain
from ..errors import ConvertError, ImageIOError
from ..hostio import try_lock_whole

TMP_MARK = ".flatfs-tmp-"

_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s)


class Interrupted(ConvertError):
    """The conversion was stopped by a signal; nothing was left behind."""

    def __init__(self, signum: int, target: str, outcome: str = "nothing written") -> None:
        self.signum = signum
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(f"{target}: conversion interrupted by {name}; {outcome}")


def destination(target: str | os.PathLike[str]) -> str:
    """The file a conversion to ``target`` really replaces (a symlink's target)."""
    target = os.fspath(target)
    if os.path.islink(target):
        return os.path.realpath(target)
    return os.path.abspath(target)


def refuse_chain_member(target: str, st: os.stat_result | None, real: str, chains: Sequence[Chain]) -> None:
    """Refuse a TARGET that is one of the chains' files (even with force), by inode, device or path."""
    for chain in chains:
        for host in chain.host_files():
            try:
                lst: os.stat_result | None = os.fstat(host.fd)
            except OSError:
                lst = None
            same = st is not None and lst is not None and (st.st_dev, st.st_ino) == (lst.st_dev, lst.st_ino)
            if st is not None and lst is not None and stat.S_ISBLK(st.st_mode) and stat.S_ISBLK(lst.st_mode):
                same = same or st.st_rdev == lst.st_rdev
            if same or os.path.realpath(host.path) == real:
                raise ConvertError(
                    f"{target}: refusing to write over {host.path}, which is part of "
                    "the chain being read (even with --force)"
                )


def check_target(target: str, dest: str, chains: Sequence[Chain], force: bool) -> None:
    """Refuse a TARGET that is part of a chain (even with force) or exists (without force)."""
    try:
        st: os.stat_result | None = os.stat(dest)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ImageIOError.from_oserror(target, exc) from None
    refuse_chain_member(target, st, os.path.realpath(dest), chains)
    folder = os.path.dirname(dest)
    if not os.path.isdir(folder):
        raise ConvertError(f"{target}: folder {folder} does not exist")
    if st is not None:
        if stat.S_ISBLK(st.st_mode):
            raise ConvertError(
                f"{target}: is a block device; use -n to write the image into it "
                "(its old contents are overwritten)"
            )
        if not stat.S_ISREG(st.st_mode):
            raise ConvertError(f"{target}: exists and is not a regular file; refusing to replace it")
        if not force:
            raise ConvertError(f"{target}: already exists (use --force to overwrite, or -n to write into it)")


# -- temporary files ------------------------------------------------------------------
#
# A temporary file is ``.NAME.flatfs-tmp-PID-XXXXXXXX`` (8 hex digits) next to
# TARGET. Its writer holds an exclusive OFD lock on it for the whole run (taken
# right after the O_EXCL create, and checked to be on the file the name still
# names). A temporary is stale only when that lock can be taken: the PID in the
# name is informative only, since a live writer may be on another host of a
# shared folder or in another PID namespace, where its PID means nothing.

_TEMP_NAME = re.compile(r"\..+" + re.escape(TMP_MARK) + r"[0-9]+-[0-9a-f]{8}")


def temp_prefix(dest: str) -> str:
    return f".{os.path.basename(dest)}{TMP_MARK}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is exactly a flatfs temporary file's name."""
    return _TEMP_NAME.fullmatch(name) is not None


def _same_file(path: str, fd: int) -> bool:
    try:
        st = os.lstat(path)
        fst = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def remove_stale_temps(dest: str) -> list[str]:
    """Remove the temporary files in ``dest``'s folder whose writer no longer holds their lock.

    Any TARGET's temporaries count, not only ``dest``'s; only names of
    flatfs's exact pattern, only regular files, and only when the lock is
    ours to take (a file system that cannot lock keeps them all).
    """
    folder = os.path.dirname(dest) or "."
    removed: list[str] = []
    try:
        names = [e.name for e in os.scandir(folder) if is_temp_name(e.name)]
    except OSError:
        return removed
    for name in sorted(names):
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            continue  # gone, a symlink, or not ours to read: not ours to remove
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            # A shared lock conflicts with the writer's exclusive one; held
            # until the unlink, it also keeps a writer that has just created
            # the file from taking its lock (it then starts over).
            if try_lock_whole(fd, exclusive=False) is not True:
                continue
            if not _same_file(path, fd):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ImageIOError.from_oserror(path, exc) from None
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def create_temp(target: str, dest: str) -> tuple[str, int]:
    """Create and lock a fresh temporary file next to ``dest``: (path, fd)."""
    folder = os.path.dirname(dest)
    for _ in range(100):
        tmp = os.path.join(folder, f"{temp_prefix(dest)}{os.getpid()}-{os.urandom(4).hex()}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ImageIOError.from_oserror(target, exc) from None
        try:
            held = try_lock_whole(fd, exclusive=True)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(tmp)
            raise ImageIOError.from_oserror(target, exc) from None
        if held is False or not _same_file(tmp, fd):
            # Another run's stale-file sweep got to it between the create and
            # the lock: it removes the file; start over under a new name.
            os.close(fd)
            continue
        return tmp, fd
    raise ConvertError(f"{target}: cannot create a temporary file in {folder}")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- putting TARGET in place ----------------------------------------------------------

AT_FDCWD = -100
RENAME_NOREPLACE = 1
_libc: Any = None


def _renameat2(src: str, dst: str, flags: int) -> None:
    """renameat2(2) through libc; OSError(ENOSYS) where libc lacks it."""
    import ctypes  # here: only the rename needs it

    global _libc
    if _libc is None:
        # the C library this process already runs on: find_library("c") would run
        # `ldconfig -p` in a child process (measured 10-30 ms of every convert)
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


_NO_NOREPLACE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), atomically.

    renameat2(RENAME_NOREPLACE); where the file system lacks it, link(2) then
    unlink(2) of the old name (link never replaces either); where it has no
    hard links (FAT), ``dst`` is first claimed with an O_EXCL create and the
    rename then replaces only that empty placeholder.
    """
    try:
        _renameat2(src, dst, RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno not in _NO_NOREPLACE:
            raise
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
    else:
        os.unlink(src)
        return
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    try:
        os.rename(src, dst)
    except OSError:
        _unlink_quietly(dst)
        raise


def place(tmp: str, dest: str, target: str, replace: bool) -> None:
    """Rename ``tmp`` to ``dest``: never over an existing file unless ``replace`` (--force)."""
    try:
        if replace:
            os.rename(tmp, dest)
        else:
            rename_noreplace(tmp, dest)
    except FileExistsError:
        raise ConvertError(
            f"{target}: appeared while the conversion ran; not replaced (use --force to overwrite)"
        ) from None
    except OSError as exc:
        raise ImageIOError.from_oserror(target, exc) from None


def write_into_place(
    target: str, dest: str, guard: SignalGuard, write: Callable[[int], None], replace: bool = False
) -> None:
    """Create a temporary file next to ``dest``, ``write(fd)`` it whole, rename it to ``dest``.

    ``write`` makes the file durable (fsync) itself. Without ``replace``, a
    ``dest`` that exists by the time of the rename (it appeared during the
    run) is never replaced: the run fails and removes its temporary file. On
    any error or signal the temporary file is removed and ``dest`` is
    untouched. The temporary file stays locked until it has its final name.
    """
    folder = os.path.dirname(dest)
    tmp = ""
    fd = -1
    renamed = False
    try:
        tmp, fd = create_temp(target, dest)
        write(fd)
        blocked = _block_signals()
        try:
            place(tmp, dest, target, replace)
            renamed = True
            guard.finished = True
        finally:
            _unblock_signals(blocked)
        fsync_dir(folder)
        try:
            os.close(fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(target, exc) from None
        finally:
            fd = -1
    finally:
        if not renamed:
            guard.ignore()
            if tmp:
                _unlink_quietly(tmp)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def fsync_dir(folder: str) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# -- signals --------------------------------------------------------------------------


class SignalGuard:
    """For the duration: SIGINT/SIGTERM/SIGHUP raise Interrupted (main thread only)."""

    def __init__(self, target: str, outcome: str = "nothing written") -> None:
        self.target = target
        self.outcome = outcome
        self.old: dict[int, Any] = {}
        self.active = threading.current_thread() is threading.main_thread()
        self.finished = False

    def _raise(self, signum: int, frame: object) -> None:
        if not self.finished:
            raise Interrupted(signum, self.target, self.outcome)
        # TARGET is complete and in place: let the run end normally.

    def __enter__(self) -> SignalGuard:
        if self.active:
            for s in _SIGNALS:
                self.old[s] = signal.signal(s, self._raise)
        return self

    def ignore(self) -> None:
        """While cleaning up, a second signal must not stop the cleanup."""
        if self.active:
            for s in _SIGNALS:
                signal.signal(s, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _block_signals() -> set[int | signal.Signals] | None:
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _unblock_signals(old: set[int | signal.Signals] | None) -> None:
    if old is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
