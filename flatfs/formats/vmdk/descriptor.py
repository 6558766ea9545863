"""The VMDK text descriptor: a pure parser (no I/O).

A descriptor is a small text file (or a text area inside a sparse extent)
of ``key=value`` lines, comments, and extent lines::

    # Disk DescriptorFile
    version=1
    CID=a5471a07
    parentCID=ffffffff
    createType="monolithicSparse"
    parentFileNameHint="base.vmdk"
    RW 10485760 SPARSE "disk.vmdk"
    RW 2048 FLAT "disk-flat.vmdk" 0
    ddb.adapterType = "ide"

Extent lines give the disk's content in order: ``ACCESS SECTORS TYPE
["FILE" [OFFSET]]``. Every field is checked; a line that is none of the
three kinds is an error naming its line number. Unknown keys (``ddb.*``,
``encoding``, ``isNativeSnapshot``...) are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import CorruptImage

# QEMU reads at most this much of a descriptor file (1 MiB - 1)
MAX_DESCRIPTOR = (1 << 20) - 1
# A disk made of more extents than this is refused: each one is an open file.
# (A twoGbMaxExtent disk of 8 TiB has 4096.)
MAX_EXTENTS = 4096
# No extent or disk can be larger than this many sectors (2^63 bytes)
MAX_SECTORS = (1 << 63) // 512
NO_PARENT = 0xFFFFFFFF

ACCESS = ("RW", "RDONLY", "NOACCESS")
TYPES = ("FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW")

_KEY = re.compile(r"^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$")
_EXTENT = re.compile(r'^(\S+)\s+(\S+)\s+(\S+)(?:\s+"([^"]*)"(?:\s+(\S+))?)?\s*$')
_HEX = re.compile(r"^[0-9A-Fa-f]{1,8}$")


@dataclass(frozen=True, slots=True)
class ExtentLine:
    access: str  # RW, RDONLY, NOACCESS
    sectors: int
    type: str  # one of TYPES
    filename: str | None  # None for ZERO
    offset: int  # FLAT: the first sector of the host file; 0 otherwise
    line: int  # 1-based, for error messages


@dataclass(frozen=True, slots=True)
class Descriptor:
    version: int
    cid: int | None
    parent_cid: int
    create_type: str
    parent_hint: str | None
    extents: tuple[ExtentLine, ...]

    @property
    def sectors(self) -> int:
        return sum(e.sectors for e in self.extents)


def looks_like_descriptor(head: bytes) -> bool:
    """A text descriptor, recognised as QEMU recognises one: comment lines and blank
    lines, then ``version=1``, ``2`` or ``3`` as the first other line."""
    for line in head.split(b"\n")[:-1]:  # whole lines only
        if line.startswith(b"#"):
            continue
        if line.startswith(b" "):
            if line.strip(b" ") in (b"", b"\r"):
                continue  # QEMU takes a blank line only if it starts with a space
            return False
        return line.rstrip(b"\r") in (b"version=1", b"version=2", b"version=3")
    return False


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_descriptor(path: str, raw: bytes, at: int = 0) -> Descriptor:
    """Parse a descriptor's text. ``at`` is where it lives in ``path`` (for error offsets).

    Text stops at the first NUL (an embedded descriptor is padded with them).
    """
    if len(raw) > MAX_DESCRIPTOR:
        raise CorruptImage(path, f"descriptor is larger than {MAX_DESCRIPTOR} bytes", at)
    raw = raw.split(b"\0", 1)[0]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw[: exc.start].count(b"\n") + 1
        raise CorruptImage(path, f"descriptor line {lineno}: not UTF-8 text", at + exc.start) from None
    keys: dict[str, tuple[str, int]] = {}
    extents: list[ExtentLine] = []
    pos = 0
    for n, line in enumerate(text.split("\n"), 1):
        where = at + pos
        pos += len(line.encode("utf-8")) + 1
        s = line.strip()
        if not s or s.startswith("#"):
            continue

        def bad(why: str, n: int = n, where: int = where) -> CorruptImage:
            return CorruptImage(path, f"descriptor line {n}: {why}", where)

        head = s.split(None, 1)[0]
        if head in ACCESS:
            extents.append(_extent(s, n, bad))
            if len(extents) > MAX_EXTENTS:
                raise bad(f"more than {MAX_EXTENTS} extents")
            continue
        m = _KEY.match(s)
        if m is None:
            raise bad(f"not a key=value or extent line: {s[:60]!r}")
        keys.setdefault(m.group(1), (_unquote(m.group(2)), n))

    def get(key: str) -> tuple[str, int] | None:
        return keys.get(key)

    def hexval(key: str) -> int | None:
        v = get(key)
        if v is None:
            return None
        value, n = v
        if not _HEX.match(value):
            raise CorruptImage(path, f"descriptor line {n}: {key} {value[:20]!r} is not 8 hex digits", at)
        return int(value, 16)

    ct = get("createType")
    if ct is None:
        raise CorruptImage(path, "descriptor has no createType", at)
    version = 1
    v = get("version")
    if v is not None:
        if not v[0].isdigit() or len(v[0]) > 3:
            raise CorruptImage(path, f"descriptor line {v[1]}: version {v[0][:20]!r} is not a number", at)
        version = int(v[0])
    cid = hexval("CID")
    pcid = hexval("parentCID")
    hint = get("parentFileNameHint")
    total = 0
    for e in extents:
        total += e.sectors
        if total > MAX_SECTORS:
            raise CorruptImage(
                path, f"descriptor line {e.line}: the extents add up to more than 2^63 bytes", at
            )
    return Descriptor(
        version=version,
        cid=cid,
        parent_cid=NO_PARENT if pcid is None else pcid,
        create_type=ct[0],
        parent_hint=hint[0] if hint is not None and hint[0] else None,
        extents=tuple(extents),
    )


def _extent(s: str, n: int, bad: Callable[[str], CorruptImage]) -> ExtentLine:
    m = _EXTENT.match(s)
    if m is None:
        raise bad(f"malformed extent line: {s[:80]!r}")
    access, sectors, etype, fname, offset = m.groups()
    if not sectors.isdigit() or len(sectors) > 20 or int(sectors) == 0 or int(sectors) > MAX_SECTORS:
        raise bad(f"extent size {sectors[:24]!r} is not a positive number of sectors")
    if etype not in TYPES:
        raise bad(f"unknown extent type {etype[:24]!r}")
    if etype == "ZERO":
        if fname is not None:
            raise bad("a ZERO extent names no file")
    elif fname is None or not fname:
        raise bad(f"a {etype} extent needs a file name")
    if etype == "FLAT":
        if offset is None:
            raise bad("a FLAT extent needs an offset")
    elif offset is not None:
        raise bad(f"a {etype} extent takes no offset")
    if offset is not None and (not offset.isdigit() or len(offset) > 20 or int(offset) > MAX_SECTORS):
        raise bad(f"extent offset {offset[:24]!r} is not a number of sectors")
    return ExtentLine(access, int(sectors), etype, fname, int(offset or 0), n)
