"""qcow2 internal snapshots: listed as `qemu-img info` lists them, and read with -l exactly as
`qemu-img convert -l` reads them, in info, map, convert, measure and mount."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from flatfs import OpenOptions, open_chain

from ..helpers.cli import flatfs, one_line_error
from ..helpers.qemu import Qemu, qemu_info

M = 1 << 20

# (selector for flatfs -l, the same for qemu-img -l)
SELECTORS = [
    ("1", "snapshot.id=1"),
    ("two", "snapshot.name=two"),
    ("snapshot.id=3", "snapshot.id=3"),
    ("snapshot.name=one", "snapshot.name=one"),
]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 over a qcow2 backing file with three snapshots, the data changed between each."""
    q = Qemu()
    d = tmp_path_factory.mktemp("snapshots")
    if q.img("--version", check=False).returncode:
        pytest.skip("qemu-img is not installed")
    base = q.create(d / "base.qcow2", "4M")
    q.io(base, "write -P 0x11 0 4M")
    top = q.create(d / "top.qcow2", "4M", backing="base.qcow2", opts="cluster_size=4096")
    q.io(top, "write -P 0xa1 0 64k", "write -P 0xa2 1M 8k")
    q.img("snapshot", "-c", "one", top)
    q.io(top, "write -P 0xb1 32k 64k", "write -z 1M 4k", "write -P 0xb2 3M 12k")
    q.img("snapshot", "-c", "two", top)
    q.io(top, "discard 0 64k", "write -P 0xc1 2M 4k")
    q.img("snapshot", "-c", "three", top)
    q.io(top, "write -P 0xd1 0 4k")  # the active state differs from every snapshot
    return top


def _qemu_raw(q: Qemu, img: Path, sel: str, out: Path) -> bytes:
    q.img("convert", "-l", sel, "-O", "raw", img, out)
    return out.read_bytes()


@pytest.mark.parametrize("ours,theirs", SELECTORS)
def test_convert_reads_as_qemu(qemu: Qemu, image: Path, tmp_path: Path, ours: str, theirs: str) -> None:
    want = _qemu_raw(qemu, image, theirs, tmp_path / "q.raw")
    flatfs("convert", "-l", ours, "-O", "raw", image, tmp_path / "f.raw")
    assert (tmp_path / "f.raw").read_bytes() == want
    flatfs("convert", "-l", ours, image, tmp_path / "f.qcow2")
    same = qemu.img("compare", "-f", "raw", "-F", "qcow2", tmp_path / "q.raw", tmp_path / "f.qcow2")
    assert same.returncode == 0


def test_snapshots_differ_and_chain_reads_below(qemu: Qemu, image: Path, tmp_path: Path) -> None:
    """Every snapshot reads differently (so a test that read the active L1 would fail), and the
    backing file shows through where a snapshot has nothing of its own."""
    seen = set()
    for n in ("1", "2", "3"):
        with open_chain(image, OpenOptions(snapshot=n)) as chain:
            buf = bytearray(chain.size)
            chain.readinto(0, memoryview(buf))
        assert bytes(buf) == _qemu_raw(qemu, image, f"snapshot.id={n}", tmp_path / f"{n}.raw")
        assert buf[3 * M + 64 * 1024] == 0x11  # the backing file below
        seen.add(bytes(buf))
    assert len(seen) == 3


def test_map_is_truthful(qemu: Qemu, image: Path, tmp_path: Path) -> None:
    """map -l: every byte outside the data ranges reads as zeros, every data range is the snapshot's."""
    want = _qemu_raw(qemu, image, "snapshot.id=2", tmp_path / "q.raw")
    entries = json.loads(flatfs("map", "-l", "2", "--output", "json", image).stdout)
    assert sum(e["length"] for e in entries) == len(want)
    for e in entries:
        if not e["data"]:
            assert want[e["start"] : e["start"] + e["length"]].count(0) == e["length"]
    # depth: 0 where the snapshot's own clusters are, 1 where base.qcow2 shows through
    depth_at = {e["start"]: e["depth"] for e in entries}
    assert depth_at[0] == 0 and max(depth_at.values()) == 1
    other = json.loads(flatfs("map", "-l", "1", "--output", "json", image).stdout)
    assert other != entries


def test_measure_matches_the_snapshot_alone(qemu: Qemu, image: Path, tmp_path: Path) -> None:
    """measure -l N of the top image alone gives what measure gives for QEMU's own copy of
    snapshot N's clusters (``convert -B``: what differs from the backing file)."""
    copy = tmp_path / "snap.qcow2"
    base = image.parent / "base.qcow2"
    qemu.img("convert", "-l", "snapshot.id=1", "-O", "qcow2", "-B", base, "-F", "qcow2", image, copy)
    got = json.loads(flatfs("measure", "--no-backing", "-l", "1", "--output", "json", image).stdout)
    ref = json.loads(flatfs("measure", "--no-backing", "--output", "json", copy).stdout)
    active = json.loads(flatfs("measure", "--no-backing", "--output", "json", image).stdout)
    assert got == ref and got["required"] < active["required"]


