"""Checks every converted TARGET of a writer format goes through (tests/convert/test_target_*.py).

The authorities are readers that are not flatfs (qemu-img, libyal, dissect);
flatfs must also read its own output identically, and the output's map must
show as data only what is data in the source.
"""

from __future__ import annotations

from pathlib import Path

from flatfs import OpenOptions, open_chain

from .chains import qemu_chain
from .needs import have_qemu, require
from .qemu import Qemu


def flat_qcow2_chain(d: Path) -> tuple[Path, Path]:
    """The suite's two-image qcow2 chain (helpers/chains.qemu_chain) and its flattening by qemu-img."""
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    q = Qemu()
    top = qemu_chain(q, d)
    return top, q.to_raw(top, d / "flat.raw")


def big_sparse_source(path: Path, data: bytes, at: int) -> Path:
    """A 1 TiB sparse raw file holding ``data`` at ``at``: the cost must follow the data."""
    with open(path, "wb") as f:
        f.truncate(1 << 40)
        f.seek(at)
        f.write(data)
    return path


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


def check_output(
    q: Qemu, expected_raw: Path, source: Path, out: Path, fmt: str, granule: int = 4096
) -> bytes:
    """qemu-img compare says ``out`` reads as ``expected_raw``; flatfs reads it the same and its
    data lies inside the source's, rounded out to ``granule`` (the host file system's 4 KiB
    blocks; a format's unit of allocation where flatfs maps no finer, a VMDK grain). Returns
    the expected bytes (for a second reader)."""
    res = q.img("compare", "-f", "raw", "-F", fmt, expected_raw, out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    want = expected_raw.read_bytes()
    assert flatfs_bytes(out, fmt) == want
    src = [(s // granule * granule, -(-e // granule) * granule) for s, e in data_ranges(source)]
    assert within(data_ranges(out, fmt), src), (data_ranges(out, fmt), src)
    return want


def convert_checked(
    q: Qemu, chain: tuple[Path, Path], out: Path, fmt: str, *args: str, granule: int = 4096
) -> tuple[Path, bytes]:
    """``flatfs convert -O fmt *args`` of a (top, flattened) chain into ``out``, checked by
    :func:`check_output`; returns (the flattened file, its bytes)."""
    from .cli import flatfs

    top, flat = chain
    flatfs("convert", "-O", fmt, *args, top, out)
    return flat, check_output(q, flat, top, out, fmt, granule)


def assert_cost_follows_data(q: Qemu, d: Path, fmt: str, *args: str) -> Path:
    """A 1 TiB source with 1 MiB of data: only that MiB is read and stored, the image says 1 TiB
    (qemu-img info), flatfs maps only that MiB as data, and ``measure`` bounds the file.
    (No qemu-img compare: some of QEMU's drivers report no block status and would read the TiB.)"""
    import json

    from .cli import flatfs
    from .images import M, pattern

    at = 700 * M
    src = big_sparse_source(d / "big.raw", pattern(M, 6), at)
    out = d / f"big.{fmt}"
    res = json.loads(flatfs("convert", "--output=json", "-O", fmt, *args, src, out).stdout)
    assert res["data-read"] == M and out.stat().st_blocks * 512 < 8 * M
    info = json.loads(q.img("info", "--output=json", "-f", fmt, out).stdout)
    assert info["virtual-size"] == 1 << 40
    assert data_ranges(out, fmt) == [(at, at + M)]
    m = json.loads(flatfs("measure", "--output=json", "-O", fmt, *args, src).stdout)
    assert m["required"] >= out.stat().st_size and m["fully-allocated"] > 1 << 40
    return out
