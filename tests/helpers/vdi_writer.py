"""A small VDI 1.1 writer that follows VirtualBox's header layout, for tests only.

No Linux tool makes differencing VDIs (VirtualBox snapshots), so the tests
write them here: a header of VDIHEADER1PLUS size, the block map at 0x200,
the data area aligned to 1 MiB as VirtualBox places it, blocks stored in the
order given (not guest order), and a ``.vbox`` media registry.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

BLOCK = 1 << 20
FREE = 0xFFFFFFFF
ZERO = 0xFFFFFFFE
DYNAMIC, STATIC, DIFF = 1, 2, 4
PREHEADER_TEXT = b"<<< Oracle VM VirtualBox Disk Image >>>\n"


@dataclass
class Vdi:
    """One image to write: ``blocks`` maps a guest block index to its 1 MiB of data, or to ZERO."""

    size: int
    kind: int = DYNAMIC
    blocks: dict[int, bytes | int] = field(default_factory=dict)
    create: uuid.UUID = field(default_factory=uuid.uuid4)
    modify: uuid.UUID = field(default_factory=uuid.uuid4)
    linkage: uuid.UUID | None = None
    parent_modify: uuid.UUID | None = None
    order: list[int] | None = None  # file order of the allocated blocks (default: reversed guest order)

    def over(self, parent: Vdi) -> Vdi:
        """Make this a differencing image over ``parent``."""
        self.kind = DIFF
        self.linkage = parent.create
        self.parent_modify = parent.modify
        return self

    @property
    def nblocks(self) -> int:
        return -(-self.size // BLOCK)

    def write(self, path: str | os.PathLike[str]) -> Path:
        n = self.nblocks
        bmap = [FREE] * n
        stored = [b for b, v in self.blocks.items() if not isinstance(v, int)]
        stored = self.order if self.order is not None else sorted(stored, reverse=True)
        for b, v in self.blocks.items():
            if isinstance(v, int):
                bmap[b] = v
        if self.kind == STATIC:
            stored = list(range(n))
        for i, b in enumerate(stored):
            bmap[b] = i
        off_bmap = 0x200
        off_data = -(-(off_bmap + 4 * n) // BLOCK) * BLOCK
        head = bytearray(off_bmap)
        head[: len(PREHEADER_TEXT)] = PREHEADER_TEXT
        null = b"\0" * 16
        struct.pack_into("<IIIII", head, 64, 0xBEDA107F, 0x00010001, 0x190, self.kind, 0)
        struct.pack_into(
            "<IIIIIIIQIIII16s16s16s16sIIII",
            head,
            340,
            off_bmap,
            off_data,
            0,
            0,
            0,
            512,
            0,
            self.size,
            BLOCK,
            0,
            n,
            len(stored),
            self.create.bytes_le,
            self.modify.bytes_le,
            self.linkage.bytes_le if self.linkage else null,
            self.parent_modify.bytes_le if self.parent_modify else null,
            0,
            0,
            0,
            512,
        )
        path = Path(path)
        with open(path, "wb") as f:
            f.write(head)
            f.write(struct.pack(f"<{n}I", *bmap))
            for i, b in enumerate(stored):
                v = self.blocks.get(b, b"")
                data = v if isinstance(v, bytes) else b""
                if data:
                    f.seek(off_data + i * BLOCK)
                    f.write(data.ljust(BLOCK, b"\0"))
            f.truncate(off_data + len(stored) * BLOCK)
        return path

    def content(self, parent: bytes | None = None) -> bytes:
        """What the guest reads: this image over ``parent``'s content (zeros if None)."""
        out = bytearray(self.size)
        if parent is not None and self.kind == DIFF:
            out[: min(len(parent), self.size)] = parent[: self.size]
        for b, v in self.blocks.items():
            end = min((b + 1) * BLOCK, self.size)
            if isinstance(v, int):
                if v == ZERO:
                    out[b * BLOCK : end] = bytes(end - b * BLOCK)
            else:
                out[b * BLOCK : end] = v.ljust(BLOCK, b"\0")[: end - b * BLOCK]
        return bytes(out)


def pattern(byte: int, n: int = BLOCK) -> bytes:
    return bytes([byte]) * n


def write_registry(path: str | os.PathLike[str], disks: list[tuple[Vdi, str]]) -> Path:
    """A VM's ``.vbox`` file: the first disk is the base, each next one a child of the previous."""
    inner = ""
    for img, loc in reversed(disks):
        ident = quoteattr("{" + str(img.create) + "}")
        inner = f'<HardDisk uuid={ident} location={quoteattr(loc)} format="VDI">{inner}</HardDisk>'
    text = (
        '<?xml version="1.0"?>\n'
        '<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">\n'
        f'  <Machine uuid="{{{uuid.uuid4()}}}" name="VM" OSType="Linux_64" snapshotFolder="Snapshots">\n'
        f"    <MediaRegistry><HardDisks>{inner}</HardDisks></MediaRegistry>\n"
        "  </Machine>\n</VirtualBox>\n"
    )
    path = Path(path)
    path.write_text(text)
    return path
