"""A file system in an image file, loop-mounted for one test; always unmounted and detached.

Root only (losetup, mount). ``shared_bytes`` reads ``filefrag -v`` (FIEMAP):
how many bytes of a file sit in extents flagged ``shared`` (reflinked).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
        mnt.mkdir()
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


def shared_bytes(path: Path) -> tuple[int, int]:
    """(bytes in extents flagged shared, bytes in all extents) of ``path``, from ``filefrag -v``."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"blocksize of (\d+)", out)
    bs = int(m.group(1)) if m else 4096
    shared = total = 0
    for line in out.splitlines():
        e = _EXTENT.match(line)
        if e:
            total += int(e.group(1)) * bs
            if "shared" in e.group(2):
                shared += int(e.group(1)) * bs
    return shared, total
