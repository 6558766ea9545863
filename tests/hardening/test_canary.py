"""No host file's content ever reaches flatfs's output (issue 23).

A hostile image names a host text file full of secrets (a canary, standing in
for /etc/shadow) as its parent or extent, for every format: the chain must
refuse it as "not a VMDK" (VHD, VHDX, VDI, qcow2) before parsing any of it, and
no secret may appear on stdout, stderr, a convert target or a mounted view.
Three canaries: plain text, one that starts with the VMDK descriptor signature
and one that passes QEMU's ``version=1`` rule (both get past the signature check
and must then fail without quoting a line).
"""

from __future__ import annotations

import random
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from flatfs.chain.files import looks_like_text

from ..helpers.cli import ONE_LINE
from ..helpers.hostile import CANARIES, assert_clean, assert_no_canary, bounded, refused, write_canary
from ..helpers.mounts import Mounter
from ..helpers.needs import have_qemu, require
from ..helpers.qcow2_edits import forget_backing_format
from ..helpers.vdi_writer import Vdi, write_registry
from ..helpers.vhd_writer import DIFFERENCING, Vhd
from ..helpers.vhdx_writer import Parent, VhdxImage

MiB = 1 << 20
CID = "12345678"


def _descriptor(d: Path, body: str, parent: str | None = None) -> Path:
    text = f"# Disk DescriptorFile\nversion=1\nCID=fedcba98\nparentCID={CID if parent else 'ffffffff'}\n"
    text += body
    if parent:
        text += f'parentFileNameHint="{parent}"\n'
    (d / "top.vmdk").write_text(text)
    return d / "top.vmdk"


def vmdk_parent(d: Path, canary: str) -> Path:
    (d / "data.bin").write_bytes(b"\x5a" * MiB)
    return _descriptor(d, 'createType="monolithicFlat"\nRW 2048 FLAT "data.bin" 0\n', canary)


def vmdk_sparse_extent(d: Path, canary: str) -> Path:
    return _descriptor(d, f'createType="twoGbMaxExtentSparse"\nRW 2048 SPARSE "{canary}"\n')


def vmdk_embedded_parent(d: Path, canary: str) -> Path:
    """A monolithicSparse delta (made by qemu-img) whose embedded descriptor names the canary."""
    require(have_qemu(), "qemu-img is not installed")
    for cmd in (["base.vmdk", "1M"], ["-b", "base.vmdk", "-F", "vmdk", "top.vmdk", "1M"]):
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", *cmd], check=True, cwd=d)
    raw = bytearray((d / "top.vmdk").read_bytes())
    area = raw[512 : 21 * 512]
    text = bytes(area).split(b"\0", 1)[0].replace(b'"base.vmdk"', f'"{canary}"'.encode())
    raw[512 : 21 * 512] = text.ljust(len(area), b"\0")
    (d / "top.vmdk").write_bytes(raw)
    (d / "base.vmdk").unlink()
    return d / "top.vmdk"


def vhd_parent(d: Path, canary: str) -> Path:
    return Vhd(MiB, disk_type=DIFFERENCING, parent_name=canary, locators=[(b"W2ru", ".\\" + canary)]).write(
        d / "top.vhd"
    )


def vhdx_parent(d: Path, canary: str) -> Path:
    VhdxImage(4 * MiB, parent=Parent(uuid.uuid4(), relative_path=canary)).save(d / "top.vhdx")
    return d / "top.vhdx"


def vdi_parent(d: Path, canary: str) -> Path:
    base = Vdi(MiB)
    top = Vdi(MiB).over(base)
    write_registry(d / "vm.vbox", [(base, canary), (top, "top.vdi")])
    return top.write(d / "top.vdi")


def qcow2_backing(fmt: str | None) -> Callable[[Path, str], Path]:
    def build(d: Path, canary: str) -> Path:
        require(have_qemu(), "qemu-img is not installed")
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", canary, "-F", fmt or "qcow2"]
        subprocess.run([*cmd, "top.qcow2", "1M"], check=True, capture_output=True, cwd=d)
        if fmt is None:  # no recorded format: the backing is probed
            forget_backing_format(d / "top.qcow2")
        return d / "top.qcow2"

    return build


def vmdk_flat_extent(d: Path, canary: str) -> Path:
    """A single-file upload: a FLAT extent naming a text file in the image's own folder."""
    size = len((d / canary).read_bytes()) // 512 + 1
    return _descriptor(d, f'createType="monolithicFlat"\nRW {size} FLAT "{canary}" 0\n')


