"""The table of formats flatfs reads, probing, and the foreign formats it refuses by name.

Adding a format is one folder beside ``raw.py`` and ``qcow2/`` and one line in
:data:`FORMATS`. Nothing registers itself on import.
"""

from __future__ import annotations

from ..errors import UnsupportedImage
from . import qcow2, raw, vdi, vhd, vhdx, vmdk
from .api import Format

FORMATS: tuple[Format, ...] = (
    raw.FORMAT,
    qcow2.FORMAT,
    vdi.FORMAT,
    vhd.FORMAT,
    vmdk.FORMAT,
    vhdx.FORMAT,
)

# Image formats flatfs does not read. Probing one of these as raw would show
# its metadata as guest data, so they are refused by name instead.
FOREIGN_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
)


def names() -> tuple[str, ...]:
    """The format names a user may pass to -f/-F (aliases not included)."""
    return tuple(f.name for f in FORMATS)


def lookup(name: str, formats: tuple[Format, ...] | None = None) -> Format | None:
    """The format called ``name``, or having it as an alias."""
    table = FORMATS if formats is None else formats
    for fmt in table:
        if fmt.name == name:
            return fmt
    return next((f for f in table if name in f.aliases), None)


def probe(path: str, head: bytes, formats: tuple[Format, ...] | None = None) -> str | None:
    """The name of the first non-raw format whose magic matches ``head``, else None.

    A file that carries another image format's magic is refused: reading it
    as raw would silently show that format's metadata as the guest disk.
    """
    table = FORMATS if formats is None else formats
    for fmt in table:
        if fmt.name != "raw" and fmt.probe(head):
            return fmt.name
    for at, magic, name in FOREIGN_MAGICS:
        if head[at : at + len(magic)] == magic:
            raise UnsupportedImage(
                path, f"image format {name} is not supported (pass -f raw to read the file as raw bytes)"
            )
    return None
