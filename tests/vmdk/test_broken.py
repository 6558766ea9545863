"""Hand-broken VMDKs through the CLI: one line each, naming what is wrong; never a traceback.

Header and descriptor damage is refused when the disk is opened (info, map
and convert alike); damage in a grain table or a grain only when a request
reaches it (map, convert), so that `info` still describes the disk.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers.cli import error_line, flatfs
from ..helpers.images import peek, poke
from ..helpers.qemu import Qemu
from ..helpers.vmdk_oracle import create, gd_entry_at, gt_entry_at, header_field

M = 1 << 20

pytestmark = pytest.mark.qemu


def sparse(q: Qemu, d: Path, name: str = "disk.vmdk", **kw: str) -> Path:
    img = create(q, d / name, 8 * M, "monolithicSparse", **kw)
    q.io(img, "write -P 0x11 0 128k", "write -P 0x22 4M 64k", fmt="vmdk")
    return img


def split(q: Qemu, d: Path) -> Path:
    img = create(q, d / "split.vmdk", 8 * M, "twoGbMaxExtentSparse")
    q.io(img, "write -P 0x11 0 64k", fmt="vmdk")
    return img


def _set(field: str, value: int | bytes) -> Callable[[Qemu, Path], Path]:
    def make(q: Qemu, d: Path) -> Path:
        img = sparse(q, d)
        at, fmt = header_field(img, field)
        poke(img, at, fmt, value)
        return img

    return make


def _edit_descriptor(
    old: str, new: str, make_img: Callable[[Qemu, Path], Path] = split
) -> Callable[[Qemu, Path], Path]:
    def make(q: Qemu, d: Path) -> Path:
        img = make_img(q, d)
        text = img.read_bytes().split(b"\0")[0].decode()
        assert old in text, text
        img.write_text(text.replace(old, new, 1))
        return img

    return make


def _cowd(q: Qemu, d: Path) -> Path:
    img = d / "esx.vmdk"
    img.write_bytes(b"COWD" + bytes(2044))
    return img


def _huge_descriptor(q: Qemu, d: Path) -> Path:
    img = split(q, d)
    img.write_text(img.read_text() + 'ddb.comment = "' + "x" * (2 * M) + '"\n')
    return img


def _two_values_on_a_line(q: Qemu, d: Path) -> Path:
    """A hypothesis mutant: the newline after the embedded descriptor's createType became \\x01,
    so the parent's name stands on the createType line (QEMU finds it anyway, by substring)."""
    base = sparse(q, d, "base.vmdk")
    top = create(q, d / "top.vmdk", 8 * M, "monolithicSparse", backing=base)
    data = bytearray(top.read_bytes())
    at = data.index(b'Sparse"\nparentFileNameHint') + len(b'Sparse"')
    data[at] = 1
    top.write_bytes(data)
    return top


def _parent_is_qcow2(q: Qemu, d: Path) -> Path:
    base = sparse(q, d, "base.vmdk")
    top = create(q, d / "top.vmdk", 8 * M, "monolithicSparse", backing=base)
    base.unlink()
    q.create(base, 8 * M)  # a qcow2 now sits where the VMDK parent was
    return top


