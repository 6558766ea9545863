"""The two read-only views of a chain: `flatfs mount` and qemu-storage-daemon's FUSE export.

Both are started in the foreground as our own children, mounted over an
empty regular file, so that the same code measures them, their daemon's CPU
time is readable from /proc, and py-spy can attach to flatfs. Both are
stopped with SIGTERM; whatever is still mounted after that is unmounted with
``fusermount3 -u``, then ``-u -z``.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20


def _unescape(s: str) -> str:
    if "\\" not in s:
        return s
    out, i, raw = bytearray(), 0, s.encode()
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="surrogateescape")


def mount_entry(path: Path | str) -> tuple[str, str] | None:
    """(fstype, options) of the topmost mount at ``path``, or None."""
    path = os.path.realpath(path)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and _unescape(parts[1]) == path:
                found = (parts[2], parts[3])
    return found


def force_unmount(path: Path | str) -> None:
    """fusermount3 -u, then -u -z, while something is mounted at ``path``."""
    for args in (["-u"], ["-u", "-z"]):
        if mount_entry(path) is None or not mount_entry(path)[0].startswith("fuse"):  # type: ignore[index]
            return
        subprocess.run(["fusermount3", *args, os.path.realpath(path)], capture_output=True)


def flatfs_cmd() -> list[str]:
    """The flatfs CLI next to this interpreter (the venv's console script), else python -m."""
    script = Path(sys.executable).parent / "flatfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flatfs"]


class View:
    """One mounted view. ``start()`` returns once a read through it works."""

    tool = "?"

    def __init__(self, image: Path, mountpoint: Path, log: Path) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.mount_seconds = 0.0
        self.options = ""

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> View:
        self.mountpoint.touch()
        t0 = time.perf_counter()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=self.image.parent
            )
        while True:
            ent = mount_entry(self.mountpoint)
            if ent is not None and ent[0].startswith("fuse"):
                try:
                    fd = os.open(self.mountpoint, os.O_RDONLY)
                    try:
                        os.pread(fd, 4096, 0)
                    finally:
                        os.close(fd)
                    self.options = ent[1]
                    break
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.tool} exited ({self.proc.returncode}) before mounting "
                    f"{self.image.name}; see {self.log}"
                )
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"{self.tool} did not mount {self.image.name} within {timeout:.0f} s")
            time.sleep(0.001)  # the figure's resolution
        self.mount_seconds = time.perf_counter() - t0
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM, wait; then make sure nothing is left mounted and the process is gone."""
        p = self.proc
        try:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            force_unmount(self.mountpoint)
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=15)
            force_unmount(self.mountpoint)


class FlatfsView(View):
    tool = "flatfs"

    def command(self) -> list[str]:
        return flatfs_cmd() + ["mount", "--foreground", str(self.image), str(self.mountpoint)]


class QsdView(View):
    tool = "qsd"

    def command(self) -> list[str]:
        return [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file0,filename={self.image}",
            "--blockdev",
            "driver=qcow2,node-name=disk0,file=file0,read-only=on",
            "--export",
            f"type=fuse,id=exp0,node-name=disk0,mountpoint={self.mountpoint}",
        ]


# -- measurements through a view ----------------------------------------------------


def drop_view_pages(path: Path) -> None:
    """Evict the view's own page cache (flatfs keeps it across opens; qsd does not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_sequential(
    path: Path, nbytes: int, bufsize: int = MiB, checksum: bool = False, drop: bool = True
) -> tuple[float, int, int | None]:
    """Read [0, nbytes) with ``bufsize`` reads. Returns (seconds, bytes, crc32 or None).

    With ``drop`` the view's own cached pages are evicted first, so that every
    read is a request to the daemon, whatever the image files' cache state.
    """
    import zlib

    if drop:
        drop_view_pages(path)
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    crc = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        done = 0
        while done < nbytes:
            want = min(bufsize, nbytes - done)
            k = os.readv(fd, [mv[:want]])
            if k <= 0:
                break
            if checksum:
                crc = zlib.crc32(mv[:k], crc)
            done += k
        secs = time.perf_counter() - t0
    finally:
        os.close(fd)
    return secs, done, (crc if checksum else None)


def seek_walk(path: Path, budget: float | None = None, max_calls: int | None = None) -> dict:
    """Alternate SEEK_DATA / SEEK_HOLE from 0 to the end, timing every call.

    Stops early after ``budget`` seconds or ``max_calls`` calls (``complete``
    says whether the walk reached the end). ``calls`` lists
    (whence, offset, seconds) in order; ``extents`` the data runs found.
    """
    calls: list[tuple[int, int, float]] = []
    extents: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    complete = False
    t_start = time.perf_counter()
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            if (budget is not None and time.perf_counter() - t_start > budget) or (
                max_calls is not None and len(calls) >= max_calls
            ):
                break
            t0 = time.perf_counter()
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as exc:
                calls.append((os.SEEK_DATA, off, time.perf_counter() - t0))
                if exc.errno != errno.ENXIO:
                    raise
                complete = True
                break
            calls.append((os.SEEK_DATA, off, time.perf_counter() - t0))
            if (budget is not None and time.perf_counter() - t_start > budget) or (
                max_calls is not None and len(calls) >= max_calls
            ):
                break
            t0 = time.perf_counter()
            h = os.lseek(fd, d, os.SEEK_HOLE)
            calls.append((os.SEEK_HOLE, d, time.perf_counter() - t0))
            extents.append((d, h - d))
            off = h
        else:
            complete = True
    finally:
        os.close(fd)
    return {
        "calls": calls,
        "extents": extents,
        "complete": complete,
        "seconds": time.perf_counter() - t_start,
    }


def seek_once(path: Path, offset: int, whence: int) -> tuple[float, int | None]:
    """Time one lseek; returns (seconds, result or None for ENXIO)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        try:
            r: int | None = os.lseek(fd, offset, whence)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            r = None
        return time.perf_counter() - t0, r
    finally:
        os.close(fd)
