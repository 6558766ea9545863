"""What bench/ shares with the tests, imported in this one place.

The benchmark builds some of its images with the tests' helpers (the VHDX writer, the
loop-mounted XFS, the deep qcow2 chain), so that the images it times are the ones the tests
check. Those helper modules are listed in ``tests/helpers/__init__.py`` (``BENCH_SHARED``);
tests/unit/test_bench_layout.py keeps every other bench module from importing ``tests``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers.chains import deep_qcow2_chain  # noqa: E402
from tests.helpers.esxi_writer import (  # noqa: E402
    SE_GRAIN,
    SE_GTES,
    grain_entry,
    sesparse_layout,
    write_descriptor,
    write_thin_flat,
)
from tests.helpers.loopfs import filefrag_extents, loop_xfs, loop_xfs_missing  # noqa: E402
from tests.helpers.qemu import Qemu  # noqa: E402
from tests.helpers.vhdx_writer import Parent, VhdxImage  # noqa: E402

__all__ = [
    "ROOT",
    "SE_GRAIN",
    "SE_GTES",
    "grain_entry",
    "sesparse_layout",
    "write_descriptor",
    "write_thin_flat",
    "Parent",
    "Qemu",
    "VhdxImage",
    "deep_qcow2_chain",
    "filefrag_extents",
    "loop_xfs",
    "loop_xfs_missing",
]
