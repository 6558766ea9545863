"""Which descriptor createTypes and extent types flatfs reads, and the ESXi extents' dispatch.

ESXi names a disk's kind in its descriptor: ``vmfs`` (and the VMFS
provisioning variants ``vmfsThin``, ``vmfsPreallocated``,
``vmfsEagerZeroedThick``) is a flat ``-flat.vmdk``; ``vmfsSparse`` a COWD
``-delta.vmdk``; ``seSparse`` a ``-sesparse.vmdk``. QEMU reads ``vmfs``,
``vmfsSparse`` and ``seSparse`` and refuses the three provisioning variants,
whose data is a flat file all the same after a copy off a datastore.
A raw device mapping's data lives on a LUN, not in any file: refused by name.
"""

from __future__ import annotations

import os

from ...errors import ImageIOError, UnsupportedImage
from ..api import OpenContext
from .cowd import MAGIC as COWD_MAGIC
from .cowd import CowdExtent
from .descriptor import ExtentLine
from .grains import GrainExtent
from .sesparse import SeSparseExtent

# createTypes of a descriptor file that flatfs reads
DESCRIPTOR_TYPES = (
    "monolithicFlat",
    "vmfs",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "vmfsSparse",
    "seSparse",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
)
_RDM = "the data lives on a LUN, not in a file"
# createTypes and extent types refused by name
REFUSED_TYPES = {
    "vmfsRaw": f"vmfsRaw (a raw device: {_RDM})",
    "vmfsRawDeviceMap": f"vmfsRawDeviceMap (a raw device mapping: {_RDM})",
    "vmfsRDM": f"vmfsRDM (a raw device mapping: {_RDM})",
    "vmfsPassthroughRawDeviceMap": f"vmfsPassthroughRawDeviceMap (a raw device mapping: {_RDM})",
    "vmfsRDMP": f"vmfsRDMP (a raw device mapping: {_RDM})",
    "VMFSRDM": f"VMFSRDM (a raw device mapping: {_RDM})",
    "VMFSRAW": f"VMFSRAW (a raw device: {_RDM})",
}
# every other createType VMware documents, refused by name too
OTHER_TYPES = ("monolithicSparse", "streamOptimized", "fullDevice", "partitionedDevice", "custom")
KNOWN_TYPES = frozenset(DESCRIPTOR_TYPES) | frozenset(REFUSED_TYPES) | frozenset(OTHER_TYPES)


def unsupported_type(path: str, create_type: str) -> UnsupportedImage:
    """The error for a descriptor whose createType flatfs does not read. The type is named
    only when it is one of VMware's: the text may be any host file's."""
    if create_type in REFUSED_TYPES:
        return UnsupportedImage(path, f"{REFUSED_TYPES[create_type]} disks are not supported")
    name = repr(create_type) if create_type in KNOWN_TYPES else "(unknown)"
    return UnsupportedImage(path, f"descriptor of createType {name} is not supported")


def esxi_extent(path: str, fd: int, line: ExtentLine, ctx: OpenContext | None) -> GrainExtent | None:
    """The ESXi extent a SPARSE, VMFSSPARSE or SESPARSE line names, or None (a hosted KDMV one).

    As QEMU: a SESPARSE line must name a seSparse file; a SPARSE or VMFSSPARSE
    line a sparse file of either kind, told apart by its magic.
    """
    if line.type == "SESPARSE":
        return SeSparseExtent(path, fd, line, ctx)
    try:
        head = os.pread(fd, 4, 0)
    except OSError as exc:
        raise ImageIOError.from_oserror(path, exc, 0) from None
    if head == COWD_MAGIC:
        return CowdExtent(path, fd, line, ctx)
    return None
