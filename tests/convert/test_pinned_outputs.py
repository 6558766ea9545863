"""qcow2 and raw outputs stay byte-identical across refactors of convert/.

The digests were recorded from the convert of main before convert/ was rebuilt
from sinks and writers (issue 19); a change of layout must be deliberate and
change them here. The sources are built in the test, deterministically, by
flatfs's own writers: no QEMU, so the digests do not depend on its version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from flatfs.convert import ConvertOptions, convert

from ..helpers.images import K, M, pattern, write_sparse_raw

# (name, options) -> sha256 of TARGET
PINNED = {
    "qcow2": "3261e63051502c919b198454b7d5367f63e3689bc9f8d4f385953431dce550f8",
    "qcow2-compat-0.10-4k": "502a0f662e277336048f168ddaddcad0fe572fc77f45d390e0378d04607cd302",
    "qcow2-cluster-2M": "1dbfc54a2822d32ddbf5bf8f7939a26cffdfabb5766a99f53655abebbc70b34b",
    "qcow2-extended-l2": "eb587908043cfea7d988ed41674a73c82d224975a57e83bed8a119651653aca7",
    "qcow2-zlib": "152b21327f2c01d879014330bf21bbeeb2010e766cb9fb31721edf66c619e905",
    "qcow2-sparse-0": "540ab3cf51734ba8451350fa56f5105d823e7d3241ae13e056acac83831e6aa6",
    "qcow2-over-backing": "69b5d2ee28dcb384487105c103131eb9e7cf788c5acaf914d53b5adf9f150f65",
    "raw": "80400ddeb6b0286a686d7d6466806c1b456d34ebf18d41434f3afa866ac02f0f",
    "raw-sparse-0": "80400ddeb6b0286a686d7d6466806c1b456d34ebf18d41434f3afa866ac02f0f",
    "raw-sparse-64k": "80400ddeb6b0286a686d7d6466806c1b456d34ebf18d41434f3afa866ac02f0f",
}

CASES: dict[str, ConvertOptions] = {
    "qcow2": ConvertOptions(),
    "qcow2-compat-0.10-4k": ConvertOptions(compat="0.10", cluster_size=4 * K),
    "qcow2-cluster-2M": ConvertOptions(cluster_size=2 * M),
    "qcow2-extended-l2": ConvertOptions(extended_l2=True, cluster_size=32 * K),
    "qcow2-zlib": ConvertOptions(compress=True, threads=2),
    "qcow2-sparse-0": ConvertOptions(sparse_size=0),
    "qcow2-over-backing": ConvertOptions(backing="base.raw", backing_format="raw"),
    "raw": ConvertOptions(target_format="raw"),
    "raw-sparse-0": ConvertOptions(target_format="raw", sparse_size=0),
    "raw-sparse-64k": ConvertOptions(target_format="raw", sparse_size=64 * K),
}


def _sources(d: Path) -> tuple[Path, Path]:
    """A 40 MiB sparse source (data, zeros inside data, an unaligned tail) and a backing."""
    size = 40 * M + 3 * 512
    src = write_sparse_raw(
        d / "src.raw",
        size,
        [
            (0, pattern(300 * K, 1)),
            (512 * K, bytes(192 * K) + pattern(5000, 2)),
            (3 * M + 4 * K, pattern(70 * K, 3)),
            (17 * M, pattern(2 * M + 512, 4)),
            (33 * M + 100 * 512, pattern(8 * K, 5) + bytes(64 * K) + pattern(K, 6)),
            (size - 1024, pattern(1024, 7)),
        ],
    )
    base = write_sparse_raw(
        d / "base.raw",
        size,
        [(0, pattern(300 * K, 1)), (3 * M, pattern(128 * K, 8)), (20 * M, pattern(M, 9))],
    )
    return src, base


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_is_byte_identical(tmp_path, name):
    src, _ = _sources(tmp_path)
    out = tmp_path / "out.img"
    convert(src, out, CASES[name])
    assert _sha(out) == PINNED[name]
