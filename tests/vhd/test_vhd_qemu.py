"""Fixed and dynamic VHDs made by qemu-img and written by qemu-io: flatfs reads and maps them
exactly as QEMU does (QEMU is the oracle for these), and converts them to an image QEMU checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatfs import OpenOptions, open_chain

from ..helpers.cli import flatfs
from ..helpers.qemu import Qemu, assert_matches_qemu

pytestmark = pytest.mark.qemu

M = 1 << 20
WRITES = ("write -P 0x11 0 4k", "write -P 0x22 3M 512", "write -P 0x33 5M 1M", "write -z 7M 64k")


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("size,force", [("10M", False), ("10M", True), ("33M", False), ("9001k", True)])
def test_qemu_made_vhd_reads_like_qemu(qemu: Qemu, tmp_path: Path, subformat: str, size: str, force: bool):
    opts = f"subformat={subformat}" + (",force_size=on" if force else "")
    img = qemu.create(tmp_path / "disk.vhd", size, fmt="vpc", opts=opts)
    qemu.io(img, *WRITES, fmt="vpc")
    # a fixed VHD has no magic at offset 0: QEMU and flatfs both need -f vpc
    assert_matches_qemu(qemu, img, tmp_path, options=OpenOptions(format="vpc"), qemu_fmt="vpc")
    out = tmp_path / "out.qcow2"
    flatfs("convert", "-f", "vhd", img, out)
    assert qemu.img("check", out).returncode == 0
    r = qemu.img("compare", "-F", "vpc", "-f", "qcow2", out, img, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_size_rule_follows_the_creator(qemu: Qemu, tmp_path: Path):
    """qemu-made (creator 'qemu'): the CHS geometry; force_size (creator 'qem2'): the current size."""
    sizes = {}
    for force in (False, True):
        img = qemu.create(
            tmp_path / f"d{force}.vhd", "10M", fmt="vpc", opts=f"force_size={'on' if force else 'off'}"
        )
        with open_chain(img) as chain:
            sizes[force] = chain.size
        info = qemu.img("info", "--output=json", "-f", "vpc", img).stdout
        assert f'"virtual-size": {sizes[force]}' in info
    assert sizes[True] == 10 * M and sizes[False] != 10 * M


def test_dynamic_vhd_is_probed_and_fixed_needs_f_unless_named_vhd(qemu: Qemu, tmp_path: Path):
    dyn = qemu.create(tmp_path / "d.vhd", "4M", fmt="vpc")
    fixed = qemu.create(tmp_path / "f.vhd", "4M", fmt="vpc", opts="subformat=fixed")
    assert "format:        vpc" in flatfs("info", dyn).stdout
    info = flatfs("info", "-f", "vhd", fixed).stdout
    assert "format:        vpc" in info and "disk type:     fixed" in info
    assert "format:        vpc" in flatfs("info", fixed).stdout  # by its footer and its name
    other = fixed.rename(tmp_path / "f.img")
    assert "format:        raw" in flatfs("info", other).stdout  # as qemu-img probes it
