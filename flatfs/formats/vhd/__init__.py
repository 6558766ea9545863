"""VHD (Microsoft Virtual Hard Disk 1.0): fixed, dynamic and differencing disks.

The format is called ``vpc``, QEMU's name, so that ``-f vpc`` and a qcow2
``backing_fmt=vpc`` mean the same to flatfs as to qemu-img; ``vhd`` is an
alias because that is what users and the file names call it.
"""

from __future__ import annotations

from ..api import Format
from .layer import VhdLayer
from .spec import looks_like_vhd

FORMAT = Format("vpc", probe=looks_like_vhd, open=VhdLayer, aliases=("vhd",), suffixes=(".vhd",))
