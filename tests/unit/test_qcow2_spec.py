"""qcow2 header parsing and L2 entry classification, without QEMU."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flatfs.errors import CorruptImage, UnsupportedImage
from flatfs.formats.qcow2 import clusters as C
from flatfs.formats.qcow2.spec import (
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    parse_header,
)

CS = 65536


def header(
    version=3,
    cluster_bits=16,
    size=1 << 30,
    l1_size=2,
    l1_off=3 * CS,
    rt_off=CS,
    rt_clusters=1,
    incompat=0,
    autoclear=0,
    header_length=112,
    compression=0,
    crypt=0,
    exts=(),
    backing=None,
) -> bytes:
    h = bytearray(CS)
    struct.pack_into(
        ">4sIQIIQIIQQIIQ",
        h,
        0,
        b"QFI\xfb",
        version,
        0,
        0,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        0,
        0,
    )
    off = 72
    if version == 3:
        struct.pack_into(">QQQII", h, 72, incompat, 0, autoclear, 4, header_length)
        if header_length > 104:
            h[104] = compression
        off = header_length
    for etype, data in exts:
        struct.pack_into(">II", h, off, etype, len(data))
        h[off + 8 : off + 8 + len(data)] = data
        off += 8 + (len(data) + 7 & ~7)
    off += 8
    if backing:
        struct.pack_into(">QI", h, 8, off, len(backing))
        h[off : off + len(backing)] = backing
    return bytes(h)


def parse(h: bytes, file_size=10 * CS):
    return parse_header("x.qcow2", h, file_size)


def test_valid_v3_header_with_extensions():
    feat = bytes([0, 0]) + b"dirty".ljust(46, b"\0")
    h = parse(header(exts=[(EXT_BACKING_FORMAT, b"raw"), (EXT_FEATURE_TABLE, feat)], backing=b"base.img"))
    assert (h.version, h.cluster_size, h.size, h.l1_size) == (3, CS, 1 << 30, 2)
    assert h.backing_file == "base.img" and h.backing_format == "raw"
    assert h.feature_names[(0, 0)] == "dirty"


def test_v2_header():
    h = parse(header(version=2))
    assert h.compat == "0.10" and h.header_length == 72 and h.refcount_order == 4


@pytest.mark.parametrize(
    "kw, exc, text",
    [
        (dict(version=1), UnsupportedImage, "version 1"),
        (dict(version=4), UnsupportedImage, "version 4"),
        (dict(cluster_bits=8), CorruptImage, "cluster_bits"),
        (dict(cluster_bits=22), CorruptImage, "cluster_bits"),
        (dict(header_length=100), CorruptImage, "header_length"),
        (dict(header_length=108), CorruptImage, "header_length"),
        (dict(incompat=1 << 5), UnsupportedImage, "bit 5"),
        (dict(crypt=2), UnsupportedImage, "LUKS"),
        (dict(crypt=1), UnsupportedImage, "AES"),
        (dict(incompat=1 << 3, compression=0), CorruptImage, "compression"),
        (dict(compression=1), CorruptImage, "compression"),
        (dict(incompat=1 << 3, compression=7), UnsupportedImage, "compression type 7"),
        (dict(l1_size=1), CorruptImage, "too small"),
        (dict(l1_size=1 << 31), UnsupportedImage, "too large"),
        (dict(size=1 << 62), UnsupportedImage, "too big"),
        (dict(l1_off=3 * CS + 8), CorruptImage, "not cluster aligned"),
        (dict(l1_off=100 * CS), CorruptImage, "past the end"),
        (dict(rt_off=100 * CS), CorruptImage, "refcount table"),
        (dict(incompat=1 << 2), UnsupportedImage, "data file"),
        (dict(autoclear=2), CorruptImage, "data-file-raw"),
        (dict(exts=[(0x1234, b"x" * CS)]), CorruptImage, "overruns"),
        (dict(exts=[(EXT_BACKING_FORMAT, b"x" * 40)]), CorruptImage, "too long"),
    ],
)
def test_bad_headers(kw, exc, text):
    with pytest.raises(exc) as e:
        parse(header(**kw))
    assert text in str(e.value) and str(e.value).startswith("x.qcow2: ")


def test_unknown_feature_is_named_from_the_feature_table():
    feat = bytes([0, 7]) + b"frobnicate".ljust(46, b"\0")
    with pytest.raises(UnsupportedImage, match="frobnicate"):
        parse(header(incompat=1 << 7, exts=[(EXT_FEATURE_TABLE, feat)]))


def test_backing_name_out_of_range():
    h = bytearray(header())
    struct.pack_into(">QI", h, 8, CS - 10, 100)
    with pytest.raises(CorruptImage, match="too long"):
        parse(bytes(h))
    struct.pack_into(">QI", h, 8, CS + 8, 4)
    with pytest.raises(CorruptImage, match="outside the first cluster"):
        parse(bytes(h))


def test_zero_size_image_is_fine():
    assert parse(header(size=0, l1_size=0)).size == 0


def test_data_file_name():
    h = parse(header(incompat=1 << 2, exts=[(EXT_DATA_FILE, b"disk.data")]))
    assert h.data_file == "disk.data" and h.has_data_file


def table(entries: list[int]) -> bytes:
    return b"".join(struct.pack(">Q", e) for e in entries)


def runs(t: C.Table):
    return list(zip(t.starts, t.lengths, t.codes, t.hosts))


def test_classify_standard_entries():
    e = [
        0,
        0,
        (5 * CS) | OFLAG_COPIED,
        6 * CS | OFLAG_COPIED,
        9 * CS,
        OFLAG_ZERO,
        (7 * CS) | OFLAG_ZERO,
        OFLAG_COMPRESSED | 12345,
        7 * CS + 512,
        OFLAG_COPIED,
    ] + [0] * 8182
    t = C.classify(table(e), 16, extended=False, data_file=False)
    assert runs(t)[:6] == [
        (0, 2 * CS, C.ABSENT, 0),
        (2 * CS, 2 * CS, C.DATA, 5 * CS),
        (4 * CS, CS, C.DATA, 9 * CS),
        (5 * CS, 2 * CS, C.ZERO, 0),
        (7 * CS, CS, C.COMPRESSED, OFLAG_COMPRESSED | 12345),
        (8 * CS, CS, C.BAD, 8),
    ]
    assert "not cluster aligned" in t.reasons[5]
    assert runs(t)[6] == (9 * CS, 8183 * CS, C.ABSENT, 0)  # COPIED alone: unallocated


def test_copied_offset_zero_is_data_with_an_external_data_file():
    t = C.classify(table([OFLAG_COPIED, CS | OFLAG_COPIED] + [0] * 8190), 16, extended=False, data_file=True)
    assert runs(t)[0] == (0, 2 * CS, C.DATA, 0)


def test_compressed_with_data_file_is_bad():
    t = C.classify(table([OFLAG_COMPRESSED | 1] + [0] * 8191), 16, extended=False, data_file=True)
    assert t.codes[0] == C.BAD


def test_classify_extended_entries():
    sc = CS // 32
    entries = [
        5 * CS,
        0xFFFFFFFF,  # all allocated
        8 * CS,
        (0b10 << 32) | 0b01,  # sc0 data, sc1 zero, rest absent
        0,
        0b1 << 32,  # unallocated, sc0 zero
        0,
        0b1,  # alloc bit without a cluster: bad
        7 * CS,
        (1 << 32) | 1,  # both bits: bad
        OFLAG_COMPRESSED | 99,
        1,
    ]  # compressed with a bitmap: bad
    raw = table(entries + [0] * (8192 - len(entries)))
    t = C.classify(raw, 16, extended=True, data_file=False)
    r = runs(t)
    assert r[0] == (0, CS, C.DATA, 5 * CS)
    assert r[1] == (CS, sc, C.DATA, 8 * CS)
    assert r[2] == (CS + sc, sc, C.ZERO, 0)
    assert r[3] == (CS + 2 * sc, 30 * sc, C.ABSENT, 0)
    assert r[4] == (2 * CS, sc, C.ZERO, 0)
    assert r[5][2] == C.ABSENT
    assert [x[2] for x in r[6:9]] == [C.BAD, C.BAD, C.BAD]


def test_compressed_location():
    bits = 16
    shift = 62 - (bits - 8)
    entry = (3 << shift) | 0x12345
    assert C.compressed_location(entry, bits) == (0x12345, 4 * 512 - 0x145)


def test_allocated_l1():
    raw = table([0, 5 * CS | OFLAG_COPIED, OFLAG_COPIED, 0, 9 * CS])
    assert C.allocated_l1(raw) == [1, 4]


@pytest.mark.parametrize("order", range(7))
def test_count_nonzero_refcounts(order):
    bits = 1 << order
    n = 64
    values = [(i * 7) % 3 for i in range(n)]  # some zero, some not
    acc = 0
    for i, v in enumerate(values):
        acc |= (v & ((1 << bits) - 1)) << (i * bits) if bits < 8 else 0
    if bits < 8:
        block = acc.to_bytes(n * bits // 8, "little")
    else:
        block = b"".join(v.to_bytes(bits // 8, "big") for v in values)
    want = sum(1 for v in values[:50] if v & ((1 << bits) - 1))
    assert C.count_nonzero_refcounts(block, order, 50) == want


# -- the kind view of an L2 table: the C-level fast path against the entry-by-entry one ---------

_ENTRY = st.one_of(
    st.just(0),
    st.builds(lambda c, copied: (c << 16) | (copied << 63), st.integers(1, 1 << 20), st.booleans()),
    st.sampled_from([1 << 63, (1 << 62) | 0x10000, 0x10001, 0x18000, (1 << 56) | 0x10000, 0x10000 | 2]),
)


@given(st.lists(_ENTRY, min_size=1, max_size=64), st.integers(0, 3))
def test_fast_kind_view_matches_classify(entries: list[int], l1_index: int) -> None:
    cluster_bits = 16
    raw = struct.pack(f">{len(entries)}Q", *entries)
    base = l1_index * len(entries) << cluster_bits
    slow = C.kinds_of(C.classify(raw, cluster_bits, extended=False, data_file=False, version=3), base)
    fast = C.fast_kinds(C.decode(raw), cluster_bits, base, raw)
    plain = all(
        e == 0 or (e & ~((1 << 63) | C.OFFSET_MASK) == 0 and e & C.OFFSET_MASK and not e & 0xFFFF)
        for e in entries
    )
    assert (fast is not None) == plain
    if fast is not None:
        assert (list(fast.starts), list(fast.ends), fast.kinds) == (
            list(slow.starts),
            list(slow.ends),
            slow.kinds,
        )
        # the read runs too: the same hosts, merged where they are contiguous
        table = C.classify(raw, cluster_bits, extended=False, data_file=False, version=3)
        bulk = C.fast_table(fast, cluster_bits, base, raw)
        assert (bulk.starts, bulk.lengths, bulk.codes, bulk.hosts) == (
            table.starts,
            table.lengths,
            table.codes,
            table.hosts,
        )


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 1 << 16), st.integers(1, 6)), min_size=1, max_size=12
    )
)
def test_bulk_read_runs_join_contiguous_hosts(runs: list[tuple[int, int, int]]) -> None:
    """Runs of contiguous host clusters (what qemu-img writes) become one read run each, as in classify."""
    entries: list[int] = []
    for empties, first, n in runs:
        entries += [0] * empties + [((first + k) << 16) | (1 << 63) for k in range(n)]
    raw = struct.pack(f">{len(entries)}Q", *entries)
    fast = C.fast_kinds(C.decode(raw), 16, 0, raw)
    assert fast is not None
    table = C.classify(raw, 16, extended=False, data_file=False, version=3)
    bulk = C.fast_table(fast, 16, 0, raw)
    assert (bulk.starts, bulk.lengths, bulk.codes, bulk.hosts) == (
        table.starts,
        table.lengths,
        table.codes,
        table.hosts,
    )
