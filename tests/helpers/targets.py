"""Checks every converted TARGET of a writer format goes through (tests/convert/test_target_*.py).

The authorities are readers that are not flatfs (qemu-img, libyal, dissect);
flatfs must also read its own output identically, and the output's map must
show as data only what is data in the source.
"""

from __future__ import annotations

from pathlib import Path

from flatfs import OpenOptions, open_chain

from .qemu import Qemu


def data_ranges(path: Path, fmt: str | None = None) -> list[tuple[int, int]]:
    """flatfs's [start, end) ranges of ``path``'s flattened chain that must be read (DATA), merged."""
    out: list[tuple[int, int]] = []
    with open_chain(path, OpenOptions(format=fmt)) as chain:
        for e in chain.extents():
            if not e.kind.must_read:
                continue
            if out and out[-1][1] == e.start:
                out[-1] = (out[-1][0], e.start + e.length)
            else:
                out.append((e.start, e.start + e.length))
    return out


def flatfs_bytes(path: Path, fmt: str | None = None) -> bytes:
    with open_chain(path, OpenOptions(format=fmt)) as chain:
        return chain.pread(0, chain.size)


def within(inner: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    """Does every range of ``inner`` lie inside one range of ``outer`` (both ascending)?"""
    i = 0
    for s, e in inner:
        while i < len(outer) and outer[i][1] <= s:
            i += 1
        if i == len(outer) or not (outer[i][0] <= s and e <= outer[i][1]):
            return False
    return True


def check_output(q: Qemu, expected_raw: Path, source: Path, out: Path, fmt: str) -> bytes:
    """qemu-img compare says ``out`` reads as ``expected_raw``; flatfs reads it the same and its
    data lies inside the source's. Returns the expected bytes (for a second reader)."""
    res = q.img("compare", "-f", "raw", "-F", fmt, expected_raw, out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    want = expected_raw.read_bytes()
    assert flatfs_bytes(out, fmt) == want
    assert within(data_ranges(out, fmt), data_ranges(source)), (data_ranges(out, fmt), data_ranges(source))
    return want
