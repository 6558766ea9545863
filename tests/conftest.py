"""Fixtures shared by every test folder.

Only fixtures live here; the helpers they use (and that tests import) are in
tests/helpers/. Tests that need qemu-img or FUSE skip on a laptop without
them, but FAIL when CI=true: no silent coverage loss.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers.fuzz import FuzzWorker
from .helpers.mounts import Mounter, mounts_under
from .helpers.needs import have_fuse, have_qemu, require
from .helpers.qemu import Qemu


@pytest.fixture(scope="session", autouse=True)
def _no_mount_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test mounts under the session's temp folder; nothing mounted there may outlive the session.

    Scoped to this session's folder, so that a second pytest running on the
    same machine is neither blamed nor unmounted.
    """
    base = tmp_path_factory.getbasetemp()
    yield
    if not os.path.exists("/proc/self/mountinfo"):
        return
    left = mounts_under(base)
    for mp, fstype in sorted(left.items(), reverse=True):  # innermost first
        fuse = fstype == "fuse" or fstype.startswith("fuse.")
        for cmd in (
            (["fusermount3", "-u"], ["fusermount3", "-u", "-z"]) if fuse else (["umount"], ["umount", "-l"])
        ):
            if mp in mounts_under(mp):
                subprocess.run([*cmd, mp], capture_output=True)
    assert not left, f"mounts left behind: {left}"


@pytest.fixture
def qemu() -> Qemu:
    """qemu-img and qemu-io (tests/helpers/qemu.py); skips without them, fails in CI."""
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    return Qemu()


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    """Mounts through the CLI (tests/helpers/mounts.py); every mount is undone at the end of the test."""
    require(have_fuse(), "/dev/fuse or fusermount3 is missing")
    m = Mounter(tmp_path / "mnt")
    try:
        yield m
    finally:
        m.close()


@pytest.fixture(scope="module")
def worker() -> Iterator[FuzzWorker]:
    """A memory-capped process that reads mutated images (tests/helpers/fuzz.py)."""
    w = FuzzWorker()
    yield w
    w.close()
