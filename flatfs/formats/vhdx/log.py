"""The VHDX log (MS-VHDX 2.3), replayed in memory: the file as Hyper-V would see it.

When the current header's LogGuid is not zero, the log may hold entries that
were written but never applied to the file (a crash, a backup taken of a
running VM). Hyper-V and QEMU replay them into the file before using it.
flatfs never writes an image: it finds the active sequence of log entries,
validates each entry (signature, CRC-32C, LogGuid, sequence numbers,
lengths, target offsets) and builds an overlay, an index from file offset to
the log sector holding the newer bytes (or to "zeros"). Every read of the
region table, metadata, BAT, sector bitmaps and payload goes through
:class:`FileView`, which consults the overlay. Memory is bounded by the log's
size: the overlay keeps offsets and 12 bytes per data sector, and reads the
4084 other bytes from the log in the file when they are needed.
"""

from __future__ import annotations

import heapq
import struct
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field

from ...errors import CorruptImage
from ...hostio import pread_exact
from .spec import LOG_SECTOR, REGION_TABLE_OFFSETS, Header, crc32c, guid

_ENTRY = struct.Struct("<4sIIIQII16sQQ")  # 64 bytes
_DESC = struct.Struct("<4sI8sQQ")  # data descriptor; a zero descriptor shares the layout
_ZERO_DESC = struct.Struct("<4sIQQQ")
ENTRY_SIGNATURE = b"loge"
MAX_TARGET = 1 << 52  # no VHDX file is larger than 4 PiB; bounds every target offset
MAX_HEADS = 64  # candidate heads tried when the newest entries do not form a valid sequence
ZERO = -1  # an overlay segment that reads zeros
CRC_PIECE = 1 << 20  # an entry is checksummed in pieces of this much


@dataclass(slots=True)
class Entry:
    pos: int  # offset within the log
    length: int
    tail: int
    sequence: int
    flushed: int
    last: int
    zeros: list[tuple[int, int]] = field(default_factory=list)  # (target, length)
    data: list[tuple[int, int, bytes]] = field(default_factory=list)  # (target, log sector pos, edges)


