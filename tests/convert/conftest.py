"""Sources shared by the target writers' tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..helpers.targets import flat_qcow2_chain


@pytest.fixture(scope="session")
def qcow2_chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The suite's qcow2 chain (top image) and its flattening by qemu-img."""
    return flat_qcow2_chain(tmp_path_factory.mktemp("qcow2-chain"))
