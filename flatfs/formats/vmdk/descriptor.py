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

The text may be any host file a hostile image names, so the parser is
linear (no regex that can backtrack on a line), numbers are ASCII digits
only (``str.isdigit`` accepts superscripts that ``int`` refuses), and an
error names the line and what was expected but quotes none of its bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import CorruptImage, UnsupportedImage

# QEMU reads at most this much of a descriptor file (1 MiB - 1)
MAX_DESCRIPTOR = (1 << 20) - 1
# A disk made of more extents than this is refused: each one is an open file.
# (A twoGbMaxExtent disk of 8 TiB has 4096.)
MAX_EXTENTS = 4096
# No extent or disk can be this many sectors or more (2^63 bytes: no off_t holds that size)
MAX_SECTORS = (1 << 63) // 512
NO_PARENT = 0xFFFFFFFF

ACCESS = ("RW", "RDONLY", "NOACCESS")
TYPES = ("FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW")

# Anchored, with no nested or adjacent quantifiers: linear on any line
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.]*")
_HEX = re.compile(r"[0-9A-Fa-f]{1,8}")
_DEC = re.compile(r"[0-9]{1,20}")
_KEYS = frozenset(("version", "CID", "parentCID", "createType", "parentFileNameHint"))


def decimal(text: str) -> int | None:
    """An ASCII decimal of at most 20 digits, or None (never a Unicode digit)."""
    return int(text) if _DEC.fullmatch(text) else None


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
        key, eq, value = s.partition("=")
        key = key.strip()
        if not eq or not _KEY.fullmatch(key):
            raise bad("not a key=value or extent line")
        if key in _KEYS:  # the others (ddb.*, encoding...) are ignored, and not kept
            value = value.strip()
            if value.startswith('"') and (len(value) < 2 or value.find('"', 1) != len(value) - 1):
                # `createType="x"<junk>parentFileNameHint="y"`: never a value to guess at
                raise bad(f"{key} is not one quoted string")
            keys.setdefault(key, (_unquote(value), n))

    def get(key: str) -> tuple[str, int] | None:
        return keys.get(key)

    def hexval(key: str) -> int | None:
        v = get(key)
        if v is None:
            return None
        value, n = v
        if not _HEX.fullmatch(value):
            raise CorruptImage(path, f"descriptor line {n}: {key} is not 8 hex digits", at)
        return int(value, 16)

    ct = get("createType")
    if ct is None:
        raise CorruptImage(path, "descriptor has no createType", at)
    version = 1
    v = get("version")
    if v is not None:
        number = decimal(v[0]) if len(v[0]) <= 3 else None
        if number is None:
            raise CorruptImage(path, f"descriptor line {v[1]}: version is not a number", at)
        version = number
    cid = hexval("CID")
    pcid = hexval("parentCID")
    hint = get("parentFileNameHint")
    total = 0
    for e in extents:
        total += e.sectors
        if total >= MAX_SECTORS:
            raise CorruptImage(
                path, f"descriptor line {e.line}: the extents add up to 2^63 bytes or more", at
            )
    return Descriptor(
        version=version,
        cid=cid,
        parent_cid=NO_PARENT if pcid is None else pcid,
        create_type=ct[0],
        parent_hint=hint[0] if hint is not None and hint[0] else None,
        extents=tuple(extents),
    )


def _fields(s: str) -> tuple[str, str, str, str | None, str | None] | None:
    """``ACCESS SECTORS TYPE ["FILE" [OFFSET]]`` split in one pass, or None."""
    parts = s.split(None, 3)
    if len(parts) < 3:
        return None
    if len(parts) == 3:
        return parts[0], parts[1], parts[2], None, None
    rest = parts[3]
    if rest[0] != '"':
        return None
    close = rest.find('"', 1)
    if close < 0:
        return None
    tail = rest[close + 1 :]
    offset = tail.strip()
    if offset and (not tail[0].isspace() or len(offset.split()) != 1):
        return None
    return parts[0], parts[1], parts[2], rest[1:close], offset or None


def _extent(s: str, n: int, bad: Callable[[str], CorruptImage]) -> ExtentLine:
    fields = _fields(s)
    if fields is None:
        raise bad('malformed extent line (expected ACCESS SECTORS TYPE ["FILE" [OFFSET]])')
    access, size, etype, fname, offset = fields
    sectors = decimal(size)
    if sectors is None or sectors == 0 or sectors >= MAX_SECTORS:
        raise bad("extent size is not a positive number of sectors")
    if etype not in TYPES:
        raise bad("unknown extent type")
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
    first = 0
    if offset is not None:
        number = decimal(offset)
        if number is None or number > MAX_SECTORS:
            raise bad("extent offset is not a number of sectors")
        first = number
    return ExtentLine(access, sectors, etype, fname, first, n)


def _looks_like_text(head: bytes) -> bool:
    """A descriptor file: text up to its first NUL (QEMU pads a rewritten one with NULs)."""
    text = head.split(b"\0", 1)[0]
    return bool(text) and not any(b < 9 or 13 < b < 32 for b in text)


_FOREIGN = {b"QFI\xfb": "qcow2", b"conectix": "vpc/vhd", b"vhdxfile": "vhdx", b"QED\x00": "qed"}


# A descriptor file is recognised by its first 2 KiB (what QEMU's probe sees)
DESCRIPTOR_HEAD = 2048
SIGNATURE = b"# Disk DescriptorFile"


def not_a_descriptor(head: bytes, first: bytes) -> bool:
    """Is a file that is not a sparse extent (``head``: its first sector; ``first``: its first
    2 KiB) no descriptor either? It must be text and carry the signature line VMware writes
    first, or pass QEMU's rule (``version=`` first). Checked before any parsing."""
    if any(head.startswith(m) for m in _FOREIGN) or not _looks_like_text(head):
        return True
    return not (first.startswith(SIGNATURE) or looks_like_descriptor(first))


def refuse_not_vmdk(path: str, head: bytes) -> UnsupportedImage:
    for magic, name in _FOREIGN.items():
        if head.startswith(magic):
            return UnsupportedImage(path, f"is a {name} image, not a VMDK")
    return UnsupportedImage(path, "not a VMDK (no KDMV header, no '# Disk DescriptorFile' descriptor)")
