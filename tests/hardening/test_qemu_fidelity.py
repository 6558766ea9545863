"""Two images QEMU refuses where flatfs once read them: both now refused the same way.

- extended L2 entries with clusters under 16 KiB: QEMU refuses the image at
  open ("unsupported subcluster size"); ``info`` must too, not only ``map``;
- a version 2 L2 entry with the zero flag (bit 0) set: zero clusters came
  with version 3, and QEMU fails the read and calls the image corrupt, where
  flatfs read zeros.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from ..helpers.qemu import Qemu

INCOMPATIBLE_AT = 72
EXTL2 = 1 << 4


def _flatfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flatfs", *args], capture_output=True, text=True)


def _one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def _be64(path: Path, at: int) -> int:
    with open(path, "rb") as f:
        f.seek(at)
        return int(struct.unpack(">Q", f.read(8))[0])


def _put64(path: Path, at: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(">Q", value))


def test_extended_l2_under_16k_clusters_is_refused_by_every_command(qemu: Qemu, tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "small.qcow2", "1M", opts="cluster_size=4096")
    _put64(img, INCOMPATIBLE_AT, _be64(img, INCOMPATIBLE_AT) | EXTL2)
    oracle = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True)
    assert oracle.returncode != 0 and "subcluster size" in oracle.stderr.lower(), oracle.stderr
    for cmd in (["info"], ["map"], ["convert", "-O", "raw"]):
        args = [*cmd, str(img)] + ([str(tmp_path / "out.raw")] if cmd[0] == "convert" else [])
        line = _one_line(_flatfs(*args))
        assert "unsupported subcluster size 128" in line and "16 KiB" in line, line
    assert not (tmp_path / "out.raw").exists()


def test_v2_zero_flag_fails_the_read_as_in_qemu(qemu: Qemu, tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "v2.qcow2", "1M", opts="compat=0.10")
    qemu.io(img, "write -P 0x41 0 64k")
    l1 = _be64(img, 40)  # l1_table_offset
    l2 = _be64(img, l1) & 0x00FFFFFFFFFFFE00
    _put64(img, l2, _be64(img, l2) | 1)  # guest cluster 0: data entry with the v3 zero flag
    oracle = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(img), str(tmp_path / "qemu.raw")],
        capture_output=True,
        text=True,
    )
    assert oracle.returncode != 0, "QEMU read the pre-v3 zero cluster"
    line = _one_line(_flatfs("convert", "-O", "raw", str(img), str(tmp_path / "out.raw")))
    assert "zero cluster entry in a version 2 image" in line, line
    assert not (tmp_path / "out.raw").exists()
    line = _one_line(_flatfs("map", str(img)))
    assert "zero cluster entry in a version 2 image" in line, line
