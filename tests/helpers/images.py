"""Files of known content: sparse raw sources, patterns, and poking bytes into a file."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

K = 1024
M = 1 << 20


def disk_usage(path: Path) -> int:
    """Bytes the file takes on the host file system (st_blocks)."""
    return os.stat(path).st_blocks * 512


def write_sparse_raw(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    """A sparse raw file of ``size`` bytes holding ``writes`` (offset, bytes)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return path


def pattern(n: int, seed: int | float) -> bytes:
    """Incompressible-ish but deterministic bytes."""
    return random.Random(seed).randbytes(n)


def scattered_raw(path: Path, size: int = 64 * M, seed: int = 1) -> Path:
    """Data runs, zero runs inside data, and a text-like (compressible) region."""
    r = random.Random(seed)
    writes = [(0, pattern(300 * K, seed))]
    for _ in range(12):
        off = r.randrange(0, size - M) & ~511
        writes.append((off, pattern(r.randrange(1, 400 * K), r.random())))
    writes.append((5 * M, pattern(64 * K, 2) + bytes(128 * K) + pattern(3 * K + 17, 3)))
    writes.append((20 * M, (b"flatfs compressible text " * 20000)[: 400 * K]))
    writes.append((size - 1000, b"\xff" * 1000))
    return write_sparse_raw(path, size, writes)


def poke(path: str | os.PathLike[str], offset: int, fmt: str, *values: int | bytes) -> None:
    """Overwrite the bytes of ``path`` at ``offset`` with ``struct.pack(fmt, *values)``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def peek(path: str | os.PathLike[str], offset: int, fmt: str) -> int:
    """The first value of ``struct.unpack(fmt, ...)`` of the bytes of ``path`` at ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
