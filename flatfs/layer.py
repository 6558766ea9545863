"""The Layer protocol, format probing and the FORMATS registry.

A layer answers only for itself: its size, where its own data is, and its own
bytes. Composing layers into a guest view is the chain's job (chain.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from .errors import ImageIOError
from .extents import Extent

PROBE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class BackingRef:
    """A backing file as the image names it."""

    name: str                  # as stored in the image
    format: str | None         # from the backing-format extension, or None


class Layer(Protocol):
    path: str
    fd: int                    # the image file itself (owned by the chain's Opener)
    format: str
    size: int
    backing: BackingRef | None

    def extents(self, start: int, end: int) -> Iterator[Extent]:
        """Own layer only; ascending, contiguous, exactly covering [start, end)."""
        ...

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with this layer's bytes at ``offset``. Only called for DATA ranges."""
        ...

    def info(self) -> dict[str, Any]:
        """Format-specific facts for ``flatfs info``."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Format:
    name: str
    probe: Callable[[bytes], bool]          # does this header look like ours?
    open: Callable[..., Layer]              # open(path, fd=...) -> Layer
    aliases: tuple[str, ...] = field(default=())


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> None:
    FORMATS[fmt.name] = fmt


def probe(path: str, head: bytes) -> str | None:
    """The name of the first non-raw format whose magic matches, else None."""
    for fmt in FORMATS.values():
        if fmt.name != "raw" and fmt.probe(head):
            return fmt.name
    return None


def read_head(path: str, fd: int) -> bytes:
    try:
        return os.pread(fd, PROBE_SIZE, 0)
    except OSError as exc:
        raise ImageIOError.from_oserror(path, exc) from None
