"""Finding parents: --search-dir for every format, the missing-parent error, deep chains."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys

import pytest

from flatfs.chain import MAX_CHAIN_DEPTH, OpenOptions, open_chain

from ..helpers.chains import deep_qcow2_chain
from ..helpers.cli import flatfs, one_line_error
from ..helpers.images import M
from ..helpers.qemu import assert_matches_qemu
from ..helpers.vmdk_oracle import create as create_vmdk

pytestmark = pytest.mark.qemu


@pytest.fixture
def moved(qemu, tmp_path):
    """base <- mid <- top in a/, with base then moved to b/; the raw reference made before."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    base = qemu.create(a / "base.qcow2", "1M")
    qemu.io(base, "write -P 7 0 64k")
    mid = qemu.create(a / "mid.qcow2", "1M", backing="base.qcow2")
    qemu.io(mid, "write -P 8 128k 64k")
    top = qemu.create(a / "top.qcow2", "1M", backing="mid.qcow2")
    ref = qemu.to_raw(top, tmp_path / "ref.raw")
    shutil.move(base, b / "base.qcow2")
    return top, b, ref


def test_missing_parent_names_what_where_and_the_ways_on(moved):
    top, b, _ = moved
    line = one_line_error(["map", top], "mid.qcow2", "'base.qcow2'", "--search-dir", "--no-backing")
    assert str(top.parent / "base.qcow2") in line


def test_info_shows_the_resolved_layers_and_the_missing_one(moved):
    top, b, _ = moved
    r = flatfs("info", top, check=False)
    assert r.returncode == 1 and "--search-dir" in r.stderr and "Traceback" not in r.stderr
    assert "[0] " + str(top) in r.stdout and "[1] " + str(top.parent / "mid.qcow2") in r.stdout
    assert "[2] MISSING: backing file 'base.qcow2'" in r.stdout
    assert str(top.parent / "base.qcow2") in r.stdout  # where it looked
    rows = json.loads(flatfs("info", "--output", "json", top, check=False).stdout)
    assert [r.get("format") for r in rows] == ["qcow2", "qcow2", None]
    assert rows[2]["looked-in"] == [str(top.parent / "base.qcow2")]


def test_search_dirs_are_tried_in_order(moved, tmp_path):
    top, b, ref = moved
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out.raw"
    flatfs("convert", "-O", "raw", "--search-dir", empty, "--search-dir", b, top, out)
    assert out.read_bytes() == ref.read_bytes()
    line = one_line_error(["map", "--search-dir", empty, top], "'base.qcow2'")
    assert str(empty / "base.qcow2") in line and str(top.parent / "base.qcow2") in line


def test_search_dir_parent_must_carry_the_recorded_identity(qemu, tmp_path):
    """A VMDK child records its parent's CID: a file of the same name in the first
    --search-dir with another CID is passed over for the right one in the second."""
    a, wrong, right = tmp_path / "a", tmp_path / "wrong", tmp_path / "right"
    for d in (a, wrong, right):
        d.mkdir()
    base = create_vmdk(qemu, a / "base.vmdk", 4 * M, "monolithicSparse")
    qemu.io(base, "write -P 5 0 64k", fmt="vmdk")
    child = create_vmdk(qemu, a / "child.vmdk", 4 * M, "monolithicSparse", backing=base)
    ref = qemu.to_raw(child, tmp_path / "ref.raw")
    create_vmdk(qemu, wrong / "base.vmdk", 4 * M, "monolithicSparse")  # another CID
    shutil.move(base, right / "base.vmdk")
    opts = OpenOptions(search_dirs=(str(wrong), str(right)))
    with open_chain(child, opts) as chain:
        assert chain.layers[1].path == str(right / "base.vmdk")
        assert chain.pread(0, 4 * M) == ref.read_bytes()
    one_line_error(["map", "--search-dir", wrong, child], "base.vmdk", "not found", str(wrong / "base.vmdk"))


def test_a_500_deep_chain_opens_maps_and_converts(qemu, tmp_path):
    names = deep_qcow2_chain(qemu, tmp_path, 500)
    top = names[-1]
    assert_matches_qemu(qemu, top, tmp_path)
    out = tmp_path / "out.qcow2"
    flatfs("convert", top, out)
    assert qemu.img("compare", top, out, cwd=tmp_path).returncode == 0
    one_line_error(["map", "--max-depth", "499", top], "deeper than 499", "--max-depth")
    with open_chain(top, OpenOptions(max_depth=500)) as chain:
        assert len(chain.layers) == 500
    assert MAX_CHAIN_DEPTH >= 1000


def test_a_deep_chain_raises_the_open_files_limit(qemu, tmp_path):
    """With a soft limit of 256 open files, 300 layers still open: flatfs raises it."""
    names = deep_qcow2_chain(qemu, tmp_path, 300)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"hard open-files limit {hard} is too low to raise")

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    r = subprocess.run(
        [sys.executable, "-m", "flatfs", "map", "--output", "json", names[-1]],
        capture_output=True,
        text=True,
        preexec_fn=low,
    )
    assert r.returncode == 0, r.stderr
    assert max(e["depth"] for e in json.loads(r.stdout)) == 299  # the base was reached
