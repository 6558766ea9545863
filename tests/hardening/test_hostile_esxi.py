"""The hostile-image rules of issue 23 applied to ESXi's delta extents (vmfsSparse, seSparse).

Their grain directories count against the chain-wide table budget, and a
directory may point at no more grain tables than its file can hold. Every
command runs under RLIMIT_AS (512 MiB) and a wall-clock limit
(tests/helpers/hostile.py): a regression fails instead of swapping.
"""

from __future__ import annotations

import struct
from array import array
from pathlib import Path

from ..helpers.esxi_writer import write_descriptor, write_sesparse
from ..helpers.hostile import refused

SECTOR = 512
GTES = 4096  # entries of a vmfsSparse grain table


def _cowd(path: Path, gd_entries: int, entry: int = 0) -> int:
    """A COWD extent of one-sector grains whose directory (at sector 4) has ``gd_entries``
    entries, each ``entry``; returns its capacity in sectors."""
    capacity = gd_entries * GTES
    hdr = struct.pack("<4sIIIIIII", b"COWD", 1, 3, capacity, 1, 4, gd_entries, 0)
    with open(path, "wb") as f:
        f.write(hdr.ljust(4 * SECTOR, b"\0"))
        f.write((array("I", [entry]) * gd_entries).tobytes())
    return capacity


def test_cowd_directories_count_against_the_chain_budget(tmp_path: Path) -> None:
    """256 extents name one COWD file with a 256 Ki-entry directory: 2 MiB of budget each."""
    capacity = _cowd(tmp_path / "big-delta.vmdk", 256 << 10)
    top = write_descriptor(
        tmp_path / "top.vmdk", "vmfsSparse", [(capacity, "VMFSSPARSE", "big-delta.vmdk")] * 256
    )
    for args in (["info", top], ["map", top]):
        assert "MAX_CHAIN_TABLES" in refused(*args)


def test_cowd_directory_pointing_at_more_tables_than_the_file_holds(tmp_path: Path) -> None:
    """512 Ki directory entries in a 2 MiB file, every one naming a grain table."""
    capacity = _cowd(tmp_path / "big-delta.vmdk", 512 << 10, entry=1)
    top = write_descriptor(tmp_path / "top.vmdk", "vmfsSparse", [(capacity, "VMFSSPARSE", "big-delta.vmdk")])
    for args in (["info", top], ["map", top]):
        assert "more than the file can hold" in refused(*args)


def test_sesparse_directories_count_against_the_chain_budget(tmp_path: Path) -> None:
    """64 extents name one (sparse) seSparse file of 16 TiB: a 1 Mi-entry directory each
    (8 MiB held per extent: 512 MiB in all without the budget)."""
    capacity = 16 << 40
    write_sesparse(tmp_path / "big-sesparse.vmdk", capacity, {})
    extents = [(capacity // SECTOR, "SESPARSE", "big-sesparse.vmdk")] * 64
    top = write_descriptor(tmp_path / "top.vmdk", "seSparse", extents)
    assert "MAX_CHAIN_TABLES" in refused("info", top)
