"""Static and dynamic VDIs made by qemu-img and written with qemu-io: QEMU is the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..helpers.cli import flatfs
from ..helpers.qemu import assert_matches_qemu, project_map
from ..helpers.vdi_writer import BLOCK, Vdi, pattern

M = BLOCK
WRITES = (
    "write -P 0x11 0 4k",
    "write -P 0x12 1M 1M",
    "write -z 3M 1M",
    "write -P 0x13 5M 512",
    "write -P 0x14 0x7ff000 8k",  # across a block boundary
    "write -P 0x15 12M 300k",
)


def make(qemu, path: Path, static: bool) -> Path:
    qemu.create(path, "13M", fmt="vdi", opts="static=on" if static else None)
    qemu.io(path, *WRITES, fmt="vdi")
    return path


@pytest.mark.qemu
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_content_and_map_match_qemu(qemu, tmp_path, static):
    img = make(qemu, tmp_path / "disk.vdi", static)
    assert_matches_qemu(qemu, img, tmp_path)
    cli = json.loads(flatfs("map", "--output=json", img).stdout)
    assert project_map(cli) == project_map(qemu.map(img))


@pytest.mark.qemu
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_convert_to_qcow2_and_raw_compares_equal(qemu, tmp_path, static):
    img = make(qemu, tmp_path / "disk.vdi", static)
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"out.{fmt}"
        res = flatfs("convert", "-O", fmt, img, out)
        assert res.returncode == 0, res.stderr
        if fmt == "qcow2":
            qemu.img("check", out)
        r = qemu.img("compare", "-f", "vdi", "-F", fmt, img, out, check=False)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.qemu
def test_info_of_a_qemu_made_vdi(qemu, tmp_path):
    img = make(qemu, tmp_path / "disk.vdi", True)
    row = json.loads(flatfs("info", "--output=json", img).stdout)[0]
    assert row["format"] == "vdi" and row["vdi-type"] == "static" and row["block-size"] == M
    assert row["virtual-size"] == 13 * M
    assert "backing-filename" not in row


@pytest.mark.qemu
def test_qemu_reads_what_our_writer_writes_as_a_base(qemu, tmp_path):
    """The writer's base images are valid VDIs for QEMU too (the writer follows the spec)."""
    img = Vdi(5 * M + 1024, blocks={0: pattern(1), 3: pattern(3, 777)})
    path = img.write(tmp_path / "w.vdi")
    ref = qemu.to_raw(path, tmp_path / "w.raw")
    assert ref.read_bytes() == img.content()
    assert_matches_qemu(qemu, path, tmp_path)


@pytest.mark.qemu
def test_qemu_refuses_a_differencing_vdi(qemu, tmp_path):
    """What docs/qemu-compat.md and the README say: QEMU 7.2 does not read type 4 images."""
    base = Vdi(2 * M, blocks={0: pattern(1)})
    base.write(tmp_path / "base.vdi")
    child = Vdi(2 * M, blocks={1: pattern(2)}).over(base)
    path = child.write(tmp_path / "child.vdi")
    r = qemu.img("info", path, check=False)
    assert r.returncode != 0
    assert "unsupported VDI image (non-NULL link UUID)" in r.stderr
    assert flatfs("info", path).returncode == 0
