"""Fixed and dynamic VHDX made by qemu-img and written with qemu-io: QEMU is the oracle.

QEMU 7.2's vhdx driver has no block-status, so `qemu-img map` calls every byte
data; flatfs's map is checked against the blocks the test wrote instead, and
its bytes against `qemu-img convert -O raw`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flatfs import open_chain
from flatfs.extents import Kind

from ..helpers.cli import flatfs
from ..helpers.qemu import Qemu
from ..helpers.vhdx_images import first_difference, libvhdi_read, read_all

M = 1 << 20
WRITES = ["write -P 0x11 0 1M", "write -P 0x22 5M 4k", "write -z 40M 1M", "write -P 0x33 63M 512"]


@pytest.mark.parametrize(
    "opts",
    [
        "subformat=dynamic",
        "subformat=dynamic,block_size=1M",
        "subformat=dynamic,block_size=256M",
        "subformat=fixed",
        "subformat=fixed,block_size=2M",
    ],
)
def test_reads_what_qemu_reads(tmp_path: Path, qemu: Qemu, opts: str) -> None:
    img = qemu.create(tmp_path / "d.vhdx", "64M", fmt="vhdx", opts=opts)
    qemu.io(img, *WRITES, fmt="vhdx")
    ref = qemu.to_raw(img, tmp_path / "ref.raw").read_bytes()
    assert first_difference(read_all(img), ref) is None
    # what QEMU's map says: everything is data (no block-status in its vhdx driver)
    assert [(e["start"], e["length"], e["data"]) for e in qemu.map(img)] == [(0, 64 * M, True)]
    bs = {"1M": M, "2M": 2 * M, "256M": 256 * M}.get(opts.rsplit("=", 1)[-1], None)
    with open_chain(img) as chain:
        info = chain.layers[0].info()
        bs = info["block-size"]
        data = [(e.start, e.end) for e in chain.extents() if e.kind is Kind.DATA]
    # every byte flatfs reads is inside a block the test wrote
    written = {0, 5 * M // bs, 40 * M // bs, 63 * M // bs}
    for s, e in data:
        assert s // bs in written and (e - 1) // bs in written, (s, e)
    if "dynamic" in opts:
        assert info["disk-type"] == "dynamic"
        assert sum(e - s for s, e in data) <= len(written) * bs


def test_matches_libvhdi(tmp_path: Path, qemu: Qemu, libvhdi) -> None:
    img = qemu.create(tmp_path / "d.vhdx", "64M", fmt="vhdx", opts="subformat=dynamic,block_size=1M")
    qemu.io(img, *WRITES, fmt="vhdx")
    assert first_difference(read_all(img), libvhdi_read([img])) is None


def test_convert_is_what_qemu_reads(tmp_path: Path, qemu: Qemu) -> None:
    img = qemu.create(tmp_path / "d.vhdx", "64M", fmt="vhdx", opts="subformat=dynamic")
    qemu.io(img, *WRITES, fmt="vhdx")
    out = tmp_path / "out.qcow2"
    r = flatfs("convert", img, out)
    assert r.returncode == 0, r.stderr
    qemu.img("check", out)
    assert qemu.img("compare", "-f", "vhdx", "-F", "qcow2", img, out, check=False).returncode == 0
    raw = tmp_path / "out.raw"
    flatfs("convert", "-O", "raw", img, raw)
    assert qemu.img("compare", "-f", "vhdx", "-F", "raw", img, raw, check=False).returncode == 0


def test_info_shows_vhdx_facts(tmp_path: Path, qemu: Qemu) -> None:
    img = qemu.create(tmp_path / "d.vhdx", "64M", fmt="vhdx", opts="subformat=dynamic,block_size=1M")
    r = flatfs("info", img)
    for want in ("format:        vhdx", "block size", "1048576", "logical sector size", "log", "clean"):
        assert want in r.stdout, r.stdout


def test_probe_knows_vhdx(tmp_path: Path, qemu: Qemu) -> None:
    img = qemu.create(tmp_path / "d.vhdx", "8M", fmt="vhdx")
    with open_chain(img) as chain:
        assert chain.format == "vhdx"
