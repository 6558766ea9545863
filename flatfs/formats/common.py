"""What several formats have in common: one bounded, thread-safe LRU cache of
decoded tables, arrays of table entries in either byte order, and the runs of
a bitmap (VHD's and VHDX's sector bitmaps).

Only formats import this module (tests/unit/test_architecture.py): a consumer
reaches a format through ``FORMATS``, never through its helpers.
"""

from __future__ import annotations

import re
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")

_BIG_HOST = sys.byteorder == "big"
_MISS = object()
_UNIFORM = re.compile(rb"\x00+|\xff+")
# the first non-zero byte of a table: one C-level scan (a table of zero entries is the common case)
NONZERO = re.compile(rb"[^\x00]")
# each byte with its bits in the other order: a most-significant-bit-first bitmap, translated
MSB_FIRST = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def le_array(typecode: str, raw: bytes | bytearray | memoryview) -> array[int]:
    """``raw`` as little-endian unsigned entries (typecode ``H``, ``I`` or ``Q``), in C-level passes."""
    a = array(typecode, raw)
    if _BIG_HOST:  # pragma: no cover
        a.byteswap()
    return a


def be_array(typecode: str, raw: bytes | bytearray | memoryview) -> array[int]:
    """``raw`` as big-endian unsigned entries (typecode ``H``, ``I`` or ``Q``), in C-level passes."""
    a = array(typecode, raw)
    if not _BIG_HOST:
        a.byteswap()
    return a


def same_until(raw: bytes, start: int, size: int) -> int:
    """The first ``size``-byte entry at or after ``start`` (an entry index) that differs from
    the one at ``start``: galloping memcmps of growing and shrinking repeats of that entry,
    a few dozen at most whatever the run's length."""
    n = len(raw) // size
    pat = raw[size * start : size * start + size]
    i, step = start + 1, 1
    while step:
        if i + step <= n and raw.startswith(pat * step, size * i):
            i += step
            step *= 2
        else:
            step //= 2
    return i


def bit_runs(bits: bytes, lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
    """(first, end, set) runs of bits [lo, hi) of a least-significant-bit-first bitmap.

    Whole 0x00/0xFF bytes go in one C-level match; neighbouring runs may share a value
    (``Runs.add`` merges them). A most-significant-bit-first bitmap: pass
    ``bits.translate(MSB_FIRST)``."""
    pos = lo
    while pos < hi:
        byte = pos >> 3
        if pos & 7 == 0:
            m = _UNIFORM.match(bits, byte)
            if m is not None:
                end = min(hi, m.end() * 8)
                yield pos, end, bits[byte] == 0xFF
                pos = end
                continue
        value = bits[byte] >> (pos & 7) & 1
        end = pos + 1
        while end < hi and end & 7 and bits[end >> 3] >> (end & 7) & 1 == value:
            end += 1
        yield pos, end, bool(value)
        pos = end


class LruCache(Generic[K, V]):
    """Decoded tables by key, least recently used dropped first; safe across reader threads.

    Bounded by ``limit`` entries and, with ``cost``, by ``budget`` (the sum of
    ``cost(value)`` over the entries), but never below ``keep`` entries. The
    work per lookup is one dictionary access under a lock: nothing per table entry.
    """

    __slots__ = ("_d", "_lock", "limit", "budget", "keep", "_cost", "used")

    def __init__(
        self,
        limit: int = sys.maxsize,
        *,
        budget: int = sys.maxsize,
        cost: Callable[[V], int] | None = None,
        keep: int = 0,
    ) -> None:
        self._d: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.limit = limit  # a layer may lower it after opening (extents sharing one budget)
        self.budget = budget
        self.keep = keep
        self._cost = cost
        self.used = 0  # sum of the entries' costs

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: D) -> V | D: ...
    def get(self, key: K, default: object = None) -> object:
        """The value under ``key`` (now the most recently used), else ``default``."""
        with self._lock:
            v = self._d.get(key, _MISS)
            if v is not _MISS:
                self._d.move_to_end(key)
                return v
        return default

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` under ``key`` unless another thread already did; drop the oldest past the bounds."""
        with self._lock:
            if key in self._d:
                return
            self._d[key] = value
            if self._cost is not None:
                self.used += self._cost(value)
            self._trim()

    def revise(self, key: K, value: V, change: Callable[[V], object]) -> None:
        """Apply ``change(value)`` under the cache's lock; if ``value`` is still the
        entry under ``key``, account for its new cost (and trim)."""
        cost = self._cost
        with self._lock:
            held = cost is not None and self._d.get(key) is value
            before = cost(value) if cost is not None and held else 0
            change(value)
            if cost is not None and held:
                self.used += cost(value) - before
                self._trim()

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.used = 0

    def __len__(self) -> int:
        return len(self._d)

    def _trim(self) -> None:
        """Drop least recently used entries past the bounds (the caller holds the lock)."""
        d = self._d
        while len(d) > self.keep and (len(d) > self.limit or self.used > self.budget):
            _, old = d.popitem(last=False)
            if self._cost is not None:
                self.used -= self._cost(old)
