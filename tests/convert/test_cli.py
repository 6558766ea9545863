"""The command line: quiet by default, --output=json, -p progress, sizes."""

from __future__ import annotations

import json

import pytest

from flatfs import OpenOptions, open_chain

from ..helpers.cli import flatfs
from ..helpers.images import K, M, pattern, scattered_raw, write_sparse_raw

# The keys of the --output=json summary of a qcow2 TARGET (docs/man/flatfs-convert.1, JSON SUMMARY).
SUMMARY_KEYS = {
    "copied",
    "source",
    "target",
    "format",
    "virtual-size",
    "data-read",
    "bytes-written",
    "zero-clusters-skipped",
    "granularity",
    "seconds",
    "file-size",
    "data-clusters",
    "compressed-clusters",
    "zero-clusters",
    "same-as-backing-clusters",
}


def test_quiet_by_default(tmp_path):
    src = scattered_raw(tmp_path / "src.raw", 16 * M)
    res = flatfs("convert", src, tmp_path / "out.qcow2")
    assert res.stdout == "" and res.stderr == ""


def test_json_summary(tmp_path):
    src = write_sparse_raw(
        tmp_path / "src.raw",
        32 * M,
        [(0, pattern(256 * K, 1)), (M, bytes(128 * K)), (2 * M, pattern(64 * K, 2))],
    )
    out = tmp_path / "out.qcow2"
    res = flatfs("convert", "--output=json", "-f", "raw", src, out)
    s = json.loads(res.stdout)
    assert set(s) == SUMMARY_KEYS
    assert (s["source"], s["target"], s["format"]) == (str(src), str(out), "qcow2")
    assert s["virtual-size"] == 32 * M and s["granularity"] == 64 * K
    assert s["data-read"] == 256 * K + 128 * K + 64 * K
    assert s["copied"] == 0  # only -C lets the kernel copy
    assert s["zero-clusters-skipped"] == 2  # the 128 KiB of zeros: two 64 KiB clusters
    assert s["data-clusters"] == 4 + 1
    assert (s["compressed-clusters"], s["zero-clusters"], s["same-as-backing-clusters"]) == (0, 0, 0)
    assert s["bytes-written"] >= (4 + 1) * 64 * K
    assert s["file-size"] == out.stat().st_size
    # the time taken is reported as a number; its value is never asserted (no timed assertions)
    assert isinstance(s["seconds"], float)


def test_progress_bar(tmp_path):
    src = scattered_raw(tmp_path / "src.raw", 16 * M)
    res = flatfs("convert", "-p", src, tmp_path / "out.qcow2")
    assert res.stdout == ""
    # stderr is a pipe, not a terminal: plain lines, one per 10% at most, no redraws
    lines = res.stderr.splitlines()
    assert "\r" not in res.stderr and 1 <= len(lines) <= 11, res.stderr
    assert "100.0%" in lines[-1] and "/s" in lines[-1] and "done" in lines[-1]


def test_sizes_and_sparse_granularity(tmp_path):
    # 4 KiB of zeros inside data: -S 4k leaves it a hole in a raw target, -S 0 writes it
    src = write_sparse_raw(
        tmp_path / "src.raw", 4 * M, [(0, pattern(64 * K, 1) + bytes(64 * K) + pattern(K, 2))]
    )
    a = tmp_path / "a.raw"
    b = tmp_path / "b.raw"
    flatfs("convert", "-O", "raw", "-S", "4k", src, a)
    flatfs("convert", "-O", "raw", "-S", "0", src, b)
    assert a.read_bytes() == b.read_bytes() == src.read_bytes()
    assert a.stat().st_blocks < b.stat().st_blocks
    c = tmp_path / "c.qcow2"
    flatfs("convert", "--cluster-size", "2MiB", src, c)
    with open_chain(c) as chain:
        assert chain.layers[0].info()["cluster-size"] == 2 * M


@pytest.mark.parametrize("bad", ["12q", "-1", "k"])
def test_bad_size_is_a_usage_error(tmp_path, bad):
    res = flatfs("convert", "-S", bad, "x", tmp_path / "y", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_help_mentions_every_option():
    out = flatfs("convert", "--help").stdout
    for opt in (
        "--format",
        "--target-format",
        "--sparse-size",
        "--compat",
        "--cluster-size",
        "--compress",
        "--compression-type",
        "--extended-l2",
        "--backing",
        "--backing-format",
        "--force",
        "--progress",
        "--output",
    ):
        assert opt in out, opt


def test_unaligned_raw_source_roundtrips(tmp_path):
    """A raw file whose size is not a multiple of 512 reads (like in QEMU) as rounded up to 512."""
    data = pattern(100_001, 5)
    src = tmp_path / "odd.raw"
    src.write_bytes(data)
    q = tmp_path / "odd.qcow2"
    r = tmp_path / "odd.out.raw"
    flatfs("convert", src, q)
    flatfs("convert", "-O", "raw", src, r)
    assert r.read_bytes() == data + bytes(100_352 - 100_001)
    with open_chain(q) as chain:
        assert chain.size == 100_352
        assert chain.pread(0, chain.size) == data + bytes(100_352 - 100_001)


def test_empty_source(tmp_path):
    src = tmp_path / "empty.raw"
    src.write_bytes(b"")
    out = tmp_path / "empty.qcow2"
    flatfs("convert", src, out)
    with open_chain(out, OpenOptions(format="qcow2")) as chain:
        assert chain.size == 0


def test_progress_redraws_in_place_only_on_a_terminal():
    import io

    from flatfs.convert import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, redraws in ((Terminal(), True), (io.StringIO(), False)):
        bar = Progress(100, stream, interval=0)
        for _ in range(20):
            bar.add(5)
        bar.close()
        out = stream.getvalue()
        assert ("\r" in out) == redraws
        if not redraws:
            assert [line.split("%")[0].strip() for line in out.splitlines()] == [
                f"{p}.0" for p in range(10, 101, 10)
            ]