class FileView:
    """Reads of the image file, with the replayed log laid over it."""

    def __init__(self, path: str, fd: int, file_size: int, header: Header) -> None:
        self.path, self.fd = path, fd
        self.file_size = file_size  # the host file's size
        self.size = file_size  # the file as the replayed log leaves it (never smaller)
        self.state = "clean"  # "clean", "empty" (LogGuid set, no entry to replay), "replayed"
        self.entries = 0
        self.sequence: tuple[int, int] | None = None
        self._starts: array[int] = array("Q")
        self._ends: array[int] = array("Q")
        self._src: array[int] = array("q")  # ZERO, or an index into _sectors
        self._sectors: array[int] = array("Q")  # absolute file offset of each data sector used
        self._edges = bytearray()  # 12 bytes per data sector: leading 8, trailing 4
        if header.log_guid.int:
            if not header.log_length:
                raise CorruptImage(path, "header has a LogGuid but no log", header.at + 48)
            self._replay(header)

    # -- reading ---------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the file's bytes at ``offset``; past the host file's end, zeros.

        (offset, buf), as ``Layer.readinto``: one argument order for every readinto."""
        end = offset + len(buf)
        pos = offset
        k = bisect_right(self._ends, offset)
        while pos < end:
            if k < len(self._starts) and self._starts[k] <= pos:
                seg_end = min(self._ends[k], end)
                self._overlay(pos, buf[pos - offset : seg_end - offset], k)
                pos = seg_end
                k += 1
                continue
            nxt = self._starts[k] if k < len(self._starts) else end
            stop = min(nxt, end)
            self._host(pos, buf[pos - offset : stop - offset])
            pos = stop

    def touches(self, start: int, end: int) -> bool:
        """Does the overlay change any byte of [start, end)?"""
        k = bisect_right(self._ends, start)
        return k < len(self._starts) and self._starts[k] < end

    def _host(self, offset: int, buf: memoryview) -> None:
        n = max(0, min(len(buf), self.file_size - offset))
        if n:
            pread_exact(self.fd, self.path, buf[:n], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    def _overlay(self, offset: int, buf: memoryview, k: int) -> None:
        src = self._src[k]
        if src == ZERO:
            buf[:] = bytes(len(buf))
            return
        # one 4 KiB data sector: leading 8 bytes and trailing 4 come from its descriptor
        base = self._starts[k]
        sector = bytearray(LOG_SECTOR)
        pread_exact(self.fd, self.path, memoryview(sector), self._sectors[src])
        edges = self._edges[12 * src : 12 * src + 12]
        sector[0:8] = edges[0:8]
        sector[LOG_SECTOR - 4 :] = edges[8:12]
        rel = offset - base
        buf[:] = sector[rel : rel + len(buf)]

    # -- replay ----------------------------------------------------------------
    def _replay(self, h: Header) -> None:
        scan = _Scanner(self.path, self.fd, h)
        seq = scan.active_sequence()
        if not seq:
            self.state = "empty"
            return
        head = seq[-1]
        if head.flushed > self.file_size:
            raise CorruptImage(
                self.path,
                f"the log says the file was 0x{head.flushed:x} bytes long, it is 0x{self.file_size:x}"
                " (truncated?)",
                h.log_offset + head.pos + 48,
            )
        log_span = (h.log_offset, h.log_offset + h.log_length)
        # (start, end, order, src) in replay order; later writes win
        writes: list[tuple[int, int, int, int]] = []
        top = self.file_size
        for e in seq:
            for target, length in e.zeros:
                self._check_target(target, length, log_span, h, e)
                writes.append((target, target + length, len(writes), ZERO))
                top = max(top, target + length)
            for target, sector, edges in e.data:
                self._check_target(target, LOG_SECTOR, log_span, h, e)
                writes.append((target, target + LOG_SECTOR, len(writes), len(self._sectors)))
                self._sectors.append(h.log_offset + sector)
                self._edges += edges
                top = max(top, target + LOG_SECTOR)
            top = max(top, e.last)
        self._paint(writes)
        self.size = top
        self.state = "replayed"
        self.entries = len(seq)
        self.sequence = (seq[0].sequence, head.sequence)

    def _check_target(self, target: int, length: int, log_span: tuple[int, int], h: Header, e: Entry) -> None:
        at = h.log_offset + e.pos
        if target % LOG_SECTOR or length % LOG_SECTOR or length == 0 or target + length > MAX_TARGET:
            raise CorruptImage(self.path, f"log entry {e.sequence} has a misaligned target 0x{target:x}", at)
        if target < REGION_TABLE_OFFSETS[0]:
            raise CorruptImage(self.path, f"log entry {e.sequence} writes over the headers", at)
        if target < log_span[1] and log_span[0] < target + length:
            raise CorruptImage(self.path, f"log entry {e.sequence} writes over the log itself", at)

    def _paint(self, writes: list[tuple[int, int, int, int]]) -> None:
        """Flatten ordered, possibly overlapping writes into disjoint segments (last writer wins)."""
        bounds = sorted({b for w in writes for b in w[:2]})
        writes.sort()
        heap: list[tuple[int, int, int]] = []  # (-order, end, src)
        i = 0
        for lo, hi in zip(bounds, bounds[1:]):
            while i < len(writes) and writes[i][0] <= lo:
                s, e, order, src = writes[i]
                heapq.heappush(heap, (-order, e, src))
                i += 1
            while heap and heap[0][1] <= lo:
                heapq.heappop(heap)
            if not heap:
                continue
            src = heap[0][2]
            n = len(self._src)
            # data sectors are 4 KiB each: a segment never spans two of them
            if n and src == ZERO and self._src[n - 1] == ZERO and self._ends[n - 1] == lo:
                self._ends[n - 1] = hi
                continue
            self._starts.append(lo)
            self._ends.append(hi)
            self._src.append(src)

    def info(self) -> dict[str, object]:
        out: dict[str, object] = {"log": self.state}
        if self.sequence is not None:
            out["log-entries"] = self.entries
        return out


class _Scanner:
    """Finds and validates log entries; bounded work on hostile logs."""

    def __init__(self, path: str, fd: int, h: Header) -> None:
        self.path, self.fd, self.h = path, fd, h
        self.cache: dict[int, Entry | None] = {}
        self.budget = 4 * h.log_length + (1 << 20)  # bytes we are willing to checksum

    def _read(self, pos: int, n: int) -> bytes:
        buf = bytearray(n)
        pread_exact(self.fd, self.path, memoryview(buf), self.h.log_offset + pos)
        return bytes(buf)

    def _checksum_ok(self, pos: int, length: int, head: bytes) -> bool:
        """The entry's CRC-32C, read in pieces of at most CRC_PIECE: an entry that claims
        256 MiB costs one piece of memory, not copies of the whole entry."""
        crc = crc32c(b"\0\0\0\0", crc32c(memoryview(head)[:4]))
        piece = bytearray(min(length, CRC_PIECE))
        view = memoryview(piece)
        crc = crc32c(memoryview(head)[8:], crc)
        done = len(head)
        while done < length:
            n = min(length - done, CRC_PIECE)
            pread_exact(self.fd, self.path, view[:n], self.h.log_offset + pos + done)
            crc = crc32c(view[:n], crc)
            done += n
        return crc == int.from_bytes(head[4:8], "little")

    def entry(self, pos: int) -> Entry | None:
        """The valid entry at ``pos`` of the log, or None."""
        if pos in self.cache:
            return self.cache[pos]
        e = self._parse(pos)
        self.cache[pos] = e
        return e

    def _parse(self, pos: int) -> Entry | None:
        h = self.h
        head = self._read(pos, _ENTRY.size)
        sig, _, length, tail, seq, ndesc, _, lg, flushed, last = _ENTRY.unpack(head)
        if sig != ENTRY_SIGNATURE or guid(lg) != h.log_guid:
            return None
        if length == 0 or length % LOG_SECTOR or pos + length > h.log_length:
            return None
        if tail % LOG_SECTOR or tail >= h.log_length:
            return None
        desc_area = -(-(_ENTRY.size + 32 * ndesc) // LOG_SECTOR) * LOG_SECTOR
        if desc_area > length:
            return None
        self.budget -= length
        if self.budget < 0:
            raise CorruptImage(
                self.path, "the log is too damaged to search (too many broken entries)", h.log_offset + pos
            )
        if not self._checksum_ok(pos, length, head):
            return None
        raw = self._read(pos, desc_area)  # the header and descriptors; data sectors one at a time
        e = Entry(pos, length, tail, seq, flushed, last)
        sector = pos + desc_area
        for i in range(ndesc):
            d = raw[_ENTRY.size + 32 * i : _ENTRY.size + 32 * i + 32]
            kind = d[:4]
            if kind == b"zero":
                _, _, zlen, target, dseq = _ZERO_DESC.unpack(d)
                if dseq != seq:
                    return None
                e.zeros.append((target, zlen))
            elif kind == b"desc":
                _, trailing, leading, target, dseq = _DESC.unpack(d)
                if dseq != seq:
                    return None
                rel = sector - pos
                if rel + LOG_SECTOR > length:
                    return None
                ds = self._read(sector, LOG_SECTOR)
                if (
                    ds[:4] != b"data"
                    or int.from_bytes(ds[4:8], "little") != seq >> 32
                    or int.from_bytes(ds[LOG_SECTOR - 4 :], "little") != seq & 0xFFFFFFFF
                ):
                    return None
                e.data.append((target, sector, leading + trailing.to_bytes(4, "little")))
                sector += LOG_SECTOR
            else:
                return None
        if sector != pos + length:
            return None
        return e

    def _next(self, e: Entry) -> Entry | None:
        """The entry after ``e`` in the circular log, if it continues the sequence."""
        for pos in (e.pos + e.length, 0):
            if pos >= self.h.log_length:
                continue
            n = self.entry(pos)
            if n is not None and n.sequence == e.sequence + 1:
                return n
        return None

    def active_sequence(self) -> list[Entry]:
        """The valid sequence whose head has the highest sequence number (MS-VHDX 2.3.3)."""
        found = [e for pos in range(0, self.h.log_length, LOG_SECTOR) if (e := self.entry(pos)) is not None]
        limit = self.h.log_length // LOG_SECTOR
        # every candidate head costs a walk: try the newest ones only
        for head in sorted(found, key=lambda e: e.sequence, reverse=True)[:MAX_HEADS]:
            first = self.entry(head.tail)
            if first is None or first.sequence > head.sequence:
                continue
            seq = [first]
            while seq[-1] is not head and len(seq) <= limit:
                n = self._next(seq[-1])
                if n is None or n.sequence > head.sequence:
                    break
                seq.append(n)
            if seq[-1] is head:
                self._no_newer(found, head.sequence)
                return seq
        self._no_newer(found, -1)
        return []

    def _no_newer(self, found: list[Entry], sequence: int) -> None:
        """A valid entry newer than the active sequence's head means an entry before it is
        broken: not a torn write (a torn entry is the newest one), so refuse rather than
        replay an older state over newer bytes."""
        newer = [e for e in found if e.sequence > sequence]
        if newer:
            e = min(newer, key=lambda e: e.sequence)
            raise CorruptImage(
                self.path,
                f"log entry {e.sequence} is valid but the log sequence leading to it is broken",
                self.h.log_offset + e.pos,
            )
