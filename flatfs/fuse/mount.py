"""``flatfs mount`` and ``flatfs umount``: mountpoint checks, FUSE options, the server, unmounting.

One mount is a :class:`_Server`: open the chain, make the :class:`View`, run
libfuse's loop through :func:`glue.serve`, and call the mount live only once a
read through it works. :func:`mount` runs it in the foreground (sd_notify) or as
a daemon (:func:`flatfs.service.daemonize`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..chain import Chain, OpenOptions, open_chain
from ..errors import FlatfsError, MountError
from ..formats import lookup
from ..partitions import read_table
from ..service import StderrCapture, daemonize, sd_notify, setup_logging
from . import glue
from .mountinfo import find_mount
from .scratch import OverlayDisk, Scratch
from .view import View, view_name
from .writable import WritableView

log = logging.getLogger("flatfs.fuse")

FSTYPE_SUBTYPE = "flatfs"  # the mount shows as fstype "fuse.flatfs"
FSTYPE = "fuse." + FSTYPE_SUBTYPE
MAX_READ = 1 << 20  # largest read request we ask the kernel for (max_read, max_pages)
READY_PROBE = 4096  # bytes read through the mount before we call it live


@dataclass
class MountRequest:
    image: str
    mountpoint: str
    options: OpenOptions = field(default_factory=OpenOptions)
    foreground: bool = False
    allow_other: bool = False
    debug: bool = False
    fuse_options: tuple[str, ...] = ()
    partitions: bool = False  # -P: each partition as NAME-pN.raw next to NAME.raw
    writable: bool = False  # --writable: writes land in a scratch layer, never in the chain
    scratch_dir: str | None = None  # where the scratch file lives (default $TMPDIR)
    overlay: str | None = None  # --overlay FILE: the writes also kept as a new qcow2 over IMAGE


_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)


def _dead(mountpoint: str) -> MountError:
    return MountError(
        f"{mountpoint}: a flatfs mount whose server is gone is still there; "
        f"clear it with: flatfs umount {mountpoint}"
    )


def _unusable(mountpoint: str, exc: OSError) -> MountError:
    """Why ``mountpoint`` cannot be used, from what touching it raised."""
    if isinstance(exc, FileNotFoundError):
        return MountError(f"{mountpoint}: mountpoint does not exist")
    if exc.errno in _DEAD:
        return _dead(mountpoint)
    return MountError(f"{mountpoint}: cannot use as mountpoint: {exc.strerror}")


def check_mountpoint(mountpoint: str) -> tuple[str, bool]:
    """Return (real path, is_dir); refuse a missing, stale, busy or odd mountpoint."""
    path = os.path.realpath(mountpoint)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _unusable(mountpoint, exc) from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise MountError(f"{mountpoint}: mountpoint must be a directory or a regular file")
    busy = find_mount(path)
    if busy is not None and busy.fstype == FSTYPE:
        try:
            os.statvfs(path)  # never cached by the kernel: a dead server answers ENOTCONN
        except OSError as exc:
            if exc.errno in _DEAD:
                raise _dead(mountpoint) from None
    if busy is not None or (stat.S_ISDIR(st.st_mode) and os.path.ismount(path)):
        what = f" ({busy.fstype} from {busy.source})" if busy else ""
        hint = f"; to unmount it: flatfs umount {mountpoint}" if busy and busy.fstype == FSTYPE else ""
        raise MountError(f"{mountpoint}: already a mount point{what}{hint}")
    return path, stat.S_ISDIR(st.st_mode)


def claim_mountpoint(mountpoint: str) -> int:
    """An fd on the mountpoint itself, flock()ed: of two mounts started together, one wins.

    The lock sits on the directory (or file) that the mount will cover, and
    lives as long as the fd: the server keeps it (a daemon inherits it) until
    it unmounts. A second ``flatfs mount`` either opens that same inode and
    fails to lock it, or opens after the mount appeared and is refused by
    :func:`check_mountpoint`; it never mounts, so it never unmounts anything.
    """
    path = os.path.realpath(mountpoint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        raise _unusable(mountpoint, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise MountError(f"{mountpoint}: another flatfs mount is starting there") from None
        raise MountError(f"{mountpoint}: cannot lock the mountpoint: {exc.strerror}") from None
    return fd


# ---------------------------------------------------------------------------
# FUSE options
# ---------------------------------------------------------------------------


def _fuse_opt_escape(value: str) -> str:
    """libfuse splits -o on commas; a backslash escapes the next character."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def _fuse_kwargs(req: MountRequest, image: str) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "fsname": _fuse_opt_escape(os.path.abspath(image)),
        "subtype": FSTYPE_SUBTYPE,
        "ro": not req.writable,
        "default_permissions": True,
        "max_read": MAX_READ,
    }
    if req.allow_other:
        kw["allow_other"] = True
    if req.debug:
        # libfuse 3.14 in debug mode takes its default (unlimited) for a bad value and
        # says so ("Ignoring invalid max threads value 4294967295"); an explicit
        # limit that no mount reaches keeps every idle worker all the same.
        kw["max_idle_threads"] = 100000
    for group in req.fuse_options:
        for opt in group.split(","):
            opt = opt.strip()
            if not opt:
                continue
            key, eq, val = opt.partition("=")
            if key == "rw" and not req.writable:
                raise MountError("-o rw: the view is read-only (--writable makes a writable one)")
            if key in ("fsname", "subtype"):
                raise MountError(f"-o {key}: flatfs sets {key} itself (umount relies on it)")
            kw[key] = val if eq else True
    return kw


