"""Fixtures of the FUSE tests: the test chains, built once and mounted once per session.

Each mount goes through the CLI and is always unmounted (tests/helpers/mounts.py);
at the end of the session nothing may be left mounted (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers.chains import Chain, build_chains
from ..helpers.mounts import Mounter
from ..helpers.needs import have_fuse, have_qemu, require
from ..helpers.qemu import Qemu


@pytest.fixture(scope="session")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Chain]:
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    return build_chains(Qemu(), tmp_path_factory.mktemp("chains"))


@pytest.fixture(scope="session")
def views(chains: dict[str, Chain], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Each test chain mounted once for the session (read-only checks share it)."""
    require(have_fuse(), "/dev/fuse or fusermount3 is missing")
    m = Mounter(tmp_path_factory.mktemp("views"))
    try:
        yield {name: m.mount(c.image) for name, c in chains.items()}
    finally:
        m.close()
