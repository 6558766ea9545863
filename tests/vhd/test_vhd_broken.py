"""Hand-broken VHDs through the CLI: one line naming the file, exit 1, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..helpers.cli import flatfs
from ..helpers.images import peek, poke
from ..helpers.qemu import Qemu
from ..helpers.vhd_images import child, qemu_base
from ..helpers.vhd_writer import checksum

pytestmark = pytest.mark.qemu


def refix(path: Path, at: int, size: int, csum_at: int) -> None:
    """Recompute the checksum of the structure of ``size`` bytes at ``at`` (so only the field is broken)."""
    with open(path, "r+b") as f:
        f.seek(at)
        raw = bytearray(f.read(size))
        raw[csum_at : csum_at + 4] = bytes(4)
        f.seek(at + csum_at)
        f.write(checksum(raw).to_bytes(4, "big"))


def both_footers(path: Path, off: int, fmt: str, value: int) -> None:
    end = path.stat().st_size - 512
    for at in (0, end):
        poke(path, at + off, fmt, value)
        refix(path, at, 512, 64)


def header(path: Path, off: int, fmt: str, value: int) -> None:
    poke(path, 512 + off, fmt, value)
    refix(path, 512, 1024, 36)


CASES = {
    "footer checksum": (lambda p: poke(p, 64, ">I", 0x1234), "footer checksum"),
    "disk type": (lambda p: both_footers(p, 60, ">I", 5), "disk type 5"),
    "version": (lambda p: both_footers(p, 12, ">I", 0x20000), "version"),
    "header checksum": (lambda p: poke(p, 512 + 36, ">I", 0x1234), "dynamic disk header checksum"),
    "header cookie": (lambda p: header(p, 0, ">Q", 0x4142434445464748), "cxsparse"),
    "block size": (lambda p: header(p, 32, ">I", 3 << 20), "block size"),
    "block too big": (lambda p: header(p, 32, ">I", 1 << 30), "block size"),
    "few BAT entries": (lambda p: header(p, 28, ">I", 2), "need 4 blocks"),
    "BAT past the end": (lambda p: header(p, 16, ">Q", 1 << 40), "block table"),
    "header offset": (lambda p: both_footers(p, 16, ">Q", 1 << 40), "header offset"),
    "block past the end": (lambda p: poke(p, peek(p, 512 + 16, ">Q"), ">I", 0x7FFFFF), "truncated"),
    "footers differ": (lambda p: both_footers(p, 0, ">B", ord("c")) or poke(p, 48, ">B", 9), "checksum"),
    "truncated": (lambda p: open(p, "r+b").truncate(300), "too small"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_dynamic_vhd(qemu: Qemu, tmp_path: Path, case: str):
    img = qemu_base(qemu, tmp_path)
    breaker, words = CASES[case]
    breaker(img)
    for cmd in (["info"], ["map"], ["convert", "-O", "raw"]):
        args = [*cmd, img] + ([tmp_path / "out.raw"] if cmd[0] == "convert" else [])
        r = flatfs(*args, check=False)
        assert r.returncode == 1, (case, r.stdout)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"flatfs: {img}: "), r.stderr
        assert words in r.stderr, r.stderr
    assert not (tmp_path / "out.raw").exists()


LOCATOR_CASES = {
    "too long": (8, ">I", 1 << 20, "bytes long"),
    "outside": (16, ">Q", 1 << 40, "outside the file"),
    "platform": (0, ">I", 0x41424344, "platform code"),
}


@pytest.mark.parametrize("case", sorted(LOCATOR_CASES))
def test_broken_parent_locator(qemu: Qemu, tmp_path: Path, case: str):
    base = qemu_base(qemu, tmp_path)
    top = child(base, [(0, b"\x55" * 4096)]).write(tmp_path / "top.vhd")
    off, fmt, value, words = LOCATOR_CASES[case]
    header(top, 576 + off, fmt, value)
    r = flatfs("info", top, check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr


def test_locator_that_is_not_utf16(qemu: Qemu, tmp_path: Path):
    base = qemu_base(qemu, tmp_path)
    top = child(base, [(0, b"\x55" * 4096)], locators=[(b"W2ru", ".\\base.vhd")]).write(tmp_path / "top.vhd")
    poke(top, peek(top, 512 + 576 + 16, ">Q"), ">H", 0x00DC)  # a lone low surrogate, little-endian
    r = flatfs("info", top, check=False)
    assert r.returncode == 1 and "not valid UTF-16" in r.stderr, r.stderr
