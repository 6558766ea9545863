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


# Containers of an image rather than images: shown as a raw disk they would
# "work" and show nonsense, so without -f raw they are refused with what to do.
ARCHIVE_MAGICS: tuple[tuple[int, bytes, str, str], ...] = (
    (257, b"ustar", "a tar archive (an OVA?)", "extract it (tar -xf) and open the disk image inside"),
    (0, b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz -k)"),
    (0, b"\x1f\x8b\x08", "gzip-compressed", "decompress it first (gunzip -k)"),
    (0, b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd)"),
    (4, b"1AY&SY", "bzip2-compressed", "decompress it first (bunzip2 -k)"),  # after "BZh1".."BZh9"
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
    for at, magic, what, todo in ARCHIVE_MAGICS:
        if head[at : at + len(magic)] == magic:
            raise UnsupportedImage(path, f"is {what}, not a disk image: {todo} (-f raw reads it as bytes)")
    return None


def probe_tail(
    path: str, tail: bytes, file_size: int, formats: tuple[Format, ...] | None = None
) -> tuple[str, str | None] | None:
    """The format whose footer ends a file that nothing at its head announces (a fixed VHD),
    and the suffix of that format the file's name ends with, if it does (then it is read as such)."""
    table = FORMATS if formats is None else formats
    for fmt in table:
        if fmt.probe_tail is not None and fmt.probe_tail(tail, file_size):
            return fmt.name, next((s for s in fmt.suffixes if path.lower().endswith(s.lower())), None)
    return None
