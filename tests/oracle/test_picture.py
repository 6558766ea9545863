"""`flatfs map --output=svg` and the data strip of `flatfs info`."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from flatfs.chain import OpenOptions, open_chain
from flatfs.extents import K_ABSENT, K_DATA, K_ZERO
from flatfs.picture import cells

from ..helpers.qemu import Qemu

SVG = "{http://www.w3.org/2000/svg}"


def _flatfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flatfs", *args], capture_output=True, text=True)


def test_cells_keep_the_strongest_thing_in_each_cell() -> None:
    runs = [
        (0, 10, K_ABSENT, 0),
        (10, 11, K_DATA, 1),
        (11, 50, K_ZERO, 0),
        (50, 100, K_ABSENT, 0),
        (99, 100, K_DATA, 0),
    ]
    assert cells(runs, 100, 4) == [(2, 1), (1, 0), (0, 0), (2, 0)]
    # data from two depths in one cell: the layer nearest the top wins
    assert cells([(0, 1, K_DATA, 3), (1, 2, K_DATA, 1)], 8, 1) == [(2, 1)]
    assert cells([], 0, 3) == [(0, 0)] * 3


def test_svg_of_a_huge_disk_with_tiny_data_shows_it(qemu: Qemu, tmp_path: Path) -> None:
    base = qemu.create(tmp_path / "base.qcow2", "64T")
    qemu.io(base, "write -P 1 40T 4k")
    top = qemu.create(tmp_path / "top & <top>.qcow2", "64T", backing=base.name, backing_fmt="qcow2")
    qemu.io(top, "write -z 0 64k")
    res = _flatfs("map", "--output=svg", str(top))
    assert res.returncode == 0, res.stderr
    root = ET.fromstring(res.stdout)  # well-formed, the file name escaped
    assert root.tag == SVG + "svg"
    texts = "".join(t.text or "" for t in root.iter(SVG + "text"))
    assert "top & <top>.qcow2" in texts and "64 TiB" in texts
    rects = [r.attrib for r in root.iter(SVG + "rect")]
    # 4 KiB of data in 64 TiB still gets a cell, coloured, at 40/64 of the band's width
    coloured = [
        r for r in rects if r.get("fill") not in ("#ffffff", "#c8c8c8") and r.get("y") != rects[-1]["y"]
    ]
    xs = {int(r["x"]) for r in coloured}
    assert any(abs(x - (10 + 960 * 40 // 64)) <= 1 for x in xs), xs
    # the overlay's zero cluster shows as zeros in its own band
    assert any(r.get("fill") == "#c8c8c8" and r["x"] == "10" for r in rects)


def test_info_strip_shows_the_data_at_its_own_resolution(
    qemu: Qemu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = qemu.create(tmp_path / "frag.qcow2", "2G")
    qemu.io(img, *(f"write -P 7 {i * 8}M 4k" for i in range(0, 64, 9)), "write -P 7 1536M 4k")
    res = _flatfs("info", str(img))
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if "data map:" in ln]
    strip = line.split("[", 1)[1].rstrip("]")
    # 64 cells of 32 MiB: the 4 KiB writes at 0, 72, 144, ... 504 MiB and 1536 MiB, each in its cell
    want = ["."] * 64
    for off in [i * 8 for i in range(0, 64, 9)] + [1536]:
        want[off // 32] = "#"
    assert strip == "".join(want), strip
    from flatfs import picture

    # past its budget of runs, the strip is drawn from the L1 table alone and says so: one L2
    # table covers 512 MiB with 64 KiB clusters, so quarters 1 and 4 show data
    monkeypatch.setattr(picture, "EXACT_RUNS", 1)
    with open_chain(img, OpenOptions(force_share=True)) as chain:
        assert picture.strip_and_resolution(chain, 0) == ("#" * 16 + "." * 32 + "#" * 16, False)
