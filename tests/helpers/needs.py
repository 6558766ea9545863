"""What a test needs from the machine: skip on a laptop without it, FAIL when CI=true.

No silent coverage loss: in CI a missing qemu-img or /dev/fuse is an error.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(ok: bool, why: str) -> None:
    """Skip locally, fail in CI."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {why}", pytrace=False)
    pytest.skip(why)


def have_qemu() -> bool:
    return all(shutil.which(t) for t in ("qemu-img", "qemu-io"))


def have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
