"""Everything a user can get wrong gives one line naming the file, exit 1, no traceback."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from ..helpers.cli import flatfs, one_line_error
from ..helpers.images import poke
from ..helpers.qcow2_edits import forget_backing_format

pytestmark = pytest.mark.qemu


@pytest.fixture
def image(qemu, tmp_path) -> Path:
    img = qemu.create(tmp_path / "img.qcow2", "8M")
    qemu.io(img, "write -P 1 0 1M")
    return img


@pytest.mark.parametrize("cmd", ["info", "map"])
def test_missing_file(tmp_path, cmd):
    one_line_error([cmd, tmp_path / "nope.qcow2"], "nope.qcow2", "No such file")


def test_missing_backing_file(qemu, tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", "1M")
    top = qemu.create(tmp_path / "top.qcow2", "1M", backing=base.name)
    base.unlink()
    one_line_error(["map", top], "top.qcow2", "base.qcow2", "not found")


def test_directory(tmp_path):
    one_line_error(["info", tmp_path], str(tmp_path))


def test_foreign_image_format(qemu, tmp_path):
    qed = tmp_path / "disk.qed"
    qemu.img("create", "-f", "qed", qed, "1M")
    one_line_error(["map", qed], "disk.qed", "qed", "not supported")


def test_forced_qcow2_on_text_file(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello world\n" * 100)
    one_line_error(["map", "-f", "qcow2", txt], "notes.txt", "bad magic")


def test_truncated_image(image):
    os.truncate(image, 50)
    one_line_error(["info", image], "img.qcow2", "too short")


def test_truncated_tables(image):
    os.truncate(image, 65536 * 2)
    one_line_error(["map", image], "img.qcow2", "past the end of the file")


def test_l1_table_past_end_of_file(image):
    poke(image, 40, ">Q", 1 << 40)
    one_line_error(["map", image], "img.qcow2", "L1 table", "past the end")


def test_l2_table_past_end_of_file(image):
    with open(image, "rb") as f:
        f.seek(40)
        (l1_off,) = struct.unpack(">Q", f.read(8))
    poke(image, l1_off, ">Q", (1 << 40) | (1 << 63))
    one_line_error(["map", image], "img.qcow2", "L2 table", "past the end", "(at 0x")


def test_backing_loop(qemu, tmp_path):
    a = qemu.create(tmp_path / "a.qcow2", "1M")
    b = qemu.create(tmp_path / "b.qcow2", "1M", backing=a.name)
    qemu.img("rebase", "-u", "-b", b.name, "-F", "qcow2", a, cwd=tmp_path)
    one_line_error(["map", b], "loop")


def test_image_backing_itself(qemu, tmp_path):
    a = qemu.create(tmp_path / "a.qcow2", "1M")
    qemu.img("rebase", "-u", "-b", a.name, "-F", "qcow2", a, cwd=tmp_path)
    one_line_error(["info", a], "a.qcow2", "loop")


def test_encrypted_image(qemu, tmp_path):
    img = tmp_path / "enc.qcow2"
    # LUKS times its key derivation; on a busy machine qemu-img can fail with
    # "Unable to get accurate CPU usage". That is QEMU's flake, not ours: retry it.
    for attempt in range(5):
        try:
            qemu.img(
                "create",
                "-q",
                "--object",
                "secret,id=sec0,data=123456",
                "-f",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                img,
                "1M",
            )
            break
        except subprocess.CalledProcessError as exc:
            if "accurate CPU usage" not in f"{exc.stdout}{exc.stderr}" or attempt == 4:
                raise
    one_line_error(["map", img], "enc.qcow2", "encrypted", "LUKS")


def test_aes_encrypted_image(image):
    poke(image, 32, ">I", 1)
    one_line_error(["map", image], "img.qcow2", "encrypted", "AES")


def test_unknown_incompatible_bit(image):
    poke(image, 72, ">Q", 1 << 9)
    one_line_error(["map", image], "img.qcow2", "unsupported incompatible feature", "bit 9")


def test_unrecorded_raw_backing_is_not_probed(qemu, tmp_path):
    base = qemu.create(tmp_path / "base.raw", "1M", fmt="raw")
    top = qemu.create(tmp_path / "top.qcow2", "1M", backing=base.name, backing_fmt="raw")
    forget_backing_format(top)
    one_line_error(["map", top], "base.raw", "--allow-probe-raw")
    assert flatfs("map", "--allow-probe-raw", top).returncode == 0


def test_unrecorded_qcow2_backing_is_probed(qemu, tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", "1M")
    top = qemu.create(tmp_path / "top.qcow2", "1M", backing=base.name)
    forget_backing_format(top)
    assert flatfs("map", top).returncode == 0


def test_absurd_l1_size(image):
    poke(image, 36, ">I", 1 << 31)
    one_line_error(["map", image], "img.qcow2", "L1 table too large")


def test_l1_too_small_for_size(image):
    poke(image, 24, ">Q", 1 << 40)
    one_line_error(["map", image], "img.qcow2", "L1 table is too small")


def test_huge_virtual_size(image):
    poke(image, 24, ">Q", 1 << 62)
    one_line_error(["map", image], "img.qcow2", "too big")


def test_bad_cluster_bits(image):
    poke(image, 20, ">I", 30)
    one_line_error(["info", image], "img.qcow2", "cluster_bits")


def test_json_info_lists_chain_top_first(qemu, tmp_path):
    import json

    base = qemu.create(tmp_path / "base.raw", "2M", fmt="raw")
    top = qemu.create(tmp_path / "top.qcow2", "4M", backing=base.name, backing_fmt="raw")
    rows = json.loads(flatfs("info", "--output=json", top).stdout)
    assert [r["format"] for r in rows] == ["qcow2", "raw"]
    assert rows[0]["backing-filename"] == "base.raw" and rows[0]["backing-filename-format"] == "raw"
    assert rows[0]["virtual-size"] == 4 << 20 and rows[1]["virtual-size"] == 2 << 20
    assert rows[0]["cluster-size"] == 65536 and "actual-size" in rows[1]
