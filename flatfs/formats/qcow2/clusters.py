"""The hot path: decode one whole L2 table and classify it into runs.

A table is decoded in one C-level pass (``array('Q')`` + ``byteswap``), long
stretches of empty entries are skipped with a regex over the raw bytes, and
neighbouring entries of the same type (data clusters only when their host
offsets are contiguous) are merged into runs. A decoded table is a
:class:`Table`: parallel lists, searched with bisect.
"""

from __future__ import annotations

import operator
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from itertools import compress, repeat

from ...extents import K_ABSENT, K_DATA, K_ZERO
from ..common import NONZERO, be_array
from .spec import OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS

# Run codes. ABSENT/ZERO/DATA map to extents.Kind; COMPRESSED is data that
# needs decompressing; BAD is an entry QEMU would refuse (EIO on access).
ABSENT, ZERO, DATA, COMPRESSED, BAD = range(5)


@dataclass(slots=True)
class Table:
    """One L2 table's runs; offsets are guest bytes relative to the table start."""

    starts: list[int]
    lengths: list[int]
    codes: list[int]
    hosts: list[int]  # DATA: host offset; COMPRESSED: raw entry; BAD: entry index
    reasons: dict[int, str]  # run index -> why it is BAD
    l2_offset: int = 0  # where the table lives in the image (for error messages)

    def find(self, rel: int) -> int:
        """Index of the run containing relative offset ``rel``."""
        return bisect_right(self.starts, rel) - 1

    def __len__(self) -> int:
        return len(self.starts)


class _Builder:
    __slots__ = ("starts", "lengths", "codes", "hosts", "reasons")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.lengths: list[int] = []
        self.codes: list[int] = []
        self.hosts: list[int] = []
        self.reasons: dict[int, str] = {}

    def add(self, start: int, length: int, code: int, host: int = 0, reason: str | None = None) -> None:
        if self.codes:
            last = len(self.codes) - 1
            pc = self.codes[last]
            if pc == code and self.starts[last] + self.lengths[last] == start:
                if code in (ABSENT, ZERO) or (code == DATA and self.hosts[last] + self.lengths[last] == host):
                    self.lengths[last] += length
                    return
        if reason is not None:
            self.reasons[len(self.codes)] = reason
        self.starts.append(start)
        self.lengths.append(length)
        self.codes.append(code)
        self.hosts.append(host)

    def table(self) -> Table:
        return Table(self.starts, self.lengths, self.codes, self.hosts, self.reasons)


# In a table's kind view: an entry QEMU refuses (reads and maps stop before it)
K_BAD = 4
_KIND_OF_CODE = {ABSENT: K_ABSENT, ZERO: K_ZERO, DATA: K_DATA, COMPRESSED: K_DATA, BAD: K_BAD}
_FAST_KIND = bytes([K_ABSENT, K_DATA]) + bytes(254)  # 0: empty entry, 1: plain data cluster


@dataclass(slots=True)
class Kinds:
    """One L2 table as runs of extent kinds (guest offsets): what mapping needs.

    Neighbouring runs always differ in kind (K_BAD runs are never merged).
    """

    starts: array[int]
    ends: array[int]
    kinds: bytes

    def __len__(self) -> int:
        return len(self.kinds)


def kinds_of(t: Table, base: int) -> Kinds:
    """The kind view of a classified table starting at guest offset ``base``: its runs merged
    by kind, whatever their hosts."""
    starts: array[int] = array("Q")
    ends: array[int] = array("Q")
    kinds = bytearray()
    for rel, n, c in zip(t.starts, t.lengths, t.codes):
        s = base + rel
        k = _KIND_OF_CODE[c]
        if kinds and kinds[-1] == k and k != K_BAD and ends[-1] == s:
            ends[-1] = s + n
            continue
        starts.append(s)
        ends.append(s + n)
        kinds.append(k)
    return Kinds(starts, ends, bytes(kinds))


def _plain(raw: bytes, cluster_bits: int) -> bool:
    """Is every entry of this standard L2 table (big-endian bytes) empty or a plain data cluster:
    no flag but COPIED, no low bit below the cluster size? Byte slices, no work per entry."""
    if raw[0::8].translate(None, b"\x00\x80"):
        return False  # compressed, or reserved bits 56-61
    full, part = divmod(cluster_bits, 8)
    for k in range(full):  # bytes wholly below the cluster size
        column = raw[7 - k :: 8]
        if column.count(0) != len(column):
            return False
    if part:
        column = raw[7 - full :: 8].translate(_LOW_BITS[part])
        if column.count(0) != len(column):
            return False
    return True


