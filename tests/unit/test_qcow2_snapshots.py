"""The qcow2 snapshot table parser and the -l choice, without QEMU: entries as the spec lays them
out, bounds, and hypothesis mutants of a table (an answer or one CorruptImage, nothing else)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatfs.errors import CorruptImage, UnsupportedImage
from flatfs.formats.qcow2 import snapshots as S


def entry(ident: bytes, name: bytes, extra: bytes = b"", l1: tuple[int, int] = (0x10000, 1)) -> bytes:
    raw = struct.pack(">QIHHIIQII", l1[0], l1[1], len(ident), len(name), 7, 8, 3_000_000_123, 5, len(extra))
    raw += extra + ident + name
    return raw + bytes(-len(raw) % 8)


def reader(table: bytes, at: int):
    def read(offset: int, n: int) -> bytes:
        rel = offset - at
        return (table[max(rel, 0) : rel + n] if rel < len(table) else b"").ljust(n, b"\0")

    return read


def test_entries_as_laid_out():
    extra = struct.pack(">QQQ", 1 << 33, 1 << 20, 42)
    table = entry(b"1", b"first") + entry(b"2", b"second", extra) + entry(b"3", b"v2", struct.pack(">Q", 9))
    got = list(S.walk("img", reader(table, 4096), 3, 4096))
    assert [(s.id, s.name) for s in got] == [("1", "first"), ("2", "second"), ("3", "v2")]
    assert got[0].vm_state_size == 5 and got[0].icount is None and got[0].disk_size is None
    assert got[1].vm_state_size == 1 << 33 and got[1].disk_size == 1 << 20 and got[1].icount == 42
    assert got[2].vm_state_size == 9
    assert got[1].info() == {
        "id": "2",
        "name": "second",
        "vm-state-size": 1 << 33,
        "date-sec": 7,
        "date-nsec": 8,
        "vm-clock-sec": 3,
        "vm-clock-nsec": 123,
        "icount": 42,
    }
    assert got[1].at == 4096 + len(entry(b"1", b"first"))


def test_icount_minus_one_is_not_recorded():
    extra = struct.pack(">QQQ", 0, 0, (1 << 64) - 1)
    (s,) = S.walk("img", reader(entry(b"1", b"a", extra), 0), 1, 0)
    assert s.icount is None and "icount" not in s.info()


def test_bounds():
    with pytest.raises(CorruptImage, match="entry 0 has too much extra data"):
        list(S.walk("img", reader(entry(b"1", b"a", bytes(1025)), 0), 1, 0))
    big = entry(b"1" * 65535, b"n" * 65535)
    with pytest.raises(CorruptImage, match="snapshot table is too big"):
        list(S.walk("img", reader(big * 520, 0), 520, 0))


SNAPS = list(S.walk("img", reader(entry(b"1", b"a") + entry(b"2", b"a") + entry(b"3", b"1"), 0), 3, 0))


@pytest.mark.parametrize(
    "wanted,ident",
    [
        ("1", "1"),
        ("3", "3"),
        ("snapshot.name=1", "3"),
        ("snapshot.id=2", "2"),
        ("snapshot.id=2,snapshot.name=a", "2"),
    ],
)
def test_choose(wanted, ident):
    assert S.choose("img", SNAPS, wanted).id == ident


@pytest.mark.parametrize(
    "wanted,words",
    [
        ("a", "ambiguous"),
        ("zz", "no internal snapshot 'zz'"),
        ("snapshot.id=3,snapshot.name=a", "no internal"),
    ],
)
def test_choose_refuses(wanted, words):
    with pytest.raises(UnsupportedImage, match=words):
        S.choose("img", SNAPS, wanted)


def test_chosen_l1_checked():
    (s,) = S.walk("img", reader(entry(b"1", b"a", l1=(0x10000, 1)), 0), 1, 0)
    S.check_l1("img", s, 0x10000, 0x20000)
    with pytest.raises(CorruptImage, match="outside the file"):
        S.check_l1("img", s, 0x10000, 0x10004)
    with pytest.raises(CorruptImage, match="not cluster aligned"):
        S.check_l1("img", s, 0x20000, 1 << 30)
    (s,) = S.walk("img", reader(entry(b"\xff", b"\xfe", l1=(0, 1 << 31)), 0), 1, 0)
    with pytest.raises(CorruptImage, match=r"snapshot \\xff \(\\xfe\) is too large"):
        S.check_l1("img", s, 0x10000, 1 << 30)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 40), st.data())
def test_mutants(table, count, data):
    """Any table: entries (as many as the header says) or one CorruptImage; and a choice among
    them is one snapshot or one UnsupportedImage."""
    base = entry(b"1", b"a", struct.pack(">QQQ", 0, 0, 0)) + entry(b"2", b"bb")
    mutated = bytearray(base + table)
    for _ in range(data.draw(st.integers(0, 6))):
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] = data.draw(st.integers(0, 255))
    try:
        got = list(S.walk("img", reader(bytes(mutated), 512), count, 512))
    except CorruptImage as exc:
        assert str(exc).startswith("img: ")
        return
    assert len(got) == count
    try:
        S.choose("img", got, data.draw(st.sampled_from(["1", "2", "a", "bb", "x"])))
    except UnsupportedImage as exc:
        str(exc).encode("utf-8")  # printable, whatever the names hold
