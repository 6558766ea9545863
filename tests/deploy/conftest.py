"""Loop devices for the block-device tests: attached read-only (images) or read-write (convert -n
targets), every one detached at the end of its test (tests/helpers/loopfs.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..helpers.loopfs import loop_devices


@pytest.fixture
def loop() -> Iterator[Callable[[Path], str]]:
    yield from loop_devices(readonly=True)


@pytest.fixture
def loop_rw() -> Iterator[Callable[[Path], str]]:
    yield from loop_devices(readonly=False)