def qcow2_data_file(d: Path, canary: str) -> Path:
    """A qcow2 whose external raw data file is the canary (renamed with qemu-img amend)."""
    require(have_qemu(), "qemu-img is not installed")
    q = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on"]
    subprocess.run([*q, "top.qcow2", "1M"], check=True, capture_output=True, cwd=d)
    amend = ["qemu-img", "amend", "-q", "-f", "qcow2", "-o", f"data_file={canary}", "top.qcow2"]
    subprocess.run(amend, check=True, capture_output=True, cwd=d)
    (d / "data.raw").unlink()
    return d / "top.qcow2"


VMDK_CASES = {
    "vmdk-parent": vmdk_parent,
    "vmdk-embedded-parent": vmdk_embedded_parent,
    "vmdk-extent": vmdk_sparse_extent,
    "qcow2-over-vmdk": qcow2_backing("vmdk"),
}
# raw data an image names, in its own folder: read as QEMU reads it unless it looks like text
RAW_CASES = {
    "vmdk-flat-extent": vmdk_flat_extent,
    "qcow2-over-raw": qcow2_backing("raw"),
    "qcow2-data-file": qcow2_data_file,
}
OTHER_CASES = {
    "vhd-parent": vhd_parent,
    "vhdx-parent": vhdx_parent,
    "vdi-parent": vdi_parent,
    "qcow2-over-vpc": qcow2_backing("vpc"),
    "qcow2-over-vhdx": qcow2_backing("vhdx"),
    "qcow2-over-vdi": qcow2_backing("vdi"),
    "qcow2-over-qcow2": qcow2_backing("qcow2"),
    "qcow2-probed": qcow2_backing(None),
}
CASES = [(n, k) for n in {**VMDK_CASES, **RAW_CASES} for k in CANARIES] + [(n, "plain") for n in OTHER_CASES]
ALL_CASES = {**VMDK_CASES, **OTHER_CASES, **RAW_CASES}


