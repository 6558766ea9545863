"""Hand-broken VHDX logs through the CLI, and what QEMU 7.2 does with the same files.

The seed is tests/helpers/vhdx_images.logged(): four unapplied entries (the
BAT, a payload sector, the metadata items, a zeroed range) over a file that
holds stale bytes there. MS-VHDX 2.3: a valid entry has its signature, CRC-32C,
the header's LogGuid, a 4 KiB aligned length and tail inside the log, and
descriptors and data sectors carrying its sequence number; the active
sequence is the valid one with the newest head, each entry one more than the
last, the head's tail pointing at its first entry.

* A torn newest entry (the crash case the log exists for) is not an error:
  the sequence before it is replayed, as QEMU does.
* A broken entry with valid newer ones after it is damage, not a torn write:
  flatfs refuses (QEMU also fails to open these, for the stale bytes).
* A LogGuid whose log holds no valid entry: the file is read as it is (QEMU
  does the same); the error about the stale bytes says so.

QEMU is asked through ``qemu-io`` on a writable copy (a read-only open of a
log needing replay is always refused). Each case: ``flatfs convert`` exits 1
with one line and leaves no output file.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers.cli import ONE_LINE, flatfs
from ..helpers.qemu import Qemu
from ..helpers.vhdx_images import first_difference, logged, read_all
from ..helpers.vhdx_writer import LOG_OFFSET, KiB, MiB, crc32c, with_crc


def entries(data: bytearray) -> list[tuple[int, int]]:
    """(file offset, length) of each entry of the seed's active sequence (1000..1003; the
    entry of an older, applied sequence before them is left out)."""
    out, pos = [], LOG_OFFSET
    while data[pos : pos + 4] == b"loge":
        n = struct.unpack_from("<I", data, pos + 8)[0]
        out.append((pos, n))
        pos += n
    return out[1:]


def reseal(data: bytearray, entry: tuple[int, int]) -> None:
    pos, n = entry
    data[pos + 4 : pos + 8] = bytes(4)
    data[pos + 4 : pos + 8] = struct.pack("<I", crc32c(bytes(data[pos : pos + n])))


def headers(data: bytearray, fn: Callable[[bytearray], object]) -> None:
    for at in (64 * KiB, 128 * KiB):
        h = bytearray(data[at : at + 4 * KiB])
        fn(h)
        data[at : at + 4 * KiB] = with_crc(h)


def field(entry_no: int, at: int, fmt: str, value: int) -> Callable[[bytearray], None]:
    """Set a field of one entry (``at`` bytes into it) and keep the entry's CRC right."""

    def edit(data: bytearray) -> None:
        e = entries(data)[entry_no]
        struct.pack_into(fmt, data, e[0] + at, value)
        reseal(data, e)

    return edit


def crc(entry_no: int) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        data[entries(data)[entry_no][0] + 200] ^= 1

    return edit


def data_sector_seq(data: bytearray) -> None:
    e = entries(data)[0]
    data[e[0] + 4096 + 4 : e[0] + 4096 + 8] = b"\7\0\0\0"  # its sequence number's high half
    reseal(data, e)


