"""The VHDX tests' fixture: libyal's libvhdi, an independent reader."""

from __future__ import annotations

from types import ModuleType

import pytest

from ..helpers.needs import require
from ..helpers.vhdx_images import pyvhdi


@pytest.fixture
def libvhdi() -> ModuleType:
    require(pyvhdi is not None, "libvhdi-python is not installed (pip install '.[test]')")
    assert pyvhdi is not None
    return pyvhdi