@pytest.mark.parametrize(("case", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_a_canary_named_as_parent_or_extent_never_leaks(tmp_path: Path, case: str, kind: str) -> None:
    write_canary(tmp_path / "canary.txt", kind)
    top = ALL_CASES[case](tmp_path, "canary.txt")
    target = tmp_path / "out.raw"
    runs = (["info", top], ["map", top], ["convert", "-O", "raw", top, target], ["info", "--untrusted", top])
    for args in runs:
        r = bounded(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert_clean(r)
        assert_no_canary(r.stdout, r.stderr)
    assert not target.exists()


def _flat_outside(tmp_path: Path) -> Path:
    """A FLAT extent naming a canary outside the image's folder (``../secret/canary.txt``)."""
    (tmp_path / "secret").mkdir()
    write_canary(tmp_path / "secret" / "canary.txt")
    up = tmp_path / "upload"
    up.mkdir()
    size = len(CANARIES["plain"]) // 512 + 1
    return _descriptor(up, f'createType="monolithicFlat"\nRW {size} FLAT "../secret/canary.txt" 0\n')


def test_untrusted_fences_an_extent_outside_the_image_folder(tmp_path: Path) -> None:
    top = _flat_outside(tmp_path)
    # without the preset the extent is refused as text; with --allow-text-data it is the disk's
    # data, as in QEMU
    assert "looks like a text file" in refused("info", top)
    assert bounded("info", "--allow-text-data", top).returncode == 0
    target = tmp_path / "out.raw"
    for args in (["info", top], ["map", top], ["convert", "-O", "raw", top, target]):
        r = bounded(args[0], "--untrusted", *args[1:])
        assert r.returncode == 1 and ONE_LINE(r.stderr), (args, r.stderr)
        assert "outside --backing-dir" in r.stderr
        assert_no_canary(r.stdout, r.stderr)
    assert not target.exists()


@pytest.mark.parametrize(
    "loosening", [["--allow-special"], ["-U"], ["--allow-probe-raw"], ["--allow-text-data"]]
)
def test_untrusted_refuses_options_that_contradict_it(tmp_path: Path, loosening: list[str]) -> None:
    top = vmdk_parent(tmp_path, "missing.vmdk")
    r = bounded("info", "--untrusted", *loosening, top)
    assert r.returncode == 2, r.stderr
    assert "contradict" in r.stderr and "Traceback" not in r.stderr


def test_untrusted_keeps_an_explicit_backing_dir(tmp_path: Path) -> None:
    top = _flat_outside(tmp_path)
    # past the fence it widens, the extent is refused as text, not as outside the fence
    line = refused("info", "--untrusted", "--backing-dir", tmp_path, top)
    assert "looks like a text file" in line and "outside" not in line, line


@pytest.mark.fuse
def test_no_canary_through_a_mount(tmp_path: Path, mounter: Mounter) -> None:
    write_canary(tmp_path / "canary.txt", "signed")
    top = vmdk_parent(tmp_path, "canary.txt")
    r = mounter.run(top, mounter.mountpoint())
    assert r.returncode == 1 and ONE_LINE(r.stderr), r.stderr
    assert_no_canary(r.stdout, r.stderr)
    # the preset fences the outside extent away from a view too
    (tmp_path / "fenced").mkdir()
    outside = _flat_outside(tmp_path / "fenced")
    r = mounter.run(outside, mounter.mountpoint(), "--untrusted")
    assert r.returncode == 1 and ONE_LINE(r.stderr), r.stderr
    assert_no_canary(r.stdout, r.stderr)


@pytest.mark.fuse
@pytest.mark.parametrize("case", list(RAW_CASES))
def test_no_canary_as_raw_data_through_a_mount(tmp_path: Path, mounter: Mounter, case: str) -> None:
    write_canary(tmp_path / "canary.txt")
    r = mounter.run(RAW_CASES[case](tmp_path, "canary.txt"), mounter.mountpoint())
    assert r.returncode == 1 and ONE_LINE(r.stderr), r.stderr
    assert "looks like a text file" in r.stderr
    assert_no_canary(r.stdout, r.stderr)


def _mbr() -> bytes:
    """A boot sector with one Linux partition: binary, NULs included."""
    mbr = bytearray(512)
    entry = bytes([0x80, 0, 2, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") * 2
    mbr[446:462] = entry
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


DISKS = {
    "binary": random.Random(23).randbytes(64 << 10),
    "zeros": bytes(64 << 10),
    "mbr": _mbr() + bytes(range(1, 256)) * 256,
}


def _map_data_file(d: Path, data: bytes, case: str, raw: str) -> None:
    """A qcow2 reads its data file only where it maps clusters: map them (qemu-io), then put
    ``data`` back into the raw file."""
    if case == "qcow2-data-file":
        io = ["qemu-io", "-f", "qcow2", "-c", f"write -P 0 0 {len(data)}", "top.qcow2"]
        subprocess.run(io, check=True, capture_output=True, cwd=d)
        (d / raw).write_bytes(data)


@pytest.mark.parametrize("case", list(RAW_CASES))
@pytest.mark.parametrize("disk", list(DISKS))
def test_a_real_raw_disk_is_still_read(tmp_path: Path, case: str, disk: str) -> None:
    data = DISKS[disk]
    (tmp_path / "disk.raw").write_bytes(data)
    top = RAW_CASES[case](tmp_path, "disk.raw")
    _map_data_file(tmp_path, data, case, "disk.raw")
    r = bounded("convert", "-O", "raw", top, tmp_path / "out.raw")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.raw").read_bytes()[: len(data)] == data


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_allow_text_data_reads_a_text_file(tmp_path: Path, case: str) -> None:
    text = write_canary(tmp_path / "canary.txt").read_bytes()
    top = RAW_CASES[case](tmp_path, "canary.txt")
    _map_data_file(tmp_path, text, case, "canary.txt")
    r = bounded("convert", "--allow-text-data", "-O", "raw", top, tmp_path / "out.raw")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.raw").read_bytes()[: len(text)] == text
    r = bounded("info", "--untrusted", "--allow-text-data", top)
    assert r.returncode == 2 and "contradict" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("head", "text"),
    [
        (b"root:x:0:0\n\tplain\r\n", True),
        (("\u00e9" * 2048).encode()[:4095], True),  # a character cut at the end of the 4 KiB
        (b"A" * 4096, False),  # a fill pattern, not a file's text
        (b"AB" * 2048, True),
        (b"", False),
        (b"text\0with a NUL", False),
        (b"text with an escape \x1b[0m", False),
        (b"\xff\xfe not UTF-8", False),
    ],
)
def test_what_looks_like_text(head: bytes, text: bool) -> None:
    assert looks_like_text(head) is text
