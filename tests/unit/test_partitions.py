"""flatfs/partitions.py without a disk: MBR (primary, extended, logical) and GPT as Linux numbers
them, the GPT's CRCs and backup, and hostile tables (a warning and no partitions, never a crash),
with hypothesis mutants of real-shaped tables."""

from __future__ import annotations

import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from flatfs.partitions import read_table

from ..helpers.parttables import SECTOR, gpt, mbr, mbr_entry

DISK = 64 << 20
SECTORS = DISK // SECTOR


def reader(pieces: dict[int, bytes]):
    def read(offset: int, n: int) -> bytes:
        out = bytearray(n)
        for at, data in pieces.items():
            lo, hi = max(at, offset), min(at + len(data), offset + n)
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - at : hi - at]
        return bytes(out)

    return read


def msdos_with_logicals() -> dict[int, bytes]:
    """p1 primary, p2 extended holding p5 and p6 (EBR chain), p3 primary after it."""
    ext = 20480
    return {
        0: mbr(
            mbr_entry(0x83, 2048, 18432, boot=0x80),
            mbr_entry(0x0F, ext, 40960),
            mbr_entry(0x83, 61440, 10240),
        ),
        ext * SECTOR: mbr(mbr_entry(0x83, 2048, 8192), mbr_entry(0x05, 12288, 12288)),
        (ext + 12288) * SECTOR: mbr(mbr_entry(0x83, 2048, 8192)),
    }


def parts(table):
    return [(p.number, p.start // SECTOR, p.length // SECTOR, p.kind) for p in table.partitions]


def test_msdos_numbering_like_linux():
    t = read_table(reader(msdos_with_logicals()), DISK)
    assert t.scheme == "mbr" and t.warning is None
    assert parts(t) == [
        (1, 2048, 18432, "primary"),
        (2, 20480, 2, "extended"),  # Linux: the extended partition's device is its first 2 sectors
        (3, 61440, 10240, "primary"),
        (5, 22528, 8192, "logical"),
        (6, 20480 + 12288 + 2048, 8192, "logical"),
    ]


def test_gpt_numbering_and_backup():
    pieces = gpt(SECTORS, [(2048, 4095), (8192, 20479)])
    t = read_table(reader(pieces), DISK)
    assert t.scheme == "gpt" and t.warning is None
    assert parts(t) == [(1, 2048, 2048, "gpt"), (2, 8192, 12288, "gpt")]
    assert t.partitions[0].type == "0fc63daf-8483-4772-8e79-3d69d8477de4"
    # the primary header's CRC broken: the backup at the last LBA is used
    broken = dict(pieces)
    broken[SECTOR] = pieces[SECTOR][:40] + b"\x01" + pieces[SECTOR][41:]
    assert parts(read_table(reader(broken), DISK)) == parts(t)
    # the primary entries' CRC broken: the same
    broken = dict(pieces)
    broken[2 * SECTOR] = b"\x01" + pieces[2 * SECTOR][1:]
    assert parts(read_table(reader(broken), DISK)) == parts(t)
    # both broken: a warning that names both, no partitions
    last = (SECTORS - 1) * SECTOR
    broken[last] = pieces[last][:40] + b"\x01" + pieces[last][41:]
    t = read_table(reader(broken), DISK)
    assert t.partitions == () and "primary GPT" in t.warning and "backup GPT" in t.warning


def test_no_table():
    assert read_table(reader({}), DISK) == (None, (), None)
    fat = bytearray(mbr())
    fat[446] = 0x29  # a FAT boot sector has 0x55AA too, and no partition table
    assert read_table(reader({0: bytes(fat)}), DISK).scheme is None


def test_hostile_tables_warn():
    cases = {
        "overlap": {0: mbr(mbr_entry(0x83, 2048, 8192), mbr_entry(0x83, 4096, 8192))},
        "past the end": {0: mbr(mbr_entry(0x83, 2048, SECTORS))},
        "at sector 0": {0: mbr(mbr_entry(0x83, 0, 100))},
        "two extended": {0: mbr(mbr_entry(0x05, 2048, 100), mbr_entry(0x05, 4096, 100))},
        "ebr loop": {
            0: mbr(mbr_entry(0x05, 2048, 40960)),
            2048 * SECTOR: mbr(mbr_entry(0x83, 64, 64), mbr_entry(0x05, 4096, 4096)),
            (2048 + 4096) * SECTOR: mbr(mbr_entry(0x83, 64, 64), mbr_entry(0x05, 0, 4096)),
        },
        "logical outside": {
            0: mbr(mbr_entry(0x05, 2048, 4096)),
            2048 * SECTOR: mbr(mbr_entry(0x83, 64, 8192)),
        },
        "gpt overlap": gpt(SECTORS, [(2048, 8191), (4096, 9000)]),
        "gpt past usable": gpt(SECTORS, [(2048, SECTORS - 1)]),
        "gpt backwards": gpt(SECTORS, [(4096, 2048)]),
    }
    for what, pieces in cases.items():
        t = read_table(reader(pieces), DISK)
        assert t.partitions == () and t.warning and "\n" not in t.warning, (what, t)


def test_absurd_gpt_count():
    pieces = gpt(SECTORS, [(2048, 4095)])
    for at in (SECTOR, (SECTORS - 1) * SECTOR):
        h = bytearray(pieces[at])
        struct.pack_into("<I", h, 80, 1 << 31)
        struct.pack_into("<I", h, 16, 0)
        struct.pack_into("<I", h, 16, zlib.crc32(bytes(h[:92])))
        pieces[at] = bytes(h)
    t = read_table(reader(pieces), DISK)
    assert t.partitions == () and "entries" in t.warning


def _check(t, size):
    if t.warning is not None:
        assert t.partitions == () and "\n" not in t.warning
        return
    spans = sorted((p.start, p.start + p.length) for p in t.partitions if p.kind != "extended")
    for (_a, b), (c, _) in zip(spans, spans[1:]):
        assert b <= c
    for p in t.partitions:
        assert 0 < p.start and p.length > 0 and p.start + p.length <= size


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["mbr", "gpt"]), st.data())
def test_mutants(kind, data):
    """Random byte changes to a real-shaped table: a table, or a warning; never an exception,
    never a partition outside the disk or overlapping another."""
    pieces = msdos_with_logicals() if kind == "mbr" else gpt(SECTORS, [(2048, 4095), (8192, 20479)])
    keys = sorted(pieces)
    mutated = {k: bytearray(v) for k, v in pieces.items()}
    for _ in range(data.draw(st.integers(1, 8))):
        k = data.draw(st.sampled_from(keys))
        span = min(len(mutated[k]), 1024)
        i = data.draw(st.integers(0, span - 1))
        mutated[k][i] = data.draw(st.integers(0, 255))
    _check(read_table(reader({k: bytes(v) for k, v in mutated.items()}), DISK), DISK)
