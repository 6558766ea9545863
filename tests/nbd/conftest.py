"""Fixtures of the NBD tests: servers started through the CLI (or qemu-nbd), always stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers.nbd import Servers, have_nbd_tools
from ..helpers.needs import have_qemu, require


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    why = have_nbd_tools()
    require(why is None, why or "")
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    s = Servers(tmp_path)
    try:
        yield s
    finally:
        s.close()
