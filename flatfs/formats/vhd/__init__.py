"""VHD (Microsoft Virtual Hard Disk 1.0): fixed, dynamic and differencing disks.

The format is called ``vpc``, QEMU's name, so that ``-f vpc`` and a qcow2
``backing_fmt=vpc`` mean the same to flatfs as to qemu-img; ``vhd`` is an
alias because that is what users and the file names call it.
"""

from __future__ import annotations

from ..api import Format
from .layer import VhdLayer
from .spec import looks_like_vhd

FORMAT = Format(
    "vpc",
    probe=looks_like_vhd,
    open=VhdLayer,
    aliases=("vhd",),
    suffixes=(".vhd",),
    info_rows=(
        ("disk-type", "disk type"),
        ("block-size", "block size"),
        ("creator", "creator"),
        ("unique-id", "unique id"),
        ("saved-state", "saved state"),
        ("parent-id", "parent id"),
        ("parent-name", "parent name"),
        ("locators", "locators"),
    ),
)
