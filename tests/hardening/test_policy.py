"""Untrusted backing names: --backing-dir, --no-backing, raw probing, special files, depth."""

from __future__ import annotations

import os
import struct

import pytest

from flatfs import ChainError, OpenOptions, open_chain

from ..helpers.cli import flatfs, one_line_error
from ..helpers.qcow2_edits import forget_backing_format

pytestmark = pytest.mark.qemu


def set_backing_name(qemu, img, name: str, fmt: str = "raw") -> None:
    qemu.img("rebase", "-u", "-b", name, "-F", fmt, img, cwd=img.parent)


def test_backing_outside_backing_dir_is_refused(qemu, tmp_path):
    inside = tmp_path / "images"
    inside.mkdir()
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"top secret\n" * 100)
    top = qemu.create(inside / "top.qcow2", "1M")
    set_backing_name(qemu, top, str(secret))
    line = one_line_error(["map", "--backing-dir", inside, top], "outside --backing-dir")
    assert "secret.raw" in line
    # a symlink inside the folder that points outside is refused too
    (inside / "link.raw").symlink_to(secret)
    set_backing_name(qemu, top, "link.raw")
    one_line_error(["map", "--backing-dir", inside, top], "link.raw", "outside --backing-dir")
    # and a relative escape
    set_backing_name(qemu, top, "../secret.raw")
    one_line_error(["map", "--backing-dir", inside, top], "outside --backing-dir")
    # inside is fine
    base = qemu.create(inside / "base.raw", "1M", fmt="raw")
    set_backing_name(qemu, top, base.name)
    assert flatfs("map", "--backing-dir", inside, top).returncode == 0


def test_data_file_outside_backing_dir_is_refused(qemu, tmp_path):
    inside = tmp_path / "images"
    inside.mkdir()
    img = qemu.create(inside / "img.qcow2", "1M", opts=f"data_file={tmp_path}/outside.data")
    one_line_error(["map", "--backing-dir", inside, img], "data file", "outside --backing-dir")


def test_no_backing_shows_the_top_layer_alone(qemu, tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", "1M")
    qemu.io(base, "write -P 1 0 1M")
    top = qemu.create(tmp_path / "top.qcow2", "1M", backing=base.name)
    qemu.io(top, "write -P 2 0 64k")
    with open_chain(top, OpenOptions(no_backing=True)) as chain:
        assert len(chain.layers) == 1
        assert chain.pread(0, 128 << 10) == b"\2" * 65536 + bytes(65536)
    base.unlink()  # no backing means we never even look for it
    assert flatfs("map", "--no-backing", top).returncode == 0


def test_device_backing_is_refused_unless_allowed(qemu, tmp_path):
    top = qemu.create(tmp_path / "top.qcow2", "1M")
    set_backing_name(qemu, top, "/dev/zero")
    one_line_error(["map", top], "/dev/zero", "not a regular file")
    assert flatfs("map", "--allow-special", top).returncode == 0


def test_fifo_backing_is_refused(qemu, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    top = qemu.create(tmp_path / "top.qcow2", "1M")
    set_backing_name(qemu, top, fifo.name)
    # opening a FIFO read-only would block: it must be refused before that
    r = flatfs("map", top, check=False, timeout=20)
    assert r.returncode == 1 and "not a regular file" in r.stderr


def test_etc_shadow_as_unrecorded_backing_is_not_probed(qemu, tmp_path):
    top = qemu.create(tmp_path / "top.qcow2", "1M", backing="/etc/hostname", backing_fmt="raw")
    forget_backing_format(top)
    one_line_error(["map", top], "/etc/hostname", "--allow-probe-raw")


def test_chain_depth_limit(qemu, tmp_path):
    # the default (MAX_CHAIN_DEPTH) is read in tests/oracle/test_parents.py; --max-depth here
    limit = 4
    prev = qemu.create(tmp_path / "l0.qcow2", "1M")
    for i in range(1, limit + 2):
        prev = qemu.create(tmp_path / f"l{i}.qcow2", "1M", backing=prev.name)
    one_line_error(["map", "--max-depth", str(limit), prev], f"deeper than {limit}", "--max-depth")
    with pytest.raises(ChainError):
        open_chain(prev, OpenOptions(max_depth=limit))
    ok = tmp_path / f"l{limit - 1}.qcow2"
    with open_chain(ok, OpenOptions(max_depth=limit)) as chain:
        assert len(chain.layers) == limit


def test_backing_name_past_header_cluster(qemu, tmp_path):
    qemu.create(tmp_path / "base.qcow2", "1M")
    top = qemu.create(tmp_path / "top.qcow2", "1M", backing="base.qcow2")
    with open(top, "r+b") as f:
        f.seek(8)
        f.write(struct.pack(">QI", 70000, 10))
    one_line_error(["map", top], "top.qcow2", "backing file name")