OPEN_CASES: dict[str, tuple[Callable[[Qemu, Path], Path], list[str]]] = {
    "version-4": (_set("version", 4), ["version 4", "not supported"]),
    "grain-size-0": (_set("grain", 0), ["grain size of 0 sectors"]),
    "grain-huge": (_set("grain", 1 << 40), ["grain size"]),
    "gtes-per-gt": (_set("gtes", 1024), ["1024 entries per grain table"]),
    "gd-past-eof": (_set("gd", 1 << 30), ["grain directory", "outside the file"]),
    "newline-bytes": (_set("nl", b"\n \n\n"), ["newline check bytes"]),
    "overhead-past-eof": (_set("overhead", 1 << 30), ["truncated"]),
    "compress-algorithm": (_set("compress", 7), ["compression algorithm 7"]),
    "capacity-huge": (_set("capacity", 1 << 62), ["capacity"]),
    "descriptor-bad-extent": (
        _edit_descriptor('RW 16384 SPARSE "split-s001.vmdk"', "RW lots SPARSE"),
        ["descriptor line", "extent"],
    ),
    "descriptor-bad-line": (_edit_descriptor("createType=", "createType :"), ["descriptor line 5"]),
    "descriptor-bad-cid": (_edit_descriptor("CID=", "CID=xyz\n#"), ["CID", "hex"]),
    "descriptor-no-createtype": (_edit_descriptor("createType=", "#createType="), ["no createType"]),
    "descriptor-two-values-on-a-line": (_two_values_on_a_line, ["createType is not one quoted string"]),
    "descriptor-rdm": (
        _edit_descriptor('"twoGbMaxExtentSparse"', '"vmfsPassthroughRawDeviceMap"'),
        ["vmfsPassthroughRawDeviceMap", "LUN", "not supported"],
    ),
    "descriptor-sesparse-extent": (
        _edit_descriptor("SPARSE", "SESPARSE"),
        ["seSparse", "no constant header magic"],
    ),
    "descriptor-noaccess": (_edit_descriptor("RW ", "NOACCESS "), ["NOACCESS"]),
    "descriptor-wrong-size": (_edit_descriptor("RW 16384", "RW 16000"), ["16000 sectors"]),
    "descriptor-missing-extent": (
        _edit_descriptor("split-s001.vmdk", "gone.vmdk"),
        ["gone.vmdk", "not found"],
    ),
    "descriptor-extent-url": (_edit_descriptor('"split-s001.vmdk"', '"nbd://host/x"'), ["not a local file"]),
    "descriptor-too-large": (_huge_descriptor, ["larger than"]),
    "cowd": (_cowd, ["COWD", "version 0", "not supported"]),
    "parent-is-qcow2": (_parent_is_qcow2, ["qcow2", "not a VMDK"]),
}


@pytest.mark.parametrize("name", sorted(OPEN_CASES))
def test_refused_at_open(qemu: Qemu, tmp_path: Path, name: str) -> None:
    make, words = OPEN_CASES[name]
    img = make(qemu, tmp_path)
    line = error_line("info", img)
    for w in words:
        assert w in line, (w, line)
    assert error_line("map", img) == line
    assert error_line("convert", "-O", "raw", img, tmp_path / "out.raw") == line
    assert not (tmp_path / "out.raw").exists()


def _gd_entry(q: Qemu, d: Path) -> Path:
    img = sparse(q, d)
    poke(img, gd_entry_at(img, 0), "<I", 0x7FFFFFF)
    return img


def _gt_entry(q: Qemu, d: Path) -> Path:
    img = sparse(q, d)
    poke(img, gt_entry_at(img, 64), "<I", 0x7FFFFFF)  # the grain at 4 MiB
    return img


def _stream(q: Qemu, d: Path) -> Path:
    raw = d / "src.raw"
    q.create(raw, 8 * M, fmt="raw")
    q.io(raw, "write -P 0x61 0 128k", "write -P 0x62 4M 64k", fmt="raw")
    img = d / "stream.vmdk"
    q.img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, img)
    return img


def _grain_marker(size: int) -> Callable[[Qemu, Path], Path]:
    def make(q: Qemu, d: Path) -> Path:
        img = _stream(q, d)
        host = peek(img, gt_entry_at(img, 64), "<I") * 512
        poke(img, host + 8, "<I", size)
        return img

    return make


def _garbage_grain(q: Qemu, d: Path) -> Path:
    img = _stream(q, d)
    host = peek(img, gt_entry_at(img, 64), "<I") * 512
    poke(img, host + 12, "<8s", b"garbage!")
    return img


def _grain_too_big(q: Qemu, d: Path) -> Path:
    img = _stream(q, d)
    host = peek(img, gt_entry_at(img, 64), "<I") * 512
    comp = zlib.compress(b"\x01" * (65536 + 4096))  # decompresses to more than a grain
    poke(img, host + 8, f"<I{len(comp)}s", len(comp), comp)
    return img


