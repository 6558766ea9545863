"""The helpers formats share (flatfs.formats.common): the bounded LRU of decoded
tables, and byte-order arrays of table entries, bitmap runs."""

from __future__ import annotations

import random
import struct
import threading

import pytest

from flatfs.formats.common import MSB_FIRST, LruCache, be_array, bit_runs, le_array, same_until


def test_the_least_recently_used_entry_goes_first() -> None:
    c: LruCache[int, str] = LruCache(2)
    c.put(1, "a")
    c.put(2, "b")
    assert c.get(1) == "a"  # 1 is now the most recently used
    c.put(3, "c")
    assert (c.get(2), c.get(1), c.get(3), len(c)) == (None, "a", "c", 2)


def test_a_key_kept_by_another_thread_stays_as_it_was() -> None:
    c: LruCache[int, str] = LruCache(4)
    c.put(1, "first")
    c.put(1, "second")
    assert c.get(1) == "first"


def test_a_cached_none_is_told_from_a_miss() -> None:
    c: LruCache[int, str | None] = LruCache(4)
    miss = object()
    assert c.get(7, miss) is miss
    c.put(7, None)
    assert c.get(7, miss) is None


def test_a_cost_budget_drops_entries_but_keeps_the_minimum() -> None:
    c: LruCache[int, bytes] = LruCache(budget=10, cost=len, keep=2)
    c.put(1, b"x" * 6)
    c.put(2, b"x" * 6)  # 12 > 10, but two entries are always kept
    assert len(c) == 2 and c.used == 12
    c.put(3, b"x" * 3)
    assert (c.get(1), len(c), c.used) == (None, 2, 9)


def test_a_revised_entry_is_charged_its_new_cost() -> None:
    c: LruCache[int, list[int]] = LruCache(budget=5, cost=len)
    entry = [1]
    c.put(1, entry)
    c.put(2, [2])
    c.revise(1, entry, lambda e: e.extend([0, 0, 0, 0]))  # 5 + 1 > 5: the oldest (1) goes
    assert (c.get(1), c.used) == (None, 1)
    c.revise(1, entry, lambda e: e.append(0))  # not cached any more: changed, not charged
    assert (len(entry), c.used) == (6, 1)


def test_a_lowered_limit_applies_from_the_next_entry() -> None:
    c: LruCache[int, int] = LruCache(8)
    c.limit = 2
    for k in range(5):
        c.put(k, k)
    assert [c.get(k) for k in range(5)] == [None, None, None, 3, 4]
    c.clear()
    assert len(c) == 0 and c.used == 0


def test_threads_share_one_cache() -> None:
    c: LruCache[int, int] = LruCache(16, budget=40, cost=lambda v: v % 5)

    def work(seed: int) -> None:
        for k in range(2000):
            key = (k * seed) % 50
            if c.get(key) is None:
                c.put(key, key)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 3, 7, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(c) <= 16 and c.used <= 40
    assert c.used == sum(c.get(k, 0) % 5 for k in range(50) if c.get(k) is not None)


def test_entries_are_read_in_either_byte_order() -> None:
    raw = struct.pack("<3Q", 1, 2**40, 2**64 - 1)
    assert list(le_array("Q", raw)) == [1, 2**40, 2**64 - 1]
    assert list(be_array("I", struct.pack(">2I", 7, 0xDEADBEEF))) == [7, 0xDEADBEEF]
    assert list(le_array("H", b"\x01\x02")) == [0x0201]


def _merged(bits: bytes, lo: int, hi: int) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for a, z, on in bit_runs(bits, lo, hi):
        assert a < z and (not out or out[-1][1] == a)
        if out and out[-1][2] == on:
            out[-1] = (out[-1][0], z, on)
        else:
            out.append((a, z, on))
    return out


def test_bit_runs_of_a_bitmap_either_bit_first() -> None:
    bits = b"\xff\xff\x01\x00\x00\x80\xf0"
    assert _merged(bits, 0, 56) == [
        (0, 17, True),
        (17, 47, False),
        (47, 48, True),
        (48, 52, False),
        (52, 56, True),
    ]
    assert _merged(bits, 3, 50) == [(3, 17, True), (17, 47, False), (47, 48, True), (48, 50, False)]
    # most significant bit first (VHD): 0x01 is the byte's last sector, 0x80 its first
    msb = bits.translate(MSB_FIRST)
    assert _merged(msb, 0, 56) == [
        (0, 16, True),
        (16, 23, False),
        (23, 24, True),
        (24, 40, False),
        (40, 41, True),
        (41, 48, False),
        (48, 52, True),
        (52, 56, False),
    ]


@pytest.mark.parametrize("seed", range(8))
def test_same_until_finds_the_first_different_entry(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        size = rng.choice((4, 8))
        entries = []
        while len(entries) < 300:
            entries += [rng.randrange(3).to_bytes(size, "little")] * rng.choice((1, 2, 7, 64, 130))
        raw = b"".join(entries)
        start = rng.randrange(len(entries))
        want = start + 1
        while want < len(entries) and entries[want] == entries[start]:
            want += 1
        assert same_until(raw, start, size) == want
