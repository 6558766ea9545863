"""The copy-offload (-C) and in-place (-n) outputs stay byte-identical across the move onto sinks.

test_pinned_outputs.py pins the new files of qcow2 and raw; these pin what
the sinks of ``-C`` and ``-n`` make: the digests were recorded from main's
convert before qcow2 and raw moved onto writers over sinks (issue 19). An
in-place target is a file of known bytes: its whole content is pinned (the
image, the zeroed gaps, and the old bytes past the image, which stay).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from flatfs.convert import ConvertOptions, convert

from ..helpers.images import K, M, pattern, scattered_raw

# name -> (options, the existing target's size for -n (None: a new file), sha256 of TARGET)
CASES: dict[str, tuple[ConvertOptions, int | None, str]] = {
    "qcow2-C": (
        ConvertOptions(copy_offload=True),
        None,
        "cf33061fe672b1a402a637cdb41adae7efe244900bea2fca7b789069538cf0fc",
    ),
    "qcow2-C-extended-l2": (
        ConvertOptions(copy_offload=True, extended_l2=True, cluster_size=32 * K),
        None,
        "3060909cd23defbdd84eba06a8bc5c6bb64efc3e84a33aab2ad20a7772d96878",
    ),
    "qcow2-C-from-compressed": (
        ConvertOptions(copy_offload=True),
        None,
        "45e0c303fa8d1995ae65b6c38d1f5c5f7f0084c6aeae18b2d93abb3f401484ec",
    ),
    "raw-C": (
        ConvertOptions(target_format="raw", copy_offload=True),
        None,
        "c146154267ecc49504c963fc3cfbc3853b512612f5f4993962e373e61cfe36c7",
    ),
    "raw-C-from-compressed": (
        ConvertOptions(target_format="raw", copy_offload=True),
        None,
        "c146154267ecc49504c963fc3cfbc3853b512612f5f4993962e373e61cfe36c7",
    ),
    "raw-n": (
        ConvertOptions(target_format="raw", no_create=True),
        28 * M,
        "5cf1ed9b49c593ea2fc18f940911d19f61622463659b8b6826c49e9888dce903",
    ),
    "raw-n-S0": (
        ConvertOptions(target_format="raw", no_create=True, sparse_size=0),
        28 * M,
        "5cf1ed9b49c593ea2fc18f940911d19f61622463659b8b6826c49e9888dce903",
    ),
    "raw-n-C-from-compressed": (
        ConvertOptions(target_format="raw", no_create=True, copy_offload=True),
        28 * M,
        "5cf1ed9b49c593ea2fc18f940911d19f61622463659b8b6826c49e9888dce903",
    ),
    "raw-n-target-is-zero": (
        ConvertOptions(target_format="raw", no_create=True, target_is_zero=True),
        28 * M,
        "fefee82a910be6bc7fe1c46165ecb52bd7221b15efe3304d166c0c9e73ad4f19",
    ),
    "qcow2-n": (
        ConvertOptions(no_create=True),
        28 * M,
        "eb955c74e5b0b2a0de0bb83a877f96a3b583d8fa040fa63b3de0f9b55980e6b1",
    ),
    "qcow2-n-zlib": (
        ConvertOptions(no_create=True, compress=True, threads=2),
        28 * M,
        "2bfe2790727d1b70e5e20507a859f2004233fae0e7118dd91dfaca6055aa6ed8",
    ),
    "qcow2-n-C": (
        ConvertOptions(no_create=True, copy_offload=True),
        28 * M,
        "8236eb4707c8d652e7da0be67a6bae4c2bee9c4d7429c99d01b74bc3f902b211",
    ),
    "qcow2-n-C-from-compressed": (
        ConvertOptions(no_create=True, copy_offload=True),
        28 * M,
        "eb955c74e5b0b2a0de0bb83a877f96a3b583d8fa040fa63b3de0f9b55980e6b1",
    ),
}


def _sources(d: Path) -> tuple[Path, Path]:
    """A sparse raw source and a compressed qcow2 of it (whose clusters copy offload cannot map)."""
    raw = scattered_raw(d / "src.raw", 24 * M, seed=3)
    comp = d / "src.qcow2"
    convert(raw, comp, ConvertOptions(compress=True, threads=2, cluster_size=16 * K))
    return raw, comp


@pytest.mark.parametrize("name", sorted(CASES))
def test_sink_output_is_byte_identical(tmp_path, name):
    raw, comp = _sources(tmp_path)
    opts, existing, digest = CASES[name]
    src = comp if name.endswith("-from-compressed") else raw
    out = tmp_path / "out.img"
    if existing is not None:
        out.write_bytes(pattern(existing, 11))
    convert(src, out, opts)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
