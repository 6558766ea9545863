"""Hostile images through `flatfs info`, `map` and `convert`: the cases that
tests/oracle/test_errors.py, tests/unit/test_qcow2_spec.py and tests/fuzz do
not already pin down through the command line.

Every case ends one of two ways: each command that has to look at the broken
part exits 1 with the same single line naming the file (and convert leaves no
TARGET and no temporary file), or flatfs reads exactly what
``qemu-img convert -O raw`` reads. The broken-image builders live in
tests/helpers/qcow2_edits.py, shared with the mount tests (test_mount_faults.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ..helpers.cli import assert_words, error_line, flatfs
from ..helpers.images import K, poke
from ..helpers.needs import require
from ..helpers.qcow2_edits import (
    COPIED,
    OPEN_CASES,
    READ_CASES,
    TABLE_CASES,
    cluster_bits,
    compressed_at,
    compressed_image,
    l2_entry_at,
    last_compressed,
    plain_image,
    set_compressed,
)
from ..helpers.qemu import Qemu, project_map

pytestmark = pytest.mark.qemu


# -- running the commands --------------------------------------------------------


def convert_fails(img: Path, extra: tuple[str, ...] = (), prefix: tuple[str, ...] = ()) -> str:
    """convert (qcow2 and raw TARGET) fails with one line; no TARGET, no temporary file left."""
    folder = img.parent
    before = set(os.listdir(folder))
    lines = set()
    for fmt in ("qcow2", "raw"):
        target = folder / f"out.{fmt}"
        lines.add(error_line("convert", *extra, "-O", fmt, img, target, prefix=prefix))
        assert not target.exists()
        assert set(os.listdir(folder)) == before, "convert left a file behind"
    assert len(lines) == 1, lines
    return lines.pop()


@pytest.mark.parametrize("name", sorted(OPEN_CASES))
def test_refused_at_open(qemu: Qemu, tmp_path: Path, name: str) -> None:
    img, words = OPEN_CASES[name](qemu, tmp_path)
    extra = ("-f", "qcow2") if name == "bad-magic" else ()
    line = error_line("info", *extra, img)
    assert_words(line, words)
    assert error_line("map", *extra, img) == line
    assert convert_fails(img, extra) == line


@pytest.mark.parametrize("name", sorted(TABLE_CASES))
def test_refused_when_mapped(qemu: Qemu, tmp_path: Path, name: str) -> None:
    img, words = TABLE_CASES[name](qemu, tmp_path)
    assert flatfs("info", img).returncode == 0
    line = error_line("map", img)
    assert_words(line, words)
    assert "(at 0x" in line
    assert error_line("map", "--output=json", img) == line
    assert convert_fails(img) == line


@pytest.mark.parametrize("name", sorted(READ_CASES))
def test_refused_when_read(qemu: Qemu, tmp_path: Path, name: str) -> None:
    img, words = READ_CASES[name](qemu, tmp_path)
    assert flatfs("info", img).returncode == 0
    ours = json.loads(flatfs("map", "--output=json", img).stdout)
    assert project_map(ours) == project_map(qemu.map(img))
    line = convert_fails(img)
    assert_words(line, words)
    # QEMU cannot read that cluster either
    assert qemu.img("convert", "-O", "raw", img, tmp_path / "qemu.raw", check=False).returncode != 0


@pytest.mark.parametrize("what", ["backing-file", "data-file"])
def test_unreadable_file(qemu: Qemu, tmp_path: Path, what: str) -> None:
    """A backing or data file flatfs may not read (EACCES): one line naming it."""
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # root reads a mode-000 file anyway; without CAP_DAC_OVERRIDE it cannot
        require(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
    if what == "backing-file":
        victim = qemu.create(tmp_path / "base.qcow2", "4M")
        img = qemu.create(tmp_path / "img.qcow2", "4M", backing=victim.name)
    else:
        img = plain_image(qemu, tmp_path, opts="data_file=img.data")
        victim = tmp_path / "img.data"
    victim.chmod(0)
    try:
        line = error_line("info", img, prefix=prefix)
        assert_words(line, [victim.name, "Permission denied"])
        assert error_line("map", img, prefix=prefix) == line
        assert convert_fails(img, prefix=prefix) == line
    finally:
        victim.chmod(0o644)


def test_io_error_reading_the_header(qemu: Qemu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from the host while the header cluster is read: an ImageIOError naming the file."""
    import errno

    from flatfs import FlatfsError, open_chain
    from flatfs.errors import ImageIOError

    img = plain_image(qemu, tmp_path)
    real = os.pread

    def failing(fd: int, n: int, offset: int) -> bytes:
        if n > 4096:  # the probe (4 KiB) works; the header read fails
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", failing)
    with pytest.raises(FlatfsError) as exc:
        open_chain(img)
    assert isinstance(exc.value, ImageIOError) and exc.value.errno == errno.EIO
    assert str(exc.value).startswith(f"{img}: ") and "Input/output error" in str(exc.value)


# -- read exactly like QEMU --------------------------------------------------------


def _same_as_qemu(q: Qemu, img: Path) -> None:
    want = q.to_raw(img, img.parent / "qemu.raw")
    got = img.parent / "flatfs.raw"
    flatfs("convert", "-O", "raw", img, got)
    assert got.stat().st_size == want.stat().st_size
    assert got.read_bytes() == want.read_bytes()
    assert flatfs("info", img).returncode == 0
    ours = json.loads(flatfs("map", "--output=json", img).stdout)
    assert sum(e["length"] for e in ours) == want.stat().st_size


def test_virtual_size_zero(qemu: Qemu, tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "empty.qcow2", 0)
    _same_as_qemu(qemu, img)
    assert json.loads(flatfs("info", "--output=json", img).stdout)[0]["virtual-size"] == 0
    # the raw JSON, not only its projection: qemu-img prints one zero-length entry
    assert json.loads(flatfs("map", "--output=json", img).stdout) == [
        {k: v for k, v in e.items() if k != "offset"} for e in qemu.map(img)
    ]


def test_data_cluster_past_eof_reads_like_qemu(qemu: Qemu, tmp_path: Path) -> None:
    """QEMU reads a data cluster that lies past the end of the file as zeros."""
    img = plain_image(qemu, tmp_path)
    poke(img, l2_entry_at(img, 64 * K), ">Q", COPIED | 1 << 40)
    _same_as_qemu(qemu, img)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_size_past_eof_reads_like_qemu(qemu: Qemu, tmp_path: Path, ctype: str) -> None:
    """The last compressed cluster claims the most sectors it can: its bytes
    run past the end of the file, which reads as zeros after the stream ends."""
    img = compressed_image(qemu, tmp_path, ctype)
    guest = last_compressed(img)
    at, host, _ = compressed_at(img, guest)
    bits = cluster_bits(img)
    set_compressed(img, at, host, (1 << (bits - 8)) - 1)
    assert compressed_at(img, guest)[1] + (1 << (bits - 8)) * 512 > os.path.getsize(img)
    _same_as_qemu(qemu, img)
