"""Real mounts through the CLI, the mount table, and walking a view with SEEK_DATA/SEEK_HOLE.

Every mount a test makes is registered before the CLI even runs, and torn down
with ``fusermount3 -u`` (then ``-u -z`` if something still holds it). Use the
``mounter`` fixture (tests/conftest.py): it always unmounts.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

from .cli import flatfs

FSTYPE = "fuse.flatfs"


# -- mount table ---------------------------------------------------------------


def mount_entries() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount in this namespace, in mount order (a later one
    stacked on an earlier one at the same point), from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = parts[4].encode().decode("unicode_escape") if "\\" in parts[4] else parts[4]
            out.append((mp, parts[parts.index("-", 6) + 1]))
    return out


def mount_table() -> dict[str, str]:
    """Mount point -> fstype of the topmost mount at each mount point."""
    return dict(mount_entries())


def stacked_at(mp: str | os.PathLike[str]) -> list[str]:
    """The fstype of every mount stacked exactly at ``mp``, bottom first."""
    real = os.path.realpath(mp)
    return [fstype for point, fstype in mount_entries() if point == real]


def mounts_under(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Mount point -> fstype of every mount at or under ``folder`` (FUSE views, loop-mounted guests)."""
    base = os.path.realpath(folder)
    return {mp: t for mp, t in mount_table().items() if mp == base or mp.startswith(base + os.sep)}


def flatfs_mounts() -> set[str]:
    """Mount points of every flatfs mount in this mount namespace."""
    return {mp for mp, fstype in mount_table().items() if fstype == FSTYPE}


def is_mounted(mp: Path | str) -> bool:
    return os.path.realpath(mp) in flatfs_mounts()


def unmount(mp: Path | str) -> None:
    """fusermount3 -u, then a lazy unmount if the first one did not take."""
    mp = os.path.realpath(mp)
    if not is_mounted(mp):
        return
    subprocess.run(["fusermount3", "-u", mp], capture_output=True)
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)


# -- the daemon ----------------------------------------------------------------


def daemon_pid(mp: Path | str) -> int | None:
    """The pid of the `flatfs mount ... MP` daemon (found by its command line)."""
    mp = str(mp)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if "flatfs" in argv and "mount" in argv and argv and argv[-1] == mp and int(d) != os.getpid():
            return int(d)
    return None


def wait_gone(pid: int, deadline_s: float = 60.0) -> bool:
    """Wait for a process we did not fork to exit. The deadline only stops a hang."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


def send_and_wait(pid: int, sig: signal.Signals) -> bool:
    os.kill(pid, sig)
    return wait_gone(pid)


# -- mounting ------------------------------------------------------------------


class Mounter:
    """Mount views through the CLI; remembers every mountpoint for teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.points: list[Path] = []
        self._n = 0

    def mountpoint(self) -> Path:
        self._n += 1
        mp = self.base / f"mnt{self._n}"
        mp.mkdir(parents=True)
        return mp

    def run(self, image: Path | str, mp: Path, *args: str) -> subprocess.CompletedProcess[str]:
        self.points.append(mp)
        return flatfs("mount", *args, image, mp, check=False)

    def mount(self, image: Path, mp: Path | None = None, *args: str) -> Path:
        """Mount ``image``; return the path of the view file."""
        mp = mp or self.mountpoint()
        res = self.run(image, mp, *args)
        assert res.returncode == 0, res.stderr
        assert res.stderr == "" and res.stdout == ""
        assert is_mounted(mp)
        return mp / (Path(image).stem + ".raw") if mp.is_dir() else mp

    def close(self) -> None:
        for mp in reversed(self.points):
            unmount(mp)


# -- reading a view --------------------------------------------------------------


def seek_walk(path: Path | str) -> list[tuple[int, int]]:
    """(start, length) of every data run, found with SEEK_DATA/SEEK_HOLE only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out = []
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO, exc  # no data after pos
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            assert hole > data
            out.append((data, hole - data))
            pos = hole
        return out
    finally:
        os.close(fd)
