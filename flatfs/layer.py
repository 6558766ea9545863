"""The Layer protocol, format probing and the FORMATS registry.

A layer answers only for itself: its size, where its own data is, and its own
bytes. Composing layers into a guest view is the chain's job (chain.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ImageIOError, UnsupportedImage
from .extents import Extent

PROBE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class BackingRef:
    """A backing file as the image names it."""

    name: str  # as stored in the image
    format: str | None  # from the backing-format extension, or None


class Layer(Protocol):
    path: str
    fd: int  # the image file itself (owned by the chain's Opener)
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
    probe: Callable[[bytes], bool]  # does this header look like ours?
    open: Callable[..., Layer]  # open(path, fd=...) -> Layer
    aliases: tuple[str, ...] = field(default=())


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> None:
    FORMATS[fmt.name] = fmt


def lookup(name: str) -> Format | None:
    """The format registered as ``name`` or under it as an alias."""
    fmt = FORMATS.get(name)
    if fmt is None:
        fmt = next((f for f in FORMATS.values() if name in f.aliases), None)
    return fmt


# Image formats flatfs does not read. Probing one of these as raw would show
# its metadata as guest data, so they are refused by name instead.
FOREIGN_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk (descriptor)"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc/vhd"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
)


def probe(path: str, head: bytes) -> str | None:
    """The name of the first non-raw format whose magic matches, else None.

    A file that carries another image format's magic is refused: reading it
    as raw would silently show that format's metadata as the guest disk.
    """
    for fmt in FORMATS.values():
        if fmt.name != "raw" and fmt.probe(head):
            return fmt.name
    for at, magic, name in FOREIGN_MAGICS:
        if head[at : at + len(magic)] == magic:
            raise UnsupportedImage(
                path, f"image format {name} is not supported (pass -f raw to read the file as raw bytes)"
            )
    return None


def read_head(path: str, fd: int) -> bytes:
    try:
        return os.pread(fd, PROBE_SIZE, 0)
    except OSError as exc:
        raise ImageIOError.from_oserror(path, exc) from None
