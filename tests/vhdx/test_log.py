"""A VHDX whose log holds entries never applied: flatfs replays them in memory, never writing.

Oracles: the content the test wrote, and QEMU, which replays the log when it
opens a writable copy (and refuses a read-only open of the original).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from flatfs import open_chain
from flatfs.errors import CorruptImage

from ..helpers.cli import flatfs
from ..helpers.qemu import Qemu
from ..helpers.vhdx_images import Model, first_difference, pattern, read_all
from ..helpers.vhdx_writer import BAT_OFFSET, Log, MiB, VhdxImage


def logged(d: Path, *, old_entries: int = 1) -> tuple[Path, Model, VhdxImage]:
    m = Model(8 * MiB)
    img = VhdxImage(8 * MiB)
    m.write(img, 0, pattern(0x51, MiB))
    m.write(img, 3 * MiB, pattern(0x52, 2 * MiB))
    img.save(d / "scratch.vhdx")  # to learn where blocks land
    b3 = img.block_offsets[3]
    b4 = img.block_offsets[4]
    m.write(img, 4 * MiB + 8192, bytes(8192))  # zeros the log will restore
    log = Log(
        sectors=[BAT_OFFSET, b3 + 4096, 2 * MiB + 64 * 1024],  # the BAT, payload, metadata table
        zeros=[(b4 + 8192, 8192)],
        old_entries=old_entries,
    )
    img.save(d / "log.vhdx", log=log)
    (d / "scratch.vhdx").unlink()
    return d / "log.vhdx", m, img


def test_replayed_in_memory(tmp_path: Path) -> None:
    path, m, _ = logged(tmp_path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert first_difference(read_all(path), bytes(m.data)) is None
    with open_chain(path) as chain:
        info = chain.layers[0].info()
    assert info["log"] == "replayed" and info["log-entries"] == 4
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # never written


def test_qemu_replays_a_writable_copy_the_same_way(tmp_path: Path, qemu: Qemu) -> None:
    path, m, _ = logged(tmp_path)
    r = qemu.img("convert", "-O", "raw", path, tmp_path / "ro.raw", check=False)
    assert r.returncode != 0 and "log that needs to be replayed" in r.stderr, r.stderr
    copy = tmp_path / "copy.vhdx"
    shutil.copy(path, copy)
    qemu.io(copy, "read 0 512", fmt="vhdx")  # a writable open replays the log
    ref = qemu.to_raw(copy, tmp_path / "ref.raw").read_bytes()
    assert first_difference(ref, bytes(m.data)) is None
    assert first_difference(read_all(path), ref) is None


def test_without_the_log_the_stale_bytes_show(tmp_path: Path) -> None:
    """The test can fail: the file alone holds stale bytes where the log has the new ones."""
    path, m, _ = logged(tmp_path)
    data = bytearray(path.read_bytes())
    data[64 * 1024 + 48 : 64 * 1024 + 64] = bytes(16)  # LogGuid of header 1 ...
    data[128 * 1024 + 48 : 128 * 1024 + 64] = bytes(16)  # ... and 2 (their CRCs now fail)
    (tmp_path / "nolog.vhdx").write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="header"):
        read_all(tmp_path / "nolog.vhdx")


def test_a_broken_entry_ends_the_sequence(tmp_path: Path) -> None:
    path, _, _ = logged(tmp_path, old_entries=0)
    data = bytearray(path.read_bytes())
    data[MiB + 4096 * 2 + 100] ^= 0xFF  # inside the first entry: its CRC fails
    (tmp_path / "b.vhdx").write_bytes(bytes(data))
    r = flatfs("info", tmp_path / "b.vhdx", check=False)
    # the tail entry is gone, so no valid sequence remains: the stale BAT shows, or an error
    assert r.returncode in (0, 1)
    assert "Traceback" not in r.stderr