# name -> (edit, words of flatfs's error, what QEMU does with a writable copy)
#   "refuses": qemu-io fails to open it; "reads": QEMU opens it (and replays what it can)
CASES: dict[str, tuple[Callable[[bytearray], object], str, str]] = {
    "entry-crc": (crc(0), "log entry 1001 is valid but the log sequence leading to it is broken", "refuses"),
    "middle-entry-crc": (crc(1), "log entry 1002 is valid but the log sequence", "refuses"),
    "descriptor-sequence": (field(0, 64 + 24, "<Q", 12345), "log entry 1001 is valid but", "refuses"),
    "data-sector-sequence": (data_sector_seq, "log entry 1001 is valid but", "refuses"),
    "entry-sequence-gap": (field(1, 16, "<Q", 5000), "log entry 1002 is valid but", "refuses"),
    "log-guid-no-valid-entry": (
        lambda d: headers(d, lambda h: h.__setitem__(slice(48, 64), uuid.uuid4().bytes_le)),
        "the header names a log, but it holds no valid entry",
        "refuses",
    ),
    "log-guid-empty-log": (
        lambda d: d.__setitem__(slice(LOG_OFFSET, LOG_OFFSET + MiB), bytes(MiB)),
        "the header names a log, but it holds no valid entry",
        "refuses",
    ),
    "log-guid-without-log": (
        lambda d: headers(d, lambda h: struct.pack_into("<IQ", h, 68, 0, 0)),
        "header has a LogGuid but no log",
        "refuses",
    ),
    # MS-VHDX: the headers are never updated through the log. QEMU replays such an entry
    # (onto header 1, or into the log itself) and opens the file; flatfs refuses.
    "entry-over-headers": (
        field(0, 64 + 16, "<Q", 64 * KiB),
        "log entry 1000 writes over the headers",
        "reads",
    ),
    "entry-over-log": (
        field(0, 64 + 16, "<Q", LOG_OFFSET + 64 * KiB),
        "writes over the log itself",
        "reads",
    ),
    "entry-misaligned-target": (field(0, 64 + 16, "<Q", 3 * MiB + 512), "misaligned target", "refuses"),
    "zero-descriptor-misaligned": (field(3, 64 + 8, "<Q", 1000), "misaligned target", "refuses"),
    "log-longer-than-file": (
        lambda d: headers(d, lambda h: struct.pack_into("<IQ", h, 68, 1 << 30, MiB)),
        "lies outside the file",
        "refuses",
    ),
    "log-over-headers": (
        lambda d: headers(d, lambda h: struct.pack_into("<IQ", h, 68, MiB, 0)),
        "over its headers",
        "refuses",
    ),
    "log-misaligned": (
        lambda d: headers(d, lambda h: struct.pack_into("<IQ", h, 68, MiB, MiB + 4096)),
        "not a multiple of 1 MiB",
        "refuses",
    ),
    "flushed-offset-past-end": (
        lambda d: [field(i, 48, "<Q", 8 * MiB)(d) for i in range(4)],
        "the log says the file was 0x800000 bytes long",
        "refuses",
    ),
    "log-version": (
        lambda d: headers(d, lambda h: struct.pack_into("<H", h, 64, 1)),
        "log version 1",
        "refuses",
    ),
    # MS-VHDX: Tail is a multiple of 4 KiB. QEMU does not check it and replays the four entries;
    # for flatfs they are not valid, the older sequence is the active one and the stale bytes show.
    "tail-misaligned": (lambda d: [field(i, 12, "<I", 5)(d) for i in range(4)], "block size", "reads"),
}


def _make(tmp_path: Path, name: str) -> tuple[Path, bytes]:
    src, model, _ = logged(tmp_path)
    data = bytearray(src.read_bytes())
    CASES[name][0](data)
    img = tmp_path / f"{name}.vhdx"
    img.write_bytes(bytes(data))
    return img, bytes(model.data)


def qemu_opens(img: Path) -> bool:
    """Does QEMU open a writable copy (replaying its log)?"""
    copy = img.with_name("qemu-copy.vhdx")
    shutil.copy(img, copy)
    r = subprocess.run(
        ["qemu-io", "-f", "vhdx", "-c", "read 0 512", str(copy)], capture_output=True, text=True
    )
    return r.returncode == 0 and "error" not in (r.stdout + r.stderr).lower()


@pytest.mark.qemu
@pytest.mark.parametrize("name", list(CASES))
def test_broken_log_is_one_line(tmp_path: Path, name: str, qemu: Qemu) -> None:
    img, _ = _make(tmp_path, name)
    out = tmp_path / "out.qcow2"
    r = flatfs("convert", "-O", "qcow2", img, out, check=False)
    assert r.returncode == 1 and ONE_LINE(r.stderr), r.stderr
    assert CASES[name][1] in r.stderr and str(img) in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob("*.qcow2*")), "convert left an output file"
    assert qemu_opens(img) == (CASES[name][2] == "reads"), "QEMU's behaviour changed: update qemu-compat.md"


@pytest.mark.qemu
@pytest.mark.parametrize("at", ["newest-entry-crc", "newest-entry-length"])
def test_a_torn_newest_entry_is_left_out_as_qemu_does(tmp_path: Path, at: str, qemu: Qemu) -> None:
    """The crash the log exists for: the newest entry did not reach the disk whole. Both replay
    the three entries before it; the zeroed range of the fourth keeps its stale bytes."""
    src, model, _ = logged(tmp_path)
    data = bytearray(src.read_bytes())
    if at == "newest-entry-crc":
        crc(3)(data)
    else:
        field(3, 8, "<I", 2 * MiB)(data)  # longer than the log
    img = tmp_path / "torn.vhdx"
    img.write_bytes(bytes(data))
    got = read_all(img)
    assert first_difference(got, bytes(model.data)) is not None  # the fourth entry is not replayed
    copy = tmp_path / "copy.vhdx"
    shutil.copy(img, copy)
    qemu.io(copy, "read 0 512", fmt="vhdx")
    ref = qemu.to_raw(copy, tmp_path / "ref.raw").read_bytes()
    assert first_difference(got, ref) is None
