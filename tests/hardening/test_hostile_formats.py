"""The failing classes of the VMDK/VHD/VHDX hostile-image campaign (issue 23), hand-made.

Each image lies in a field to make flatfs spend memory or CPU the file does
not back. Every command runs in a subprocess under RLIMIT_AS (512 MiB) and a
wall-clock limit (tests/helpers/hostile.py), so a regression fails the test
instead of swapping or hanging: it must end with a correct result or one line.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from array import array
from pathlib import Path

import pytest

from flatfs import open_chain

from ..helpers.hostile import assert_clean, bounded, refused
from ..helpers.vhd_writer import DYNAMIC, checksum, footer
from ..helpers.vhdx_writer import LOG_OFFSET, VhdxImage, with_crc

MiB = 1 << 20
SECTOR = 512
KDMV = struct.Struct("<4sIIQQQQIQQQB4sH")
COMMANDS = ("info", "map", "convert")


def _commands(top: Path, tmp: Path) -> list[list[str | Path]]:
    return [["info", top], ["map", top], ["convert", "-O", "qcow2", top, tmp / "out.qcow2"]]


def sparse_header(
    capacity: int, grain: int, gd: int, *, compress: int = 0, flags: int = 3, overhead: int = 1
) -> bytes:
    """A KDMV header: ``capacity`` and ``grain`` in sectors, the grain directory at sector ``gd``."""
    raw = KDMV.pack(b"KDMV", 1, flags, capacity, grain, 0, 0, 512, 0, gd, overhead, 0, b"\n \r\n", compress)
    return raw.ljust(SECTOR, b"\0")


def descriptor(d: Path, ctype: str, *lines: str, name: str = "top.vmdk") -> Path:
    text = f'# Disk DescriptorFile\nversion=1\nCID=fedcba98\nparentCID=ffffffff\ncreateType="{ctype}"\n'
    (d / name).write_text(text + "\n".join(lines) + "\n")
    return d / name


@pytest.mark.parametrize("extents", [16, 64])
def test_many_extents_over_one_huge_grain_directory(tmp_path: Path, extents: int) -> None:
    """Every SPARSE extent names the same 128 MiB file with a 32 Mi-entry grain directory:
    2.3 GiB on info once, a MemoryError with 64. The chain-wide table budget refuses it."""
    gd_entries = 32 << 20
    capacity = gd_entries * 512  # one-sector grains, 512 per table
    with open(tmp_path / "big.vmdk", "wb") as f:
        f.write(sparse_header(capacity, 1, 1))
        f.truncate(SECTOR + 4 * gd_entries)
    top = descriptor(tmp_path, "twoGbMaxExtentSparse", *[f'RW {capacity} SPARSE "big.vmdk"'] * extents)
    for args in _commands(top, tmp_path):
        assert "MAX_CHAIN_TABLES" in refused(*args)


def test_grain_directory_pointing_at_more_tables_than_the_file_holds(tmp_path: Path) -> None:
    """8 Mi non-zero directory entries in a 32 MiB file (594 MiB on info; map never ended)."""
    n = 8 << 20
    with open(tmp_path / "top.vmdk", "wb") as f:
        f.write(sparse_header(n * 512, 1, 1))
        f.write((array("I", [1]) * n).tobytes())
    for args in _commands(tmp_path / "top.vmdk", tmp_path):
        assert "more than the file can hold" in refused(*args)


def test_a_compressed_grain_of_1_gib_is_refused(tmp_path: Path) -> None:
    """streamOptimized with QEMU's largest grain: every reader thread would inflate 1 GiB."""
    grain = 0x200000  # sectors: 1 GiB
    with open(tmp_path / "top.vmdk", "wb") as f:
        f.write(sparse_header(grain, grain, 1, compress=1, flags=3 | 1 << 16 | 1 << 17))
        f.write(bytes(SECTOR))
    for args in _commands(tmp_path / "top.vmdk", tmp_path):
        assert "larger than flatfs inflates" in refused(*args)


