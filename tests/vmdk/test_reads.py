"""The read path of compressed grains: each grain inflated once per thread however a read
cuts it, the same bytes from many threads, and zlib (the fallback) reading what ISA-L reads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from flatfs import open_chain
from flatfs.formats.vmdk import layer as vmdk_layer

from ..helpers.vmdk_oracle import write_stream_vmdk

K = 1024
G = 65536  # grain


def _disk(d: Path) -> tuple[Path, bytes]:
    grains = {i: bytes([i % 251 + 1]) * (G // 2) + bytes(range(256)) * (G // 512) for i in range(0, 40, 3)}
    img = d / "s.vmdk"
    write_stream_vmdk(img, 40 * G, grains)
    ref = bytearray(40 * G)
    for i, b in grains.items():
        ref[i * G : i * G + len(b)] = b
    return img, bytes(ref)


class _Counting:
    """Stands in for the inflate module, counting the decompressors made."""

    def __init__(self, real: Any) -> None:
        self.real, self.made, self.error = real, 0, real.error

    def decompressobj(self) -> Any:
        self.made += 1
        return self.real.decompressobj()


def test_a_grain_read_in_pieces_is_inflated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img, ref = _disk(tmp_path)
    counting = _Counting(vmdk_layer._inflate)
    monkeypatch.setattr(vmdk_layer, "_inflate", counting)
    with open_chain(img) as chain:
        got = bytearray()
        for off in range(3 * G, 4 * G, 4 * K):  # one grain, in sixteen 4 KiB reads
            got += chain.pread(off, 4 * K)
        assert bytes(got) == ref[3 * G : 4 * G]
        assert counting.made == 1
        # a read across two grains, cut mid-grain as convert's pieces may be
        buf = memoryview(bytearray(G))
        chain.read_data(0, 6 * G + G // 2, buf[: G // 2])
        chain.read_data(0, 7 * G, buf[G // 2 :])
        assert bytes(buf) == ref[6 * G + G // 2 : 7 * G + G // 2]
        assert counting.made == 2  # grain 6 (grain 7 holds nothing: absent)


def test_many_threads_read_the_same_bytes(tmp_path: Path) -> None:
    img, ref = _disk(tmp_path)
    with open_chain(img) as chain:

        def read(i: int) -> bytes:
            off = (i * 7919 * 512) % (len(ref) - 100 * K)
            return chain.pread(off, 100 * K)

        with ThreadPoolExecutor(4) as pool:
            for i, got in enumerate(pool.map(read, range(200))):
                off = (i * 7919 * 512) % (len(ref) - 100 * K)
                assert got == ref[off : off + 100 * K], i
