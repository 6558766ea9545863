"""A file system in an image file, loop-mounted for one test; always unmounted and detached.

Root only (losetup, mount). ``filefrag_extents`` reads ``filefrag -v`` (FIEMAP):
how many extents and bytes of a file there are, and how many are flagged
``shared`` (reflinked). The bench's reflink scenario uses these too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .needs import require

_EXTENT = re.compile(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+):(.*)$")


def loop_xfs_missing() -> str | None:
    """Why a reflink XFS cannot be loop-mounted here, or None."""
    if os.geteuid() != 0:
        return "loop-mounting an XFS needs root"
    for tool in ("mkfs.xfs", "losetup", "mount", "umount", "filefrag"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (xfsprogs, util-linux, e2fsprogs)"
    return None


@contextmanager
def loop_xfs(folder: Path, size: int = 512 << 20) -> Iterator[Path]:
    """An XFS made with ``-m reflink=1`` in ``folder``/xfs.img, mounted on ``folder``/mnt."""
    image, mnt = folder / "xfs.img", folder / "mnt"
    with open(image, "wb") as f:
        f.truncate(size)
    dev = None
    mounted = False
    try:
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
        ).stdout.strip()
        mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "xfs", dev, str(mnt)], check=True)
        mounted = True
        yield mnt
    finally:
        try:
            if mounted and subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        finally:
            if dev:
                subprocess.run(["losetup", "-d", dev], capture_output=True)
            image.unlink(missing_ok=True)


def filefrag_extents(path: Path) -> dict[str, int]:
    """``filefrag -v`` of ``path``: its extents and their bytes, in all and flagged shared."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"blocksize of (\d+)", out)
    bs = int(m.group(1)) if m else 4096
    total = shared = total_b = shared_b = 0
    for line in out.splitlines():
        e = _EXTENT.match(line)
        if not e:
            continue
        n = int(e.group(1)) * bs
        total += 1
        total_b += n
        if "shared" in e.group(2):
            shared += 1
            shared_b += n
    return {"extents": total, "shared": shared, "bytes": total_b, "shared_bytes": shared_b}


def loops_missing() -> str | None:
    """Why loop devices cannot be attached here, or None."""
    if shutil.which("losetup") is None or os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        return "loop devices need root and losetup"
    return None


class LoopDevices:
    """Files attached to free loop devices for one test; :meth:`close` detaches every one."""

    def __init__(self, readonly: bool, partscan: bool = False) -> None:
        self.readonly = readonly
        self.partscan = partscan  # losetup -P: the kernel reads the partition table
        self.attached: list[str] = []

    def attach(self, path: Path) -> str:
        """The device ``path`` is now attached to (``losetup`` failing is an AssertionError)."""
        ro = (["-r"] if self.readonly else []) + (["-P"] if self.partscan else [])
        res = subprocess.run(["losetup", *ro, "-f", "--show", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, f"losetup: {res.stderr.strip()}"
        self.attached.append(res.stdout.strip())
        return self.attached[-1]

    def close(self) -> None:
        for dev in self.attached:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        left = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        assert not any(dev + ":" in left for dev in self.attached), left


def loop_devices(readonly: bool, partscan: bool = False) -> Iterator[Callable[[Path], str]]:
    """The body of a loop-device fixture: ``attach(path) -> device``, all detached afterwards;
    skips without root and losetup, fails when CI=true."""
    why = loops_missing()
    require(why is None, why or "")
    devices = LoopDevices(readonly, partscan)
    try:
        yield devices.attach
    finally:
        devices.close()