def test_a_vhd_table_that_claims_more_blocks_than_the_file_holds(tmp_path: Path) -> None:
    """512-byte blocks, 16 Mi table entries all allocated (1.2 GiB to build a set of them)."""
    n = 16 << 20
    size = n * SECTOR
    table = 3 * SECTOR
    hdr = bytearray(1024)
    struct.pack_into(">8sQQIIII", hdr, 0, b"cxsparse", 2**64 - 1, table, 0x00010000, n, SECTOR, 0)
    struct.pack_into(">I", hdr, 36, checksum(hdr))
    foot = footer(size, DYNAMIC, uuid.uuid4().bytes, data_offset=SECTOR)
    entries = array("I", [(table + 4 * n) // SECTOR]) * n
    entries.byteswap()
    with open(tmp_path / "top.vhd", "wb") as f:
        f.write(foot + bytes(hdr) + entries.tobytes() + bytes(2 * SECTOR) + foot)
    for args in _commands(tmp_path / "top.vhd", tmp_path):
        assert "more than the file can hold" in refused(*args)


def _vhdx_with_log(d: Path, log_length: int) -> tuple[Path, int, uuid.UUID]:
    """A small VHDX whose headers name a log of ``log_length`` bytes at the end of the file."""
    img = VhdxImage(4 * MiB)
    path = d / "top.vhdx"
    img.save(path)
    log_at = -(-os.path.getsize(path) // MiB) * MiB
    guid = uuid.uuid4()
    with open(path, "r+b") as f:
        for at in (64 << 10, 128 << 10):
            f.seek(at)
            h = bytearray(f.read(4096))
            h[48:64] = guid.bytes_le
            struct.pack_into("<IQ", h, 68, log_length, log_at)
            f.seek(at)
            f.write(with_crc(h))
        f.truncate(log_at + log_length)
    assert log_at != LOG_OFFSET
    return path, log_at, guid


def _entry_head(guid: uuid.UUID, length: int, seq: int, size: int) -> bytes:
    """A log entry header with a wrong checksum (zero) claiming ``length`` bytes."""
    return struct.pack("<4sIIIQII16sQQ", b"loge", 0, length, 0, seq, 0, 0, guid.bytes_le, size, size)


def test_a_log_entry_claiming_256_mib(tmp_path: Path) -> None:
    """One entry header claiming 256 MiB (785 MiB RSS, three copies of it): checksummed in pieces."""
    path, log_at, guid = _vhdx_with_log(tmp_path, 256 * MiB)
    with open(path, "r+b") as f:
        f.seek(log_at)
        f.write(_entry_head(guid, 256 * MiB, 1000, log_at))
    for args in _commands(path, tmp_path):
        assert_clean(bounded(*args))


def test_a_damaged_log_is_searched_within_a_budget(tmp_path: Path) -> None:
    """An entry header every 4 MiB of a 256 MiB log, each claiming the rest, all with bad checksums
    (124 s of Python CRC-32C): refused as too damaged, or read, within the limits."""
    path, log_at, guid = _vhdx_with_log(tmp_path, 256 * MiB)
    with open(path, "r+b") as f:
        for k in range(64):
            f.seek(log_at + k * 4 * MiB)
            f.write(_entry_head(guid, (64 - k) * 4 * MiB, 1000 + k, log_at))
    for args in _commands(path, tmp_path):
        r = bounded(*args, wall=20)
        assert_clean(r)
        assert r.returncode == 1 and "too damaged" in r.stderr, r.stderr


def test_a_huge_flat_extent_is_walked_in_constant_steps(tmp_path: Path) -> None:
    """2^54 sectors over a 1 MiB file: walked once past its end (QEMU: allocated, reads zeros)."""
    (tmp_path / "data.bin").write_bytes(b"\x5a" * MiB)
    top = descriptor(tmp_path, "monolithicFlat", 'RW 18014398509481983 FLAT "data.bin" 0')
    r = bounded("map", "--output", "json", top, wall=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('"start"') == 2, r.stdout
    assert_clean(bounded("convert", "-O", "qcow2", top, tmp_path / "out.qcow2", wall=20))


def test_a_descriptor_line_of_a_million_spaces_is_parsed_in_linear_time(tmp_path: Path) -> None:
    """``ddb.comment = x<spaces>y``: the key=value regex backtracked (40k spaces 4.3 s, 1 MiB hours)."""
    (tmp_path / "data.bin").write_bytes(bytes(MiB))
    line = "ddb.comment = x" + " " * 1_000_000 + "y"
    top = descriptor(tmp_path, "monolithicFlat", 'RW 2048 FLAT "data.bin" 0', line)
    r = bounded("info", top, wall=10)
    assert r.returncode == 0, r.stderr
    # an unknown line of the same length: refused with its line number, nothing quoted
    bad = descriptor(tmp_path, "monolithicFlat", 'RW 2048 FLAT "data.bin" 0', "x" + " " * 1_000_000 + "y")
    assert "descriptor line 7: not a key=value or extent line" in refused("info", bad, wall=10)


@pytest.mark.parametrize(
    "line",
    ['RW ² FLAT "data.bin" 0', 'RW 2048 FLAT "data.bin" 1¹', "version=²", 'RW ٢٠٤٨ FLAT "data.bin" 0'],
    ids=["size", "offset", "version", "arabic-indic"],
)
def test_unicode_digits_are_one_line_errors(tmp_path: Path, line: str) -> None:
    (tmp_path / "data.bin").write_bytes(bytes(MiB))
    extent = line if line.startswith("RW") else 'RW 2048 FLAT "data.bin" 0'
    text = f"# Disk DescriptorFile\n{line if line.startswith('version') else 'version=1'}\nCID=fedcba98\n"
    text += f'parentCID=ffffffff\ncreateType="monolithicFlat"\n{extent}\n'
    (tmp_path / "top.vmdk").write_text(text)
    for cmd, *rest in _commands(tmp_path / "top.vmdk", tmp_path):
        line_out = refused(cmd, "-f", "vmdk", *rest)  # probed, "version=²" first is raw, as in QEMU
        assert "descriptor line" in line_out and "²" not in line_out and "¹" not in line_out


def test_many_compressed_extents_keep_one_grain_per_thread(tmp_path: Path) -> None:
    """256 extents naming one streamOptimized file of 1 MiB grains: each reader thread kept the
    last grain of every extent it read (256 MiB in all); now one grain a thread. Run under a
    tighter limit than the others (256 MiB), which the 256 grains pass."""
    grain = 2048  # sectors: 1 MiB, the largest compressed grain flatfs inflates
    data = zlib.compress(bytes(range(256)) * 4096)
    with open(tmp_path / "s.vmdk", "wb") as f:
        f.write(sparse_header(grain, grain, 1, compress=1, flags=3 | 1 << 16 | 1 << 17, overhead=6))
        f.write(struct.pack("<I", 2).ljust(SECTOR, b"\0"))  # the directory: one table, at sector 2
        f.write(struct.pack("<I", 6).ljust(4 * SECTOR, b"\0"))  # the table: one grain, at sector 6
        f.write(struct.pack("<QI", 0, len(data)) + data)
    top = descriptor(tmp_path, "twoGbMaxExtentSparse", *[f'RW {grain} SPARSE "s.vmdk"'] * 256)
    r = bounded("convert", "-O", "raw", top, tmp_path / "out.raw", memory=256 << 20)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out.raw").read_bytes()[-MiB:] == bytes(range(256)) * 4096


def test_one_file_named_by_4096_extents_is_opened_once(tmp_path: Path) -> None:
    """Each open took QEMU's locks on one more descriptor of the same file, and every lock and
    close scans them all: 4096 extents of one file cost 10 s. The file is opened once."""
    (tmp_path / "d.bin").write_bytes(bytes(MiB))
    top = descriptor(tmp_path, "monolithicFlat", *['RW 1 FLAT "d.bin" 0'] * 4096)
    with open_chain(top) as chain:
        assert len({h.fd for h in chain.host_files()}) == 2  # the descriptor and d.bin
        assert chain.size == 4096 * SECTOR
    assert_clean(bounded("map", top))


def test_the_table_budget_spans_the_layers_of_a_chain(tmp_path: Path) -> None:
    """Two layers, each within the budget alone, over it together: refused at the parent."""
    gd_entries = 24 << 20  # 192 MiB of budget a layer (the directory and its index)
    capacity = gd_entries * 512
    for name in ("base.vmdk", "delta.vmdk"):
        with open(tmp_path / name, "wb") as f:
            f.write(sparse_header(capacity, 1, 1))
            f.truncate(SECTOR + 4 * gd_entries)
    top = descriptor(tmp_path, "twoGbMaxExtentSparse", f'RW {capacity} SPARSE "delta.vmdk"')
    top.write_text(
        top.read_text().replace("parentCID=ffffffff", "parentCID=12345678")
        + 'parentFileNameHint="base.vmdk"\n'
    )
    assert_clean(bounded("info", "--no-backing", top))
    line = refused("info", "--ignore-parent-id", top)
    assert "base.vmdk" in line and "MAX_CHAIN_TABLES" in line, line


def test_the_extent_count_spans_the_layers_of_a_chain(tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_bytes(bytes(MiB))
    lines = ['RW 1 FLAT "d.bin" 0'] * 2100
    descriptor(tmp_path, "monolithicFlat", *lines, name="base.vmdk")
    top = descriptor(tmp_path, "monolithicFlat", *lines)
    top.write_text(
        top.read_text().replace("parentCID=ffffffff", "parentCID=fedcba98")
        + 'parentFileNameHint="base.vmdk"\n'
    )
    assert_clean(bounded("info", "--no-backing", top))
    assert "MAX_CHAIN_EXTENTS" in refused("map", top)
