"""Hypothesis mutants of VHDX images (the tests/fuzz pattern): headers, region table, metadata
table and items, BAT, sector bitmaps and the log (entries, descriptors, sequence numbers, LogGuid).

Each mutant is opened in the fuzz worker (a subprocess under a memory cap):
flatfs either fails with one line or reads the same bytes as an independent
reader of the same mutant, where that reader accepts it:

* ``dynamic``, ``fixed``: made by qemu-img; QEMU (``qemu-img convert -O raw``);
* ``logged``: a disk whose log holds unapplied entries; QEMU on a writable
  copy (it replays the log when it opens one read-write, then converts);
* ``diff``: a differencing disk over a dynamic one, written by the test
  writer; libvhdi with its parent set, its pinned deviation respected (it
  reads a ZERO block of a child from the parent; the spec says zeros, so the
  blocks whose mutated BAT entry says ZERO, UNDEFINED or UNMAPPED are zeros).

A mutation may re-seal the checksum of the structure it hit (header, region
table, log entry), so the checks behind the CRC are reached too. More
examples: FLATFS_FUZZ_EXAMPLES=500.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers.fuzz import poke
from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu
from ..helpers.vhdx_images import libvhdi_read, logged, pattern, pyvhdi, read_all
from ..helpers.vhdx_writer import (
    FULLY_PRESENT,
    NOT_PRESENT,
    PARTIALLY_PRESENT,
    UNDEFINED,
    UNMAPPED,
    ZERO,
    KiB,
    MiB,
    Parent,
    VhdxImage,
    crc32c,
)

EXAMPLES = int(os.environ.get("FLATFS_FUZZ_EXAMPLES", "150")) // 4
SIZE = 8 * MiB
INTERESTING = [0, 1, 2, 3, 6, 7, 0x1000, 0x100000, 0x7FFFFFFF, 0xFFFFFFFF]
QEMU_WRITES = ["write -P 0x11 0 64k", "write -P 0x22 2M 1M", "write -z 5M 4k", "write -P 0x33 7M 512"]


def _diff(d: Path) -> Path:
    base = VhdxImage(SIZE)
    base.write(0, pattern(0x41, 3 * MiB))
    base.write(5 * MiB, pattern(0x42, MiB))
    base.save(d / "base.vhdx")
    top = VhdxImage(SIZE, parent=Parent(base.data_write_guid, relative_path=r".\base.vhdx"))
    top.write(512 * 3, pattern(0x51, 512 * 5))  # partially present: the sector bitmap decides
    top.write(MiB + 64 * KiB, pattern(0x52, 4096))
    top.write(2 * MiB, pattern(0x53, MiB))  # fully present
    top.write(6 * MiB - 512, pattern(0x54, 1024))  # straddles two blocks
    top.save(d / "top.avhdx")
    return d / "top.avhdx"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    require(pyvhdi is not None, "libvhdi-python is not installed (pip install '.[test]')")
    q = Qemu()
    out = {}
    for name, opts in (("dynamic", "subformat=dynamic,block_size=1M"), ("fixed", "subformat=fixed")):
        d = tmp_path_factory.mktemp(name)
        img = q.create(d / "disk.vhdx", str(SIZE), fmt="vhdx", opts=opts)
        q.io(img, *QEMU_WRITES, fmt="vhdx")
        out[name] = img
    out["logged"] = logged(tmp_path_factory.mktemp("logged"))[0]
    out["diff"] = _diff(tmp_path_factory.mktemp("diff"))
    return out


def structures(data: bytes | bytearray) -> dict[str, tuple[int, int, int | None]]:
    """Where each structure of ``data`` is: (start, end, where its CRC-32C sits or None)."""
    out: dict[str, tuple[int, int, int | None]] = {
        "identifier": (0, 16, None),
        "header1": (64 * KiB, 64 * KiB + 80, 64 * KiB + 4),
        "header2": (128 * KiB, 128 * KiB + 80, 128 * KiB + 4),
    }
    count = struct.unpack_from("<I", data, 192 * KiB + 8)[0]
    out["regions"] = (192 * KiB, 192 * KiB + 16 + 32 * min(count, 4), 192 * KiB + 4)
    found = {}
    for i in range(min(count, 4)):
        g, off, length, _ = struct.unpack_from("<16sQII", data, 192 * KiB + 16 + 32 * i)
        found[g[:4]] = (off, length)
    bat_off, bat_len = found.get(bytes.fromhex("6677c22d"), (0, 0))
    meta_off, _ = found.get(bytes.fromhex("06a27c8b"), (0, 0))
    n = struct.unpack_from("<H", data, meta_off + 10)[0]
    out["metadata table"] = (meta_off, meta_off + 32 + 32 * min(n, 8), None)
    out["metadata items"] = (meta_off + 64 * KiB, meta_off + 64 * KiB + 5 * 4096, None)
    used = max(8, len(data[bat_off : bat_off + bat_len].rstrip(b"\0")))
    out["bat"] = (bat_off, bat_off + -(-used // 8) * 8, None)
    log_len, log_off = struct.unpack_from("<IQ", data, 64 * KiB + 68)
    head = data[log_off : log_off + 4]
    if head == b"loge":  # the log's entries, one after the other
        end = log_off
        while data[end : end + 4] == b"loge" and end < log_off + log_len:
            end += struct.unpack_from("<I", data, end + 8)[0]
        out["log"] = (log_off, end, None)
    return out


def reseal(data: bytearray, name: str, off: int, crc_at: int | None) -> None:
    """Make the checksum of the structure at ``off`` right again."""
    if name.startswith("header"):
        start, size = crc_at - 4, 4 * KiB  # type: ignore[operator]
    elif name == "regions":
        start, size = 192 * KiB, 64 * KiB
    elif name == "log":
        log_len, log_off = struct.unpack_from("<IQ", data, 64 * KiB + 68)
        start = log_off
        while True:  # the entry holding ``off``
            n = struct.unpack_from("<I", data, start + 8)[0]
            if n == 0 or n % 4096 or start + n > log_off + log_len or start + n > off:
                break
            start += n
        size = struct.unpack_from("<I", data, start + 8)[0]
        if size == 0 or size % 4096 or start + size > log_off + log_len:
            return
    else:
        return
    data[start + 4 : start + 8] = bytes(4)
    data[start + 4 : start + 8] = struct.pack("<I", crc32c(bytes(data[start : start + size])))


mutation = st.tuples(
    st.integers(0, 10**6),
    st.sampled_from(["byte", "bit", "u32", "u64"]),
    st.integers(0, 255),
    st.sampled_from(INTERESTING),
)


def mutate(src: Path, dst: Path, region: str, muts, fix: bool) -> str:
    data = bytearray(src.read_bytes())
    where = structures(data)
    if region not in where:  # a seed without a log, or a log without entries
        region = "bat"
    a, b, crc_at = where[region]
    for w, how, byte, value in muts:
        if how == "u64":  # shaped like a BAT entry: a state, and an offset in MiB or not
            value = value << (20 if byte & 1 else 0) | byte % 8
        off = poke(data, a + w % (b - a), how, byte, value, "<")
        if fix:
            reseal(data, region, off, crc_at)
    if region == "regions" and fix:  # both copies alike, as a writer leaves them
        data[256 * KiB : 320 * KiB] = data[192 * KiB : 256 * KiB]
    dst.write_bytes(bytes(data))
    return region


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def qemu_sha(img: Path, writable: bool) -> str | None:
    """What QEMU reads (after replaying the log on a writable copy), or None when it refuses."""
    if writable:
        copy = img.with_name("qemu-copy.vhdx")
        shutil.copy(img, copy)
        r = subprocess.run(["qemu-io", "-f", "vhdx", "-c", "read 0 512", str(copy)], capture_output=True)
        if r.returncode or b"error" in r.stdout.lower() + r.stderr.lower():
            return None
        img = copy
    out = img.with_name("qemu.raw")
    r = subprocess.run(
        ["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(img), str(out)], capture_output=True
    )
    if r.returncode:
        return None
    sha = _sha(out.read_bytes())
    out.unlink()
    return sha


def child_states(img: Path) -> list[int]:
    """The state of each payload block in the (mutated) child's BAT."""
    data = img.read_bytes()
    bat_off = structures(data)["bat"][0]
    cr = (1 << 23) * 512 // MiB
    return [struct.unpack_from("<Q", data, bat_off + 8 * (b + b // cr))[0] & 7 for b in range(SIZE // MiB)]


def libvhdi_sha(top: Path, size: int) -> str | None:
    """libvhdi's bytes of the chain, its deviations from MS-VHDX 2.5.1 undone block by block:
    a child block whose BAT state is ZERO, UNDEFINED or UNMAPPED reads zeros (libvhdi reads the
    parent), and one whose state is NOT_PRESENT reads the parent (libvhdi still reads the child's
    block when the entry keeps a file offset). test_libvhdi_deviations pins both."""
    base = top.with_name("base.vhdx")
    try:
        data = bytearray(libvhdi_read([top, base]))
        parent = libvhdi_read([base])
    except (OSError, OverflowError, ValueError, MemoryError):
        return None
    if len(data) != size or len(parent) != size:
        return None
    for b, state in enumerate(child_states(top)):
        if state in (UNDEFINED, ZERO, UNMAPPED):
            data[b * MiB : (b + 1) * MiB] = bytes(MiB)
        elif state == NOT_PRESENT:
            data[b * MiB : (b + 1) * MiB] = parent[b * MiB : (b + 1) * MiB]
    return _sha(bytes(data))


def test_libvhdi_deviations(tmp_path: Path, libvhdi) -> None:
    """What libvhdi_sha undoes: libvhdi reads a child's ZERO block from the parent, and a
    NOT_PRESENT entry that keeps a file offset from the child. MS-VHDX 2.5.1: the state decides
    (zeros; the parent). If libvhdi is fixed, this fails and the undoing can go."""
    top = _diff(tmp_path)
    base = tmp_path / "base.vhdx"
    parent = libvhdi_read([base])
    data = bytearray(top.read_bytes())
    bat = structures(data)["bat"][0]
    for block, state in ((0, NOT_PRESENT), (2, ZERO)):
        e = struct.unpack_from("<Q", data, bat + 8 * block)[0]
        assert e & 7 in (PARTIALLY_PRESENT, FULLY_PRESENT) and e >> 20
        struct.pack_into("<Q", data, bat + 8 * block, e & ~7 | state)
    top.write_bytes(bytes(data))
    got = libvhdi_read([top, base])
    flat = read_all(top)
    assert got[:MiB] != parent[:MiB] and flat[:MiB] == parent[:MiB]  # NOT_PRESENT block 0
    assert got[2 * MiB : 3 * MiB] == parent[2 * MiB : 3 * MiB]  # ZERO block 2 read from the parent ...
    assert got[2 * MiB : 3 * MiB] != bytes(MiB) and flat[2 * MiB : 3 * MiB] == bytes(MiB)  # ... not zeros


REGIONS = [
    "identifier",
    "header1",
    "header2",
    "regions",
    "metadata table",
    "metadata items",
    "bat",
    "bitmap",
    "log",
]


@pytest.mark.qemu
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(["dynamic", "fixed", "logged", "diff"]),
    region=st.sampled_from(REGIONS),
    muts=st.lists(mutation, min_size=1, max_size=3),
    fix=st.booleans(),
)
def test_vhdx_mutant(seeds, worker, tmp_path_factory, seed, region, muts, fix):
    src = seeds[seed]
    d = tmp_path_factory.mktemp("vhdxmutant")
    for f in src.parent.iterdir():
        shutil.copy(f, d / f.name)
    img = d / src.name
    if region == "bitmap":  # the differencing seed's sector bitmap block: after its payload
        region = "bat"
        if seed == "diff":
            data = bytearray(img.read_bytes())
            at = len(data) - MiB
            for w, _, byte, _ in muts:
                data[at + w % 4096] ^= 1 << (byte % 8)
            img.write_bytes(bytes(data))
            muts = []
    region = mutate(img, img, region, muts, fix) if muts else region
    res = worker.ask(img)
    assert "bug" not in res, res["bug"]
    if not res["ok"]:
        assert res["oneline"] and res["error"].startswith(str(d)), res
        return
    assert res["size"] <= 64 * 1024**4
    if res["size"] > 64 * MiB:
        return  # the worker hashes the first 64 MiB only
    want = libvhdi_sha(img, res["size"]) if seed == "diff" else qemu_sha(img, writable=seed == "logged")
    if want is not None:
        assert res["sha"] == want, f"{seed} {region} {muts} fix={fix}: flatfs reads differ from the oracle"