def test_info_lists_snapshots_as_qemu(qemu: Qemu, image: Path) -> None:
    top = json.loads(flatfs("info", "--output", "json", image).stdout)[0]
    assert top["snapshots"] == qemu_info(qemu, image)["snapshots"]
    human = flatfs("info", image).stdout
    listed = qemu.img("snapshot", "-l", image).stdout.splitlines()[1:]
    body = [line.strip() for line in human.splitlines()]
    for row in listed:  # same columns as qemu-img snapshot -l / qemu-img info
        assert row.strip() in body, (row, human)
    chosen = json.loads(flatfs("info", "-l", "two", "--output", "json", image).stdout)[0]
    assert chosen["snapshot"]["id"] == "2"
    assert "read at:       snapshot 2 (two)" in flatfs("info", "-l", "two", image).stdout


def test_mount_shows_the_snapshot(qemu: Qemu, mounter, image: Path, tmp_path: Path) -> None:
    view = mounter.mount(image, None, "-l", "three")
    assert view.read_bytes() == _qemu_raw(qemu, image, "snapshot.name=three", tmp_path / "q.raw")


def test_v2_image_has_no_icount(qemu: Qemu, tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "v2.qcow2", "1M", opts="compat=0.10")
    qemu.io(img, "write -P 1 0 4k")
    qemu.img("snapshot", "-c", "old", img)
    qemu.io(img, "write -P 2 0 4k")
    top = json.loads(flatfs("info", "--output", "json", img).stdout)[0]
    assert top["snapshots"] == qemu_info(qemu, img)["snapshots"]
    flatfs("convert", "-l", "old", "-O", "raw", img, tmp_path / "f.raw")
    assert (tmp_path / "f.raw").read_bytes() == _qemu_raw(qemu, img, "old", tmp_path / "q.raw")


def test_unknown_and_ambiguous_names(qemu: Qemu, tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "a.qcow2", "1M")
    for name in ("dup", "dup", "1"):
        qemu.img("snapshot", "-c", name, img)
    for cmd in (["info"], ["map"], ["measure"]):
        one_line_error([*cmd, "-l", "nope", img], "no internal snapshot 'nope'", "1 (dup)")
        one_line_error([*cmd, "-l", "dup", img], "ambiguous", "IDs 1, 2", "snapshot.id=")
    # an ID wins over a name, as in QEMU: "1" is snapshot 1, not the one named "1"
    chosen = json.loads(flatfs("info", "-l", "1", "--output", "json", img).stdout)[0]
    assert chosen["snapshot"]["name"] == "dup"
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    one_line_error(["info", "-l", "1", raw], "raw images have no internal snapshots")
    one_line_error(["convert", "-l", "dup", "-O", "raw", img, tmp_path / "out.raw"], "ambiguous")
    assert not (tmp_path / "out.raw").exists()


def test_hostile_snapshot_l1(qemu: Qemu, tmp_path: Path) -> None:
    """A snapshot's L1 table past the end of the file, misaligned or too large: one line when it
    is chosen; the image still opens without -l (QEMU checks it only when loading the snapshot)."""
    img = qemu.create(tmp_path / "a.qcow2", "1M")
    qemu.img("snapshot", "-c", "s", img)
    snap_off = struct.unpack_from(">Q", img.read_bytes(), 64)[0]
    good = img.read_bytes()
    for field, fmt, value, words in (
        (0, ">Q", 1 << 40, ["L1 table of snapshot 1", "outside the file"]),
        (0, ">Q", 65536 + 8, ["not cluster aligned"]),
        (8, ">I", 1 << 30, ["too large"]),
    ):
        data = bytearray(good)
        struct.pack_into(fmt, data, snap_off + field, value)
        img.write_bytes(data)
        one_line_error(["map", "-l", "1", img], *words)
        flatfs("map", img)
    data = bytearray(good)
    struct.pack_into(">I", data, snap_off + 36, 4096)  # extra data beyond QEMU's bound
    img.write_bytes(data)
    one_line_error(["info", img], "snapshot table entry 0 has too much extra data")


def test_info_names_the_external_data_file(qemu: Qemu, tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "d.qcow2", "1M", opts="data_file=d.data")
    assert "    data file:     d.data\n" in flatfs("info", img).stdout
    assert json.loads(flatfs("info", "--output", "json", img).stdout)[0]["data-file-name"] == "d.data"
