"""Hand-broken VDIs: every validated field gives one line through the CLI, exit 1.

Where QEMU refuses the same image, the test records it too.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ..helpers.cli import flatfs
from ..helpers.images import poke
from ..helpers.needs import have_qemu
from ..helpers.vdi_writer import BLOCK, Vdi, pattern

M = BLOCK

# (name, offset, struct format, value, words the error must have, QEMU refuses it too)
CASES = [
    ("signature", 64, "<I", 0xBEDA1070, "not a VDI image (bad signature)", None),
    ("version", 68, "<I", 0x00010000, "VDI version 1.0 is not supported", True),
    ("header size", 72, "<I", 0x100, "header size 256", False),
    ("header size past the map", 72, "<I", 0x400, "overlaps the header", False),
    ("type undo", 76, "<I", 3, "undo images", False),
    ("type unknown", 76, "<I", 9, "unknown VDI image type 9", False),
    ("map offset unaligned", 340, "<I", 0x201, "block map offset 0x201 is not sector aligned", True),
    ("map offset past the file", 340, "<I", 0x7FFFFE00, "past the end of the file", False),
    ("map over the header", 340, "<I", 0, "overlaps the header", False),
    ("data offset unaligned", 344, "<I", 0x100001, "data offset 0x100001 is not sector aligned", True),
    ("data over the map", 344, "<I", 0x200, "overlaps the block map", False),
    ("sector size", 360, "<I", 4096, "sector size 4096", True),
    ("disk size", 368, "<Q", 6 * M, "does not fit in 4 blocks", True),
    ("block size", 376, "<I", 2 * M, "block size 2097152 is not supported", True),
    ("block extra", 380, "<I", 512, "block extra data", False),
    ("too many blocks", 384, "<I", 0x40000000, "too many blocks", True),
    ("blocks allocated", 388, "<I", 5, "5 blocks allocated", False),
    ("block map entry", 0x200 + 4, "<I", 4, "block map entry 1 points to block 4", False),
]


def base(tmp_path: Path) -> Path:
    return Vdi(4 * M, blocks={0: pattern(1), 1: pattern(2), 3: pattern(3)}).write(tmp_path / "disk.vdi")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_field_is_one_line(tmp_path, case):
    name, off, fmt, value, words, qemu_refuses = case
    img = base(tmp_path)
    poke(img, off, fmt, value)
    # a block map entry is checked when the map is read (info reads the header only)
    cmds = [["map"], ["convert", "-O", "raw"]]
    if name != "block map entry":
        cmds.insert(0, ["info"])
    for cmd in cmds:
        # -f vdi: probed, a file without the signature is raw (as QEMU probes it)
        args = [*cmd, "-f", "vdi", img] + ([tmp_path / "out.raw"] if cmd[0] == "convert" else [])
        res = flatfs(*args, check=False)
        assert res.returncode == 1, (cmd, res.stdout)
        err = res.stderr
        assert err.count("\n") == 1 and err.startswith("flatfs: "), err
        assert words in err, err
        assert "Traceback" not in err
    if qemu_refuses is not None and have_qemu():
        import subprocess

        r = subprocess.run(["qemu-img", "info", "-f", "vdi", str(img)], capture_output=True, text=True)
        assert (r.returncode != 0) == qemu_refuses, r.stderr


def test_differencing_image_without_parent_uuid(tmp_path):
    img = Vdi(2 * M, kind=4).write(tmp_path / "d.vdi")
    res = flatfs("info", img, check=False)
    assert res.returncode == 1 and "without a parent UUID" in res.stderr


def test_truncated_header(tmp_path):
    img = base(tmp_path)
    with open(img, "r+b") as f:
        f.truncate(300)
    res = flatfs("info", "-f", "vdi", img, check=False)
    assert res.returncode == 1 and "too short for a VDI header" in res.stderr


def test_odd_disk_size_is_rounded_up_to_sectors_as_qemu_does(tmp_path):
    img = Vdi(2 * M, blocks={1: pattern(7)}).write(tmp_path / "odd.vdi")
    poke(img, 368, "<Q", 2 * M - 1000)
    res = flatfs("info", "--output=json", img)
    assert '"virtual-size": 2096640' in res.stdout  # 2 MiB - 1000 rounded up to 512


def test_data_block_past_the_end_of_the_file_reads_zeros_as_qemu_does(tmp_path):
    img = base(tmp_path)
    size = img.stat().st_size
    with open(img, "r+b") as f:
        f.truncate(size - M // 2)
    out = tmp_path / "out.raw"
    assert flatfs("convert", "-O", "raw", img, out).returncode == 0
    data = out.read_bytes()
    assert struct.unpack_from("<I", img.read_bytes(), 0x200)[0] == 2  # block 0 is stored last
    assert data[: M // 2] == pattern(1, M // 2) and data[M // 2 : M] == bytes(M // 2)