# byte -> its low `bits` bits, per number of bits
_LOW_BITS = {bits: bytes(b & ((1 << bits) - 1) for b in range(256)) for bits in range(1, 8)}


def fast_kinds(entries: array[int], cluster_bits: int, base: int, raw: bytes) -> Kinds | None:
    """The kind view of a standard L2 table holding only empty entries and plain, aligned data
    clusters (what qemu-img writes): built in C-level passes, no Python work per entry.

    None when any entry is something else (compressed, zero, misaligned, reserved bits): then
    :func:`classify` decides, entry by entry.
    """
    cs = 1 << cluster_bits
    if not _plain(raw, cluster_bits) or entries.count(OFLAG_COPIED):
        return None
    end = base + len(entries) * cs
    data = bytes(map(bool, entries))
    changes = bytes(map(operator.ne, data[1:], data[:-1]))
    cuts = array("Q", compress(range(base + cs, end, cs), changes))
    starts = array("Q", [base])
    starts.extend(cuts)
    cuts.append(end)
    kinds = data[:1] + bytes(compress(data[1:], changes))
    return Kinds(starts, cuts, kinds.translate(_FAST_KIND))


def fast_table(kinds: Kinds, cluster_bits: int, base: int, raw: bytes) -> Table:
    """The read runs of a table :func:`fast_kinds` accepted (empty entries and plain, aligned
    data clusters): the same :class:`Table` as :func:`classify`, with Python work per run of
    contiguous host clusters, never per entry.

    Host offsets come from the entries with their flag byte cleared in one slice
    assignment; inside each DATA run of the kind view, a break in host contiguity is
    found with a C-level pass over the differences of neighbouring entries.
    """
    cs = 1 << cluster_bits
    flat = bytearray(raw)
    flat[0::8] = bytes(len(raw) // 8)  # COPIED (bit 63) is the only flag a plain table has
    hosts = decode(bytes(flat))
    starts: list[int] = []
    lengths: list[int] = []
    codes: list[int] = []
    hostl: list[int] = []
    for s, e, k in zip(kinds.starts, kinds.ends, kinds.kinds):
        i0, i1 = (s - base) >> cluster_bits, (e - base) >> cluster_bits
        if k != K_DATA:
            starts.append(i0 << cluster_bits)
            lengths.append((i1 - i0) << cluster_bits)
            codes.append(ABSENT)
            hostl.append(0)
            continue
        seg = hosts[i0:i1]
        breaks = bytes(map(operator.ne, map(operator.sub, seg[1:], seg[:-1]), repeat(cs)))
        j = 0
        while True:
            p = breaks.find(1, j)
            stop = p + 1 if p >= 0 else i1 - i0
            starts.append((i0 + j) << cluster_bits)
            lengths.append((stop - j) << cluster_bits)
            codes.append(DATA)
            hostl.append(seg[j])
            if p < 0:
                break
            j = stop
    return Table(starts, lengths, codes, hostl, {})


def decode(raw: bytes) -> array[int]:
    return be_array("Q", raw)


def classify(
    raw: bytes, cluster_bits: int, *, extended: bool, data_file: bool, base: int = 0, version: int = 3
) -> Table:
    """Classify every entry of one L2 table (``raw`` is the table as stored).

    ``base`` is the guest offset the table starts at: in an external data file
    every allocated cluster must sit at its own guest offset (QEMU: EIO otherwise).
    """
    cs = 1 << cluster_bits
    entries = decode(raw)
    step = 2 if extended else 1
    n = len(entries) // step
    esize = 8 * step
    b = _Builder()
    i = 0
    while i < n:
        e = entries[i * step]
        bm = entries[i * step + 1] if extended else 0
        if e == 0 and bm == 0:
            m = NONZERO.search(raw, i * esize)
            j = n if m is None else m.start() // esize
            b.add(i * cs, (j - i) * cs, ABSENT)
            i = j
            continue
        gstart = i * cs
        if e & OFLAG_COMPRESSED:
            if data_file:
                b.add(gstart, cs, BAD, i, "compressed cluster in an image with an external data file")
            elif extended and bm:
                b.add(gstart, cs, BAD, i, "compressed cluster with a non-zero subcluster bitmap")
            else:
                b.add(gstart, cs, COMPRESSED, e)
            i += 1
            continue
        host = e & OFFSET_MASK
        allocated = bool(host) or (data_file and bool(e & OFLAG_COPIED))
        if (
            data_file
            and allocated
            and host != base + gstart
            and not (host == 0 and e & OFLAG_ZERO and not extended)
        ):
            # QEMU: every cluster with a host offset (all but a plain zero
            # cluster) must sit at its own guest offset in the data file
            b.add(
                gstart,
                cs,
                BAD,
                i,
                f"data file offset 0x{host:x} does not match the guest offset 0x{base + gstart:x}",
            )
            i += 1
            continue
        if not extended:
            if e & OFLAG_ZERO and version < 3:
                # QEMU fails the read and calls the image corrupt: zero clusters came with v3
                b.add(gstart, cs, BAD, i, "zero cluster entry in a version 2 image")
            elif e & OFLAG_ZERO:
                if allocated and host % cs:
                    b.add(gstart, cs, BAD, i, f"zero cluster offset 0x{host:x} is not cluster aligned")
                else:
                    b.add(gstart, cs, ZERO)
            elif not allocated:
                b.add(gstart, cs, ABSENT)
            elif host % cs:
                b.add(gstart, cs, BAD, i, f"data cluster offset 0x{host:x} is not cluster aligned")
            else:
                b.add(gstart, cs, DATA, host)
            i += 1
            continue
        # extended L2: classify the 32 subclusters
        alloc = bm & 0xFFFFFFFF
        zero = bm >> 32
        if allocated:
            if alloc & zero:
                b.add(gstart, cs, BAD, i, "subcluster both allocated and zero")
            elif host % cs:
                b.add(gstart, cs, BAD, i, f"data cluster offset 0x{host:x} is not cluster aligned")
            elif alloc == 0xFFFFFFFF:
                b.add(gstart, cs, DATA, host)
            elif zero == 0xFFFFFFFF:
                b.add(gstart, cs, ZERO)
            elif alloc == 0 and zero == 0:
                b.add(gstart, cs, ABSENT)
            else:
                _subclusters(b, gstart, cs // SUBCLUSTERS, alloc, zero, host)
        elif alloc:
            b.add(gstart, cs, BAD, i, "subcluster allocated in an unallocated cluster")
        elif zero == 0xFFFFFFFF:
            b.add(gstart, cs, ZERO)
        elif zero == 0:
            b.add(gstart, cs, ABSENT)
        else:
            _subclusters(b, gstart, cs // SUBCLUSTERS, 0, zero, host)
        i += 1
    return b.table()


def _subclusters(b: _Builder, gstart: int, scs: int, alloc: int, zero: int, host: int) -> None:
    for k in range(SUBCLUSTERS):
        bit = 1 << k
        if zero & bit:
            b.add(gstart + k * scs, scs, ZERO)
        elif alloc & bit:
            b.add(gstart + k * scs, scs, DATA, host + k * scs)
        else:
            b.add(gstart + k * scs, scs, ABSENT)


def compressed_location(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte count) of a compressed cluster descriptor."""
    shift = 62 - (cluster_bits - 8)
    offset = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * 512 - (offset & 511)


def allocated_l1(raw: bytes) -> list[int]:
    """Sorted indices of L1 entries that point at an L2 table."""
    entries = None
    out: list[int] = []
    pos = 0
    while True:
        m = NONZERO.search(raw, pos)
        if m is None:
            return out
        idx = m.start() // 8
        if entries is None:
            entries = decode(raw)
        if entries[idx] & OFFSET_MASK:
            out.append(idx)
        pos = (idx + 1) * 8


_NONZERO_FIELDS = {
    order: bytes(
        sum(1 for k in range(0, 8, 1 << order) if (b >> k) & ((1 << (1 << order)) - 1)) for b in range(256)
    )
    for order in (0, 1, 2)
}
_ARRAY_CODE = {4: "H", 5: "I", 6: "Q"}


def count_nonzero_refcounts(block: bytes, order: int, n: int) -> int:
    """How many of the first ``n`` refcounts (each 2**order bits wide) in ``block`` are non-zero."""
    bits = 1 << order
    if bits < 8:
        per_byte = 8 // bits
        whole, rest = divmod(n, per_byte)
        count = sum(block[:whole].translate(_NONZERO_FIELDS[order]))
        if rest:
            # sub-byte refcounts fill each byte from its least significant bit
            mask = (1 << (rest * bits)) - 1
            count += bytes([block[whole] & mask]).translate(_NONZERO_FIELDS[order])[0]
        return count
    if bits == 8:
        part = block[:n]
        return len(part) - part.count(0)
    a = array(_ARRAY_CODE[order])
    if a.itemsize != bits // 8:  # "I" is 4 bytes on every platform we run on; be safe
        a = array("Q" if bits == 64 else "L")
    a.frombytes(block[: n * (bits // 8)])
    return len(a) - a.count(0)  # byte order does not change zero-ness
