"""`convert -O vhdx`: dynamic and fixed VHDX, read back by qemu-img, libvhdi and dissect; the spec's
checksums and tables asserted from the bytes."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from ..helpers.cli import flatfs, one_line_error
from ..helpers.images import M, pattern, write_sparse_raw
from ..helpers.qemu import Qemu
from ..helpers.targets import assert_cost_follows_data, check_output, convert_checked
from ..helpers.vhdx_images import three_layers
from ..helpers.vhdx_writer import crc32c

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
META_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
SIZE_ITEM = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PARAMS_ITEM = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
LSS_ITEM = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")


def libvhdi(path: Path) -> bytes:
    from ..helpers.vhdx_images import libvhdi_read

    return libvhdi_read([path])


def dissect(path: Path) -> bytes:
    from dissect.hypervisor.disk.vhdx import VHDX

    with open(path, "rb") as f:
        disk = VHDX(f)
        return disk.read(disk.size)


def crc_ok(buf: bytes) -> bool:
    return struct.unpack_from("<I", buf, 4)[0] == crc32c(buf[:4] + bytes(4) + buf[8:])


def spec_facts(raw: bytes, data: bytes) -> dict[str, int]:
    """Checks every structure the spec says a reader needs, from the bytes; returns what it found."""
    assert raw[:8] == b"vhdxfile"
    for at in (64 << 10, 128 << 10):
        head = raw[at : at + 4096]
        assert head[:4] == b"head" and crc_ok(head)
        log_guid, log_version, version, log_len, log_off = struct.unpack_from("<16sHHIQ", head, 48)
        assert log_guid == bytes(16) and version == 1 and log_len % M == 0 and log_off % M == 0
    regions = {}
    for at in (192 << 10, 256 << 10):
        table = raw[at : at + (64 << 10)]
        assert table[:4] == b"regi" and crc_ok(table)
        count = struct.unpack_from("<I", table, 8)[0]
        for i in range(count):
            g, off, length, required = struct.unpack_from("<16sQII", table, 16 + 32 * i)
            assert off % M == 0 and length % M == 0 and required == 1
            regions[uuid.UUID(bytes_le=g)] = (off, length)
    moff, _ = regions[META_GUID]
    assert raw[moff : moff + 8] == b"metadata"
    items = {}
    for i in range(struct.unpack_from("<H", raw, moff + 10)[0]):
        g, off, length, _flags, _ = struct.unpack_from("<16sIIII", raw, moff + 32 + 32 * i)
        items[uuid.UUID(bytes_le=g)] = raw[moff + off : moff + off + length]
    block, flags = struct.unpack("<II", items[PARAMS_ITEM])
    size = struct.unpack("<Q", items[SIZE_ITEM])[0]
    lss = struct.unpack("<I", items[LSS_ITEM])[0]
    assert size == len(data)
    ratio = (1 << 23) * lss // block
    boff, _ = regions[BAT_GUID]
    for b in range(-(-size // block)):
        entry = struct.unpack_from("<Q", raw, boff + 8 * (b + b // ratio))[0]
        state, offset = entry & 7, (entry >> 20) << 20
        guest = data[b * block : (b + 1) * block]
        if state == 0:  # NOT_PRESENT: only where the guest reads zeros
            assert guest.count(0) == len(guest), b
        else:
            assert state == 6 and offset >= M, (b, state)  # FULLY_PRESENT, 1 MiB aligned
    return {"block": block, "flags": flags, "lss": lss}


@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_qcow2_chain_to_vhdx(tmp_path, qemu: Qemu, qcow2_chain, sub):
    out = tmp_path / "out.vhdx"
    _, want = convert_checked(qemu, qcow2_chain, out, "vhdx", "-o", f"subformat={sub}")
    assert "No errors" in qemu.img("check", "-f", "vhdx", out).stdout
    assert libvhdi(out) == want and dissect(out) == want
    facts = spec_facts(out.read_bytes(), want)
    assert facts == {"block": 32 * M, "flags": 1 if sub == "fixed" else 0, "lss": 512}


def test_hyperv_checkpoint_chain_to_vhdx(tmp_path, qemu: Qemu):
    # an .avhdx chain QEMU refuses to read; its flattened copy is one VHDX everyone reads
    top, _paths, model = three_layers(tmp_path)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(bytes(model.data))
    out = tmp_path / "flat.vhdx"
    flatfs("convert", "-O", "vhdx", "-o", "block_size=1M", top, out)
    want = check_output(qemu, expected, top, out, "vhdx")
    assert libvhdi(out) == want and dissect(out) == want
    assert spec_facts(out.read_bytes(), want)["block"] == M


def test_4096_byte_logical_sectors(tmp_path, qemu: Qemu):
    size = 6 * M + 4096
    src = write_sparse_raw(
        tmp_path / "src.raw", size, [(M, pattern(8192, 4)), (size - 4096, pattern(4096, 5))]
    )
    out = tmp_path / "out.vhdx"
    flatfs("convert", "-O", "vhdx", "-o", "logical_sector_size=4096,block_size=2M", src, out)
    want = src.read_bytes()
    assert libvhdi(out) == want and dissect(out) == want
    assert spec_facts(out.read_bytes(), want) == {"block": 2 * M, "flags": 0, "lss": 4096}
    # QEMU opens only 512-byte logical sectors: recorded, so the docs stay true
    assert qemu.img("info", "-f", "vhdx", out, check=False).returncode != 0


def test_cost_grows_with_data_not_size(tmp_path, qemu: Qemu):
    assert_cost_follows_data(qemu, tmp_path, "vhdx")


@pytest.mark.parametrize(
    "opt, words",
    [
        ("block_size=3M", "-o block_size"),
        ("logical_sector_size=1024", "-o logical_sector_size"),
        ("x=1", "-o x"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, opt, words):
    src = write_sparse_raw(tmp_path / "src.raw", M, [(0, pattern(4096, 1))])
    one_line_error(["convert", "-O", "vhdx", "-o", opt, src, tmp_path / "o.vhdx"], words, status=2)
    one_line_error(["measure", "-O", "vhdx", "-o", opt, src], words, status=2)
