"""Differencing VDI chains (VirtualBox snapshots), written by the test writer.

Two oracles: the composition each test wrote, and dissect.hypervisor's VDI
reader given the parent. The parent is found through a generated ``.vbox``
registry, or without one by scanning for its uuidCreate.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from flatfs import OpenOptions, open_chain
from flatfs.errors import ChainError, ParentMismatch
from flatfs.extents import Kind

from ..helpers.cli import flatfs
from ..helpers.vdi_chains import dissect_read, snapshot_chain
from ..helpers.vdi_writer import BLOCK, Vdi, pattern, write_registry

M = BLOCK


def project_entries(entries: list[dict]) -> list[dict]:
    """Map entries with neighbours of the same data-ness merged."""
    out: list[dict] = []
    for e in entries:
        if out and out[-1]["data"] == e["data"] and out[-1]["start"] + out[-1]["length"] == e["start"]:
            out[-1]["length"] += e["length"]
        else:
            out.append({"start": e["start"], "length": e["length"], "data": e["data"]})
    return out


def read_all(chain) -> bytes:
    return chain.pread(0, chain.size)


@pytest.mark.parametrize("registry", [True, False], ids=["registry", "scan"])
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_snapshot_chain_reads_as_written_and_as_dissect_reads_it(tmp_path, depth, registry):
    paths, imgs, want = snapshot_chain(tmp_path / "VM", depth, registry=registry)
    with open_chain(paths[-1]) as chain:
        assert [lay.path for lay in chain.layers][::-1] == [str(p) for p in paths] or [
            os.path.realpath(lay.path) for lay in chain.layers
        ][::-1] == [os.path.realpath(p) for p in paths]
        assert chain.size == len(want)
        got = read_all(chain)
        assert got == want
        assert got == dissect_read(paths, chain.size)
        # unaligned reads across block and layer boundaries
        for off, n in ((M - 7, 20), (2 * M + 4990, M), (len(want) - 1000, 1000)):
            assert chain.pread(off, n) == want[off : off + n]
        how = "name" if registry else "search by vdi-uuid-create"
        assert all(chain.found_by(d) == how for d in range(depth - 1))
        assert chain.found_by(depth - 1) is None


def test_map_kinds_and_depths(tmp_path):
    paths, imgs, want = snapshot_chain(tmp_path / "VM", 3, registry=True)
    with open_chain(paths[-1]) as chain:
        ext = [(e.start // M, e.length, e.kind, e.depth) for e in chain.extents()]
    # block 0: top has 4 KiB written into a whole allocated block
    assert ext[0] == (0, M, Kind.DATA, 0)
    kinds = {}
    for e_start, length, kind, depth in ext:
        for b in range(e_start, e_start + -(-length // M)):
            kinds.setdefault(b, (kind, depth))
    assert kinds[1] == (Kind.DATA, 1)  # mid's block
    assert kinds[2] == (Kind.ZERO, 1)  # mid zeroed base's data
    assert kinds[3] == (Kind.ZERO, 2)  # base's zero block
    assert kinds[4] == (Kind.ZERO, 2)  # unallocated everywhere: zeros at the base
    assert kinds[7] == (Kind.ZERO, 0)  # top zeroes mid's data
    assert kinds[8] == (Kind.DATA, 0)


def test_map_and_convert_through_the_cli(qemu, tmp_path):
    paths, imgs, want = snapshot_chain(tmp_path / "VM", 4, registry=True)
    top = paths[-1]
    entries = json.loads(flatfs("map", "--output=json", top).stdout)
    assert sum(e["length"] for e in entries) == len(want)
    for e in entries:
        seg = want[e["start"] : e["start"] + e["length"]]
        if not e["data"]:
            assert seg == bytes(len(seg)), e
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"flat.{fmt}"
        flatfs("convert", "-O", fmt, top, out)
        if fmt == "qcow2":
            qemu.img("check", out)
        ref = tmp_path / f"ref.{fmt}.raw"
        ref.write_bytes(want)
        r = qemu.img("compare", "-f", fmt, "-F", "raw", out, ref, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        # convert writes only data: nothing the chain says is not data is allocated in TARGET
        if fmt == "qcow2":
            for e in qemu.map(out, fmt):
                if e["data"]:
                    assert any(
                        d["data"]
                        and d["start"] <= e["start"]
                        and e["start"] + e["length"] <= d["start"] + d["length"]
                        for d in project_entries(entries)
                    ), e


def test_info_shows_type_uuids_and_how_the_parent_was_found(tmp_path):
    paths, imgs, _ = snapshot_chain(tmp_path / "VM", 2, registry=True)
    rows = json.loads(flatfs("info", "--output=json", paths[-1]).stdout)
    top, base = rows
    assert top["format"] == "vdi" and top["vdi-type"] == "differencing" and top["block-size"] == M
    assert top["vdi-uuid-create"] == str(imgs[1].create)
    assert top["vdi-uuid-linkage"] == str(imgs[0].create) == base["vdi-uuid-create"]
    assert top["vdi-uuid-parent-modify"] == str(imgs[0].modify) == base["vdi-uuid-modify"]
    assert top["backing-found-by"] == "name"
    assert top["vdi-registry"] == str(tmp_path / "VM" / "VM.vbox")
    assert base["vdi-type"] == "dynamic" and "backing-found-by" not in base
    human = flatfs("info", paths[-1]).stdout
    assert "    type:          differencing" in human
    assert f"    parent uuid:   {imgs[0].create}" in human
    assert "    found by:      name" in human
    (tmp_path / "VM" / "VM.vbox").unlink()
    rows = json.loads(flatfs("info", "--output=json", paths[-1]).stdout)
    assert rows[0]["backing-found-by"] == "search by vdi-uuid-create" and rows[0]["vdi-registry"] is None


def test_registry_name_wins_over_the_scan_and_a_wrong_name_falls_back(tmp_path):
    vm = tmp_path / "VM"
    paths, imgs, want = snapshot_chain(vm, 2, registry=False)
    # the registry names a copy kept elsewhere; the scan would find the original
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.rename(paths[0], other / "disk.vdi")
    write_registry(vm / "VM.vbox", [(imgs[0], "../elsewhere/disk.vdi"), (imgs[1], "Snapshots/x.vdi")])
    with open_chain(paths[1]) as chain:
        assert chain.layers[1].path.endswith("elsewhere/disk.vdi")
        assert read_all(chain) == want
    # a registry naming a file that is not the parent (another uuidCreate): skipped, then the scan
    Vdi(imgs[0].size).write(other / "disk.vdi")
    Vdi(imgs[0].size, create=imgs[0].create, modify=imgs[0].modify).write(vm / "found.vdi")
    with open_chain(paths[1]) as chain:
        assert chain.layers[1].path == str(vm / "found.vdi")
        assert chain.found_by(0) == "search by vdi-uuid-create"


def test_missing_parent_names_the_uuid_and_the_folders(tmp_path):
    vm = tmp_path / "VM"
    paths, imgs, _ = snapshot_chain(vm, 2, registry=False)
    paths[0].unlink()
    res = flatfs("info", paths[1], check=False)
    assert res.returncode == 1
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("flatfs: ")
    assert str(imgs[0].create) in err
    assert str(vm / "Snapshots") in err and str(vm) in err


def test_search_dir_adds_a_folder(tmp_path):
    vm = tmp_path / "VM"
    paths, imgs, want = snapshot_chain(vm, 2, registry=False)
    lib = tmp_path / "library"
    lib.mkdir()
    os.rename(paths[0], lib / "base.vdi")
    with pytest.raises(ChainError, match="not found"):
        open_chain(paths[1])
    with open_chain(paths[1], OpenOptions(search_dirs=(str(lib),))) as chain:
        assert read_all(chain) == want
    out = flatfs("convert", "-O", "raw", "--search-dir", lib, paths[1], tmp_path / "out.raw")
    assert out.returncode == 0
    assert (tmp_path / "out.raw").read_bytes() == want


def test_two_candidates_with_the_same_uuid_are_refused_naming_both(tmp_path):
    vm = tmp_path / "VM"
    paths, imgs, _ = snapshot_chain(vm, 2, registry=False)
    copy = vm / "copy of disk.vdi"
    copy.write_bytes(paths[0].read_bytes())
    res = flatfs("map", paths[1], check=False)
    assert res.returncode == 1
    err = res.stderr.strip()
    assert "ambiguous" in err and str(copy) in err and str(paths[0]) in err and "\n" not in err


def test_uuid_parent_modify_mismatch_is_refused_unless_ignored(tmp_path):
    vm = tmp_path / "VM"
    paths, imgs, want = snapshot_chain(vm, 2, registry=True)
    # the parent was written to since the snapshot: a new uuidModify
    imgs[0].modify = uuid.uuid4()
    imgs[0].write(paths[0])
    with pytest.raises(ParentMismatch, match=str(imgs[0].modify)):
        open_chain(paths[1])
    res = flatfs("map", paths[1], check=False)
    assert res.returncode == 1 and "--ignore-parent-id" in res.stderr and "\n" not in res.stderr.strip()
    # info reads it, showing both values and flagging the mismatch
    res = flatfs("info", paths[1])
    assert f"parent has {imgs[0].modify}: MISMATCH" in res.stdout, res.stdout
    with open_chain(paths[1], OpenOptions(ignore_parent_id=True)) as chain:
        assert read_all(chain) == want


def test_fifo_and_directories_with_the_suffix_are_skipped_unopened(tmp_path):
    vm = tmp_path / "VM"
    paths, imgs, want = snapshot_chain(vm, 2, registry=False)
    os.mkfifo(vm / "aaa.vdi")  # sorts first; opening it for reading would block
    (vm / "dir.vdi").mkdir()
    os.mkfifo(vm / "VM.vbox")  # a registry that is a FIFO: skipped too
    with open_chain(paths[1]) as chain:
        assert read_all(chain) == want


def test_backing_dir_fences_the_parent_found_by_scan(tmp_path):
    vm = tmp_path / "VM"
    paths, imgs, _ = snapshot_chain(vm, 2, registry=True)
    res = flatfs("info", "--backing-dir", vm / "Snapshots", paths[1], check=False)
    assert res.returncode == 1 and "outside --backing-dir" in res.stderr
    assert flatfs("info", "--backing-dir", vm, paths[1]).returncode == 0


def test_no_backing_shows_the_snapshot_alone(tmp_path):
    paths, imgs, _ = snapshot_chain(tmp_path / "VM", 2, registry=False)
    with open_chain(paths[1], OpenOptions(no_backing=True)) as chain:
        assert len(chain.layers) == 1
        assert chain.pread(M, 16) == pattern(0x21, 16)
        assert chain.pread(0, 16) == bytes(16)  # the base's block is not read