READ_CASES: dict[str, tuple[Callable[[Qemu, Path], Path], list[str]]] = {
    "gt-past-eof": (_gd_entry, ["grain table", "past the end"]),
    "grain-past-eof": (_gt_entry, ["grain table entry", "past the end"]),
    "grain-marker-size-0": (_grain_marker(0), ["grain marker", "bad size"]),
    "grain-marker-size-huge": (_grain_marker(1 << 30), ["grain marker", "bad size"]),
    "grain-garbage": (_garbage_grain, ["does not decompress"]),
    "grain-too-big": (_grain_too_big, ["does not decompress"]),
}


@pytest.mark.parametrize("name", sorted(READ_CASES))
def test_refused_when_read(qemu: Qemu, tmp_path: Path, name: str) -> None:
    make, words = READ_CASES[name]
    img = make(qemu, tmp_path)
    assert flatfs("info", img).returncode == 0
    line = error_line("convert", "-O", "raw", img, tmp_path / "out.raw")
    for w in words:
        assert w in line, (w, line)
    assert "(at 0x" in line
    assert not (tmp_path / "out.raw").exists()
    # QEMU refuses the damaged grain as well
    r = qemu.img("convert", "-O", "raw", img, tmp_path / "q.raw", check=False)
    assert r.returncode != 0 or name in ("gt-past-eof", "grain-past-eof")  # QEMU reads zeros past EOF


def test_extent_outside_backing_dir(qemu: Qemu, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    img = split(qemu, tmp_path)
    text = img.read_text().replace('"split-s001.vmdk"', '"../split-s001.vmdk"')
    moved = tmp_path / "in" / "split.vmdk"
    moved.write_text(text.replace('"split-s00', '"../split-s00'))
    line = error_line("map", "--backing-dir", tmp_path / "in", moved)
    assert "outside --backing-dir" in line and "extent file" in line
    assert flatfs("map", moved).returncode == 0


def test_a_changed_parent_cid(qemu: Qemu, tmp_path: Path) -> None:
    """QEMU rewrites a disk's CID on its first write after each open: a delta made
    before that write no longer matches. info shows both CIDs and flags it; map,
    mount and convert refuse with one line naming both, unless --ignore-parent-id."""
    base = sparse(qemu, tmp_path, "base.vmdk")
    top = create(qemu, tmp_path / "top.vmdk", 8 * M, "monolithicSparse", backing=base)
    qemu.io(top, "write -P 0x33 1M 64k", fmt="vmdk")
    assert flatfs("map", top).returncode == 0
    recorded = flatfs("info", "--output=json", top).stdout
    qemu.io(base, "write -P 0x44 6M 64k", fmt="vmdk")  # the base gets a new CID
    import json

    rows = json.loads(flatfs("info", "--output=json", top).stdout)
    pid = rows[0]["parent-identity"]
    new_cid = rows[1]["cid"]
    assert pid["kind"] == "vmdk-cid" and pid["match"] is False
    assert pid["recorded"] == rows[0]["parent-cid"] != new_cid == pid["found"]
    assert json.loads(recorded)[1]["cid"] == pid["recorded"]
    human = flatfs("info", top).stdout
    assert "MISMATCH" in human and pid["recorded"] in human and new_cid in human
    line = error_line("map", top)
    assert pid["recorded"] in line and new_cid in line and "--ignore-parent-id" in line
    assert error_line("convert", "-O", "raw", top, tmp_path / "o.raw") == line
    assert not (tmp_path / "o.raw").exists()
    assert flatfs("map", "--ignore-parent-id", top).returncode == 0
    flatfs("convert", "--ignore-parent-id", "-O", "raw", top, tmp_path / "o.raw")
    # QEMU refuses the mismatch too, when a read falls through to the parent
    r = qemu.img("convert", "-O", "raw", top, tmp_path / "q.raw", check=False)
    assert r.returncode != 0
