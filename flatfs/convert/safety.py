"""TARGET appears whole or not at all: a temporary file, fsync, rename, signals, stale temporaries.

The image is written into a temporary file next to TARGET
(``.NAME.flatfs-tmp-PID-RANDOM``), fsynced and renamed into place, and the
folder is fsynced. Any error, SIGINT, SIGTERM, SIGHUP or a full disk removes
the temporary file and leaves no TARGET (an existing TARGET replaced with
``force`` stays untouched). Temporary files left by a killed run are removed
by the next run for the same TARGET once their process is gone.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..chain import Chain
from ..errors import ConvertError, ImageIOError

TMP_MARK = ".flatfs-tmp-"

_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s)


class Interrupted(ConvertError):
    """The conversion was stopped by a signal; nothing was left behind."""

    def __init__(self, signum: int, target: str) -> None:
        self.signum = signum
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(f"{target}: conversion interrupted by {name}; nothing written")


def destination(target: str | os.PathLike[str]) -> str:
    """The file a conversion to ``target`` really replaces (a symlink's target)."""
    target = os.fspath(target)
    if os.path.islink(target):
        return os.path.realpath(target)
    return os.path.abspath(target)


def check_target(target: str, dest: str, chains: Sequence[Chain], force: bool) -> None:
    """Refuse a TARGET that is part of a chain (even with force) or exists (without force)."""
    try:
        st: os.stat_result | None = os.stat(dest)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ImageIOError.from_oserror(target, exc) from None
    real = os.path.realpath(dest)
    for chain in chains:
        for host in chain.host_files():
            try:
                lst: os.stat_result | None = os.fstat(host.fd)
            except OSError:
                lst = None
            same = st is not None and lst is not None and (st.st_dev, st.st_ino) == (lst.st_dev, lst.st_ino)
            if same or os.path.realpath(host.path) == real:
                raise ConvertError(
                    f"{target}: refusing to write over {host.path}, which is part of "
                    "the chain being read (even with --force)"
                )
    folder = os.path.dirname(dest)
    if not os.path.isdir(folder):
        raise ConvertError(f"{target}: folder {folder} does not exist")
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise ConvertError(f"{target}: exists and is not a regular file; refusing to replace it")
        if not force:
            raise ConvertError(f"{target}: already exists (use --force to overwrite)")


# -- temporary files ------------------------------------------------------------------


def temp_prefix(dest: str) -> str:
    return f".{os.path.basename(dest)}{TMP_MARK}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(dest: str) -> list[str]:
    """Remove temporary files of earlier conversions to ``dest`` whose process is gone."""
    folder = os.path.dirname(dest) or "."
    prefix = temp_prefix(dest)
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[0-9a-f]+$")
    removed: list[str] = []
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for name in entries:
        m = pattern.match(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ImageIOError.from_oserror(os.path.join(folder, name), exc) from None
    return removed


def write_into_place(target: str, dest: str, guard: SignalGuard, write: Callable[[int], None]) -> None:
    """Create a temporary file next to ``dest``, ``write(fd)`` it whole, rename it to ``dest``.

    ``write`` makes the file durable (fsync) itself. On any error or signal
    the temporary file is removed and ``dest`` is untouched.
    """
    folder = os.path.dirname(dest)
    tmp = os.path.join(folder, f"{temp_prefix(dest)}{os.getpid()}-{secrets.token_hex(4)}")
    fd = -1
    renamed = False
    try:
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ImageIOError.from_oserror(target, exc) from None
        write(fd)
        try:
            os.close(fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(target, exc) from None
        finally:
            fd = -1
        blocked = _block_signals()
        try:
            try:
                os.rename(tmp, dest)
            except OSError as exc:
                raise ImageIOError.from_oserror(target, exc) from None
            renamed = True
            guard.finished = True
        finally:
            _unblock_signals(blocked)
        fsync_dir(folder)
    finally:
        if not renamed:
            guard.ignore()
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
            try:
                os.unlink(tmp)
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

    def __init__(self, target: str) -> None:
        self.target = target
        self.old: dict[int, Any] = {}
        self.active = threading.current_thread() is threading.main_thread()
        self.finished = False

    def _raise(self, signum: int, frame: object) -> None:
        if not self.finished:
            raise Interrupted(signum, self.target)
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
