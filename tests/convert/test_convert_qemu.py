"""flatfs convert checked against QEMU: qemu-img check, qemu-img compare, disk usage."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..helpers.chains import qemu_chain
from ..helpers.cli import flatfs
from ..helpers.images import M, disk_usage, scattered_raw
from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu, assert_valid_copy, qemu_info

# (flatfs convert options, the equivalent qemu-img convert options)
MATRIX = {
    "default": ([], []),
    "zlib": (["-c"], ["-c"]),
    "zstd": (["-c", "--compression-type", "zstd"], ["-c", "-o", "compression_type=zstd"]),
    "compat-0.10": (["--compat", "0.10"], ["-o", "compat=0.10"]),
    "cluster-512": (["--cluster-size", "512"], ["-o", "cluster_size=512"]),
    "cluster-2M": (["--cluster-size", "2M"], ["-o", "cluster_size=2M"]),
    "extended-l2": (["--extended-l2"], ["-o", "extended_l2=on"]),
    "extended-l2-16k-zlib": (
        ["--extended-l2", "--cluster-size", "16k", "-c"],
        ["-c", "-o", "extended_l2=on,cluster_size=16k"],
    ),
    "compat-0.10-zlib-4k": (
        ["--compat", "0.10", "--cluster-size", "4k", "-c"],
        ["-c", "-o", "compat=0.10,cluster_size=4k"],
    ),
    "sparse-0": (["-S", "0"], ["-S", "0"]),
    "raw": (["-O", "raw"], ["-O", "raw"]),
    "raw-sparse-0": (["-O", "raw", "-S", "0"], ["-O", "raw"]),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    d = tmp_path_factory.mktemp("sources")
    return {"raw": scattered_raw(d / "scattered.raw"), "chain": qemu_chain(Qemu(), d)}


@pytest.mark.qemu
@pytest.mark.parametrize("source_kind", ["raw", "chain"])
@pytest.mark.parametrize("name", list(MATRIX))
def test_matrix(qemu, sources, tmp_path, name, source_kind):
    ours, theirs = MATRIX[name]
    src = sources[source_kind]
    fmt = "raw" if "raw" in ours else "qcow2"
    out = tmp_path / f"out.{fmt}"
    flatfs("convert", *ours, src, out)
    assert_valid_copy(qemu, src, out, fmt)
    ref = tmp_path / f"ref.{fmt}"
    if "-O" not in theirs:
        theirs = ["-O", "qcow2", *theirs]
    qemu.img("convert", *theirs, src, ref)
    assert disk_usage(out) <= disk_usage(ref) * 1.1, (disk_usage(out), disk_usage(ref))
    if fmt == "qcow2":
        meta = qemu_info(qemu, out)
        want_cs = {"cluster-512": 512, "cluster-2M": 2 * M}.get(name)
        if want_cs:
            assert meta["cluster-size"] == want_cs
        spec = meta["format-specific"]["data"]
        assert spec["compat"] == ("0.10" if "0.10" in ours else "1.1")
        if "--extended-l2" in ours:
            assert spec["extended-l2"] is True
        if "zstd" in ours:
            assert spec["compression-type"] == "zstd"


@pytest.mark.qemu
def test_raw_target_is_sparse(qemu, sources, tmp_path):
    src = sources["chain"]
    out = tmp_path / "flat.raw"
    flatfs("convert", "-O", "raw", src, out)
    assert out.stat().st_size == 48 * M
    data = sum(e["length"] for e in qemu.map(src) if e["data"] and not e["zero"])
    # no more allocated than the data (plus file system block rounding)
    assert disk_usage(out) <= data + 64 * 1024


# -- deltas over a new base (-B) --------------------------------------------------


@pytest.fixture
def delta_setup(qemu, tmp_path):
    """base.qcow2 and a changed copy of its content as a raw file."""
    base_raw = scattered_raw(tmp_path / "base.raw", 32 * M, seed=7)
    base = tmp_path / "base.qcow2"
    flatfs("convert", base_raw, base)
    changed = tmp_path / "changed.raw"
    changed.write_bytes(base_raw.read_bytes())
    with open(changed, "r+b") as f:
        f.seek(0)
        f.write(bytes(64 * 1024))  # zeros over base data
        f.seek(3 * M + 100)
        f.write(b"changed!" * 1000)  # a partial change
        f.seek(31 * M)
        f.write(b"\x07" * (M // 2))  # new data where the base has none
    return base_raw, base, changed


@pytest.mark.qemu
@pytest.mark.parametrize(
    "extra",
    [[], ["--compat", "0.10"], ["--extended-l2"], ["-c"], ["--cluster-size", "512"], ["-S", "0"]],
    ids=["default", "compat-0.10", "extended-l2", "zlib", "cluster-512", "sparse-0"],
)
def test_backing_delta(qemu, tmp_path, delta_setup, extra):
    _, base, changed = delta_setup
    out = tmp_path / "delta.qcow2"
    flatfs("convert", *extra, "-B", "base.qcow2", "-F", "qcow2", changed, out)
    assert_valid_copy(qemu, changed, out, backing=True, source_fmt="raw")
    meta = qemu_info(qemu, out)
    assert meta["backing-filename"] == "base.qcow2"
    assert meta["backing-filename-format"] == "qcow2"
    ref = tmp_path / "ref.qcow2"
    qopts = {"--compat": "compat", "--cluster-size": "cluster_size"}
    theirs = ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"]
    if "-c" in extra:
        theirs.append("-c")
    if "--extended-l2" in extra:
        theirs += ["-o", "extended_l2=on"]
    if "-S" in extra:
        theirs += ["-S", "0"]
    for k, v in zip(extra, extra[1:]):
        if k in qopts:
            theirs += ["-o", f"{qopts[k]}={v}"]
    qemu.img("convert", *theirs, changed, ref, cwd=tmp_path)
    assert disk_usage(out) <= disk_usage(ref) * 1.1, (disk_usage(out), disk_usage(ref))
    # far less than a full copy: only what changed is stored
    full = tmp_path / "full.qcow2"
    flatfs("convert", *extra, changed, full)
    assert disk_usage(out) < disk_usage(full) / 2


@pytest.mark.qemu
def test_backing_name_stored_as_given(qemu, tmp_path, delta_setup):
    """Relative names resolve against TARGET's folder and are stored verbatim."""
    _, base, changed = delta_setup
    sub = tmp_path / "overlays"
    sub.mkdir()
    out = sub / "delta.qcow2"
    flatfs("convert", "-B", "../base.qcow2", changed, out)  # -F probed: qcow2
    meta = qemu_info(qemu, out)
    assert meta["backing-filename"] == "../base.qcow2"
    assert meta["backing-filename-format"] == "qcow2"
    assert_valid_copy(qemu, changed, out, backing=True, source_fmt="raw")
    out2 = tmp_path / "abs.qcow2"
    flatfs("convert", "-B", str(base), changed, out2)
    assert qemu_info(qemu, out2)["backing-filename"] == str(base)
    assert_valid_copy(qemu, changed, out2, backing=True, source_fmt="raw")