# ---------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------


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
        on_ready: Callable[..., None],
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
        self.notes: list[str] = []  # warnings for the user, sent with "ready"
        self.disk: Scratch | None = None  # the writable layer, with --writable

    def run(self) -> None:
        """Serve until unmounted or signalled. Raises MountError if the mount never got live."""
        # The view reads exactly the data it needs, in 1 MiB requests: no readahead (see OpenOptions)
        chain = open_chain(self.req.image, self.req.options._replace(readahead=False))
        try:
            top = chain.layers[0]
            name = view_name(self.req.image) if self.is_dir else None
            parts = self._partitions(chain, name) if self.req.partitions and name else []
            top_stat = os.fstat(chain.host_files()[0].fd)
            if self.req.writable:
                chain.build_index()
                self.disk = self._writable_disk(chain)
                view: View = WritableView(chain, name, top_stat, self.disk, partitions=parts)
            else:
                view = View(chain, name, top_stat, partitions=parts)
            self.view_path = os.path.join(self.mountpoint, view.name) if view.name else self.mountpoint
            self._pre_dev = os.stat(self.mountpoint).st_dev
            kwargs = _fuse_kwargs(self.req, top.path)
            os.chdir("/")  # paths are absolute by now; do not pin a cwd
            self.capture.start()
            try:
                glue.serve(view, self.mountpoint, kwargs, self._start_ready_check, self.req.debug)
                failed = None
            except RuntimeError as exc:  # fuse_main_real returned non-zero
                failed = exc
            finally:
                self.capture.stop()
        finally:
            if self.disk is not None:
                self.disk.close()
                if self.req.overlay is not None and not self.ready.is_set():
                    # the mount never went live: no write reached the overlay; do not leave it
                    # behind to block the next attempt ("already exists")
                    try:
                        os.unlink(self.req.overlay)
                    except OSError:
                        pass
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

    def _writable_disk(self, chain: Chain) -> Scratch:
        if self.req.overlay is None:
            return Scratch(chain, self.req.scratch_dir)
        entry = lookup("qcow2")
        if entry is None or entry.overlay is None:
            raise MountError("--overlay: no qcow2 overlay writer")
        top = chain.layers[0]
        cls = entry.overlay()
        overlay = cls(self.req.overlay, chain.size, os.path.abspath(top.path), top.format)
        try:
            return OverlayDisk(chain, self.req.scratch_dir, overlay)
        except BaseException:
            overlay.close()
            raise

    def _partitions(self, chain: Chain, name: str) -> list[tuple[str, int, int]]:
        """-P: (file name, start, length) of each partition; a table flatfs will not use is a
        warning, and then there are none (the whole disk is always there)."""
        table = read_table(chain.pread, chain.size)
        if table.warning:
            self.notes.append(f"warning: {self.req.image}: {table.warning}; no partition files")
            log.warning("%s", self.notes[-1])
        stem = name[: -len(".raw")]
        return [(f"{stem}-p{p.number}.raw", p.start, p.length) for p in table.partitions]

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
            self.on_ready(*self.notes)
        except Exception:
            log.exception("ready notification failed")


# ---------------------------------------------------------------------------
# mount, umount
# ---------------------------------------------------------------------------


def mount(req: MountRequest) -> None:
    """``flatfs mount``: return once the view is live (background) or after unmount (foreground)."""
    claim = claim_mountpoint(req.mountpoint)
    try:
        _mount(req)
    finally:
        os.close(claim)  # a daemon keeps its own copy, and with it the lock


def _mount(req: MountRequest) -> None:
    mountpoint, is_dir = check_mountpoint(req.mountpoint)
    if req.overlay is not None:
        if os.path.lexists(req.overlay):
            raise MountError(f"{req.overlay}: already exists; --overlay makes a new file")
        if req.options.snapshot is not None:
            raise MountError("--overlay records IMAGE as its backing file, not an internal snapshot (-l)")
        req.overlay = os.path.abspath(req.overlay)
    if req.partitions and not is_dir:
        raise MountError(
            f"{req.mountpoint}: -P needs a directory mountpoint (the partitions are files in it)"
        )
    glue.load_mfusepy()
    if req.options.force_share:
        print(
            f"flatfs: warning: -U: {req.image} is read without locks; if another process writes "
            "to the chain while it is mounted, the view can show a torn mix of old and new data",
            file=sys.stderr,
        )
    if req.options.ignore_parent_id:
        print(
            f"flatfs: warning: --ignore-parent-id: {req.image}'s chain is read even where a parent "
            "is not the image its child was made over; the view can show a mix of unrelated disks",
            file=sys.stderr,
        )
    foreground = req.foreground or req.debug
    if foreground:
        notify = os.environ.pop("NOTIFY_SOCKET", None)  # not for our children (fusermount3)
        setup_logging(req.debug, to_syslog=False, library_loggers=(glue.LOGGER,))
        srv = _Server(
            req,
            mountpoint,
            is_dir,
            echo_stderr=req.debug,
            on_ready=lambda *notes: sd_notify(notify, f"READY=1\nSTATUS=serving {srv.view_path}\n"),
        )
        try:
            srv.run()
        finally:
            if srv.ready.is_set():
                sd_notify(notify, "STOPPING=1\n")
        return

    def serve(ready: Callable[..., None]) -> None:
        _Server(req, mountpoint, is_dir, on_ready=ready, echo_stderr=False).run()

    started = daemonize(serve, undo=lambda: _detach(mountpoint), library_loggers=(glue.LOGGER,))
    if started.ready:
        for note in started.notes:
            print(f"flatfs: {note}", file=sys.stderr)
        return
    if started.interrupted:
        raise MountError(f"{req.mountpoint}: interrupted; nothing mounted")
    if started.error is not None:
        raise MountError(started.error)
    raise MountError(
        f"{req.mountpoint}: mount daemon exited before the mount was ready (status {started.status})"
    )


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
