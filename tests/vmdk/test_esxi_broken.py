"""Broken ESXi delta extents, by hand and by hypothesis: one-line errors with the offset, never a
traceback, a hang or an allocation that grows with a lying field (mutants run in the memory-capped
worker of tests/fuzz); a mutant flatfs reads, it reads as `qemu-img convert -O raw` does."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers.cli import error_line
from ..helpers.esxi_writer import UNMAPPED, ZERO, esxi_chain, write_cowd, write_descriptor, write_sesparse
from ..helpers.fuzz import poke, read_like_qemu_or_refused
from ..helpers.needs import have_qemu, require

M = 1 << 20
SIZE = 32 * M
EXAMPLES = int(os.environ.get("FLATFS_FUZZ_EXAMPLES", "100"))


def _cowd(d: Path) -> tuple[Path, Path]:
    write_cowd(d / "c-delta.vmdk", SIZE, {0: b"\x11" * 4096, 7: b"\x12" * 4096, 4096 * 3: b"\x13" * 4096})
    return write_descriptor(
        d / "c.vmdk", "vmfsSparse", [(SIZE // 512, "VMFSSPARSE", "c-delta.vmdk")]
    ), d / "c-delta.vmdk"


def _se(d: Path) -> tuple[Path, Path]:
    grains = {0: b"\x21" * 4096, 1: ZERO, 2: UNMAPPED, 4096 + 9: b"\x22" * 4096}
    write_sesparse(d / "s-sesparse.vmdk", SIZE, grains)
    return write_descriptor(
        d / "s.vmdk", "seSparse", [(SIZE // 512, "SESPARSE", "s-sesparse.vmdk")]
    ), d / "s-sesparse.vmdk"


def _u32(p: Path, at: int) -> int:
    with open(p, "rb") as f:
        f.seek(at)
        return int(struct.unpack("<I", f.read(4))[0])


def _u64(p: Path, at: int) -> int:
    with open(p, "rb") as f:
        f.seek(at)
        return int(struct.unpack("<Q", f.read(8))[0])


def _put(p: Path, at: int, fmt: str, value: int) -> None:
    with open(p, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(fmt, value))


def _cowd_gt(p: Path) -> int:
    return _u32(p, 4 * 512) * 512  # the first table (the GD is at sector 4)


def _se_gt(p: Path) -> int:
    return (_u64(p, 144) + (_u64(p, 4096 * 512) & 0xFFFFFFFF) * 64) * 512


Edit = Callable[[Path], None]
CASES: dict[str, tuple[Callable[[Path], tuple[Path, Path]], Edit, list[str], bool]] = {
    # name: (image, edit of the extent file, words of the error, refused at open (else at the read))
    "cowd-version": (_cowd, lambda p: _put(p, 4, "<I", 2), ["COWD", "version 2", "(at 0x4)"], True),
    "cowd-grain-0": (_cowd, lambda p: _put(p, 16, "<I", 0), ["grain size of 0", "(at 0x10)"], True),
    "cowd-gd-short": (
        _cowd,
        lambda p: _put(p, 24, "<I", 1),
        ["cannot cover the capacity", "(at 0x18)"],
        True,
    ),
    "cowd-gd-past-eof": (
        _cowd,
        lambda p: _put(p, 20, "<I", 1 << 30),
        ["grain directory", "outside the file"],
        True,
    ),
    "cowd-capacity": (_cowd, lambda p: _put(p, 12, "<I", 1000), ["65536 sectors", "holds 1000"], True),
    "cowd-capacity-huge": (
        _cowd,
        lambda p: _put(p, 12, "<I", 0xFFFFFFFF),
        ["cannot cover the capacity (needs"],
        True,
    ),
    "cowd-truncated": (_cowd, lambda p: os.truncate(p, 1000), ["too small", "COWD"], True),
    "cowd-gt-past-eof": (
        _cowd,
        lambda p: _put(p, 4 * 512, "<I", 1 << 28),
        ["grain table", "past the end"],
        False,
    ),
    "cowd-grain-past-eof": (_cowd, lambda p: _put(p, _cowd_gt(p), "<I", 1 << 28), ["past the end"], False),
    "se-magic": (_se, lambda p: _put(p, 0, "<Q", 0xCAFEBABF), ["no constant header magic", "(at 0x0)"], True),
    "se-grain": (_se, lambda p: _put(p, 24, "<Q", 16), ["grain of 16 sectors", "(at 0x18)"], True),
    "se-flags": (_se, lambda p: _put(p, 40, "<Q", 1), ["flags 0x1", "(at 0x28)"], True),
    "se-volatile-magic": (
        _se,
        lambda p: _put(p, 512, "<Q", 0),
        ["volatile header has no magic", "(at 0x200)"],
        True,
    ),
    "se-areas-overlap": (
        _se,
        lambda p: _put(p, 128, "<Q", 3),
        ["grain directory area overlaps", "(at 0x80)"],
        True,
    ),
    "se-area-huge": (_se, lambda p: _put(p, 152, "<Q", 1 << 60), ["grain tables area is too large"], True),
    "se-gd-small": (_se, lambda p: _put(p, 136, "<Q", 0), ["empty"], True),
    "se-gd-entry-type": (
        _se,
        lambda p: _put(p, 4096 * 512, "<Q", 0x2000000000000001),
        ["grain directory entry 0 is not a grain table reference", f"(at 0x{4096 * 512:x})"],
        False,
    ),
    "se-gd-entry-slot": (
        _se,
        lambda p: _put(p, 4096 * 512, "<Q", 0x10000000FFFFFFFF),
        ["names grain table 4294967295"],
        False,
    ),
    "se-gt-entry-type": (
        _se,
        lambda p: _put(p, _se_gt(p), "<Q", 0x5000000000000000),
        ["type 5 is invalid"],
        False,
    ),
    "se-gt-entry-unallocated-bits": (
        _se,
        lambda p: _put(p, _se_gt(p) + 8 * 7, "<Q", 7),
        ["type 0 is invalid"],
        False,
    ),
    "se-grain-past-eof": (
        _se,
        lambda p: _put(p, _se_gt(p), "<Q", 0x3000000000FFFFFF),
        ["past the end"],
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_esxi_extent(tmp_path: Path, name: str) -> None:
    make, edit, words, at_open = CASES[name]
    img, ext = make(tmp_path)
    edit(ext)
    line = error_line("convert", "-O", "raw", img, tmp_path / "out.raw")
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "out.raw").exists()
    if at_open:
        assert error_line("info", img) == line
    else:  # the damage is in one table: info opens the disk, the read that meets it fails
        from ..helpers.cli import flatfs

        assert flatfs("info", img).returncode == 0


def _regions(p: Path) -> list[tuple[int, int]]:
    with open(p, "rb") as f:
        data = f.read(1 << 20)
    if data[:4] == b"COWD":
        gt = struct.unpack_from("<I", data, 2048)[0] * 512
        grain = struct.unpack_from("<I", data, gt)[0] * 512 if gt + 4 <= len(data) else 0
        regions = [(0, 32), (1056, 1064), (2048, 2064), (gt, gt + 64), (grain, grain + 16)]
    else:
        gd = struct.unpack_from("<Q", data, 128)[0] * 512
        regions = [(0, 208), (512, 544), (gd, gd + 32), (_se_gt(p), _se_gt(p) + 64)]
    return [(a, min(b, len(data))) for a, b in regions if a < len(data)]


mutation = st.tuples(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.sampled_from(["byte", "bit", "u32", "u64"]),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 0x7F, 0xFF, 0x200, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, 1 << 60, 1 << 62]),
)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    require(have_qemu(), "qemu-img is not installed")
    out = {}
    for name, make in (("cowd", _cowd), ("se", _se)):
        d = tmp_path_factory.mktemp(f"esxi-{name}")
        out[name] = make(d)
    d = tmp_path_factory.mktemp("esxi-chain")
    _top, _want, twin = esxi_chain(d, 16 * M, ("vmfsSparse", "seSparse"))
    assert twin is not None
    out["chain-se"] = (twin, d / "vm-000002-sesparse.vmdk")
    out["chain-cowd"] = (twin, d / "vm-000001-delta.vmdk")
    return out


@pytest.mark.qemu
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(["cowd", "se", "chain-se", "chain-cowd"]),
    muts=st.lists(mutation, min_size=1, max_size=4),
)
def test_esxi_mutant_is_read_like_qemu_or_refused_cleanly(
    seeds, worker, tmp_path_factory, seed, muts
) -> None:  # type: ignore[no-untyped-def]
    img0, ext0 = seeds[seed]
    d = tmp_path_factory.mktemp("mutant")
    for f in img0.parent.iterdir():
        if f.is_file() and not f.name.endswith(".raw"):
            shutil.copy(f, d / f.name, follow_symlinks=False)
    ext = d / ext0.name
    regions = _regions(ext0)
    with open(ext, "r+b") as f:  # in place: the seSparse file is mostly holes
        for r, w, how, byte, value in muts:
            a, b = regions[r % len(regions)]
            pos = a + w % max(1, b - a)
            word = pos - pos % 8
            f.seek(word)
            chunk = bytearray(f.read(8))
            if pos - word < len(chunk):
                poke(chunk, pos - word, how, byte, value, "<")
                f.seek(word)
                f.write(chunk)
    read_like_qemu_or_refused(worker, d / img0.name, d, f"{seed} {muts}")