@pytest.mark.qemu
def test_backing_raw_and_chain_source(qemu, tmp_path):
    """A qcow2 chain as SOURCE, a raw BACKING: only differing clusters are stored."""
    top = qemu_chain(qemu, tmp_path)
    flat = tmp_path / "flat.raw"
    qemu.to_raw(top, flat)
    with open(flat, "r+b") as f:  # the new base differs a little from the chain
        f.seek(M)
        f.write(b"\x99" * 8192)
    out = tmp_path / "delta.qcow2"
    flatfs("convert", "-B", "flat.raw", "-F", "raw", top, out)
    assert qemu_info(qemu, out)["backing-filename-format"] == "raw"
    assert_valid_copy(qemu, top, out, backing=True)
    assert disk_usage(out) < 1 * M


@pytest.mark.qemu
def test_backing_shorter_than_source(qemu, tmp_path):
    small = tmp_path / "small.qcow2"
    qemu.create(small, 4 * M)
    qemu.io(small, "write -P 1 0 4M")
    src = tmp_path / "src.qcow2"
    qemu.create(src, 16 * M, backing=small.name, backing_fmt="qcow2")
    qemu.io(src, "write -P 2 3M 2M", "write -P 3 10M 64k")
    out = tmp_path / "delta.qcow2"
    flatfs("convert", "-B", "small.qcow2", src, out)
    assert_valid_copy(qemu, src, out, backing=True)


# -- sources using each qcow2 feature the reader supports ------------------------------

WRITES = [
    "write -P 0x21 0 1M",
    "write -P 0x22 3M 4k",
    "write -z 3M 64k",
    "write -P 0x23 5M 12k",
    "write -c -P 0x24 6M 256k",
    "write -P 0 7M 64k",
    "discard 0 64k",
]
FEATURES = {
    "compat-0.10": "compat=0.10",
    "cluster-512": "cluster_size=512",
    "cluster-2M": "cluster_size=2M",
    "extended-l2": "extended_l2=on",
    "zstd": "compression_type=zstd",
    "data-file": "data_file={dir}/src.data",
    "data-file-raw": "data_file={dir}/src.data,data_file_raw=on",
    "prealloc-metadata": "preallocation=metadata",
    "prealloc-falloc": "preallocation=falloc",
    "lazy-refcounts": "lazy_refcounts=on",
    "refcount-1": "refcount_bits=1",
    "refcount-64": "refcount_bits=64",
}


@pytest.mark.qemu
@pytest.mark.parametrize("feature", list(FEATURES))
def test_source_features(qemu, tmp_path, feature):
    src = tmp_path / "src.qcow2"
    qemu.create(src, 8 * M, opts=FEATURES[feature].format(dir=tmp_path))
    writes = WRITES
    if feature in ("data-file", "data-file-raw", "compat-0.10", "cluster-2M") or "prealloc" in feature:
        # qemu-io cannot compress there (data file, preallocated or unaligned clusters)
        writes = [w for w in WRITES if "-c" not in w]
    if feature == "compat-0.10":
        writes = [w for w in writes if "-z" not in w and "discard" not in w]
    qemu.io(src, *writes)
    for args, fmt in (([], "qcow2"), (["-O", "raw"], "raw")):
        out = tmp_path / f"out.{fmt}"
        flatfs("convert", *args, src, out)
        assert_valid_copy(qemu, src, out, fmt)
        ref = tmp_path / f"ref.{fmt}"
        qemu.img("convert", "-O", fmt, src, ref)
        assert disk_usage(out) <= disk_usage(ref) * 1.1, (feature, fmt, disk_usage(out), disk_usage(ref))


@pytest.mark.qemu
def test_raw_backing_and_short_backing_source(qemu, tmp_path):
    base = tmp_path / "base.raw"
    qemu.create(base, 3 * M, fmt="raw")
    qemu.io(base, "write -P 0x31 0 3M", fmt="raw")
    src = tmp_path / "src.qcow2"
    qemu.create(src, 8 * M, backing=base.name, backing_fmt="raw")
    qemu.io(src, "write -P 0x32 2M 2M", "write -z 0 64k")
    out = tmp_path / "out.qcow2"
    flatfs("convert", src, out)
    assert_valid_copy(qemu, src, out)
