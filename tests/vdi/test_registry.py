"""The .vbox registry is untrusted, and the scan by UUID reads headers only."""

from __future__ import annotations

import os
from pathlib import Path
from xml.parsers.expat import ExpatError

import pytest

from flatfs import OpenOptions, open_chain
from flatfs.chain.open import Opener
from flatfs.errors import ChainError
from flatfs.formats.vdi import registry
from flatfs.formats.vdi.spec import identify

from ..helpers.vdi_writer import BLOCK, Vdi, pattern, write_registry

M = BLOCK


def pair(vm: Path) -> tuple[Path, Path, Vdi, Vdi]:
    (vm / "Snapshots").mkdir(parents=True)
    base = Vdi(2 * M, blocks={0: pattern(1)})
    child = Vdi(2 * M, blocks={1: pattern(2)}).over(base)
    b = base.write(vm / "disk.vdi")
    c = child.write(vm / "Snapshots" / f"{{{child.create}}}.vdi")
    return b, c, base, child


HOSTILE = {
    "billion laughs": b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
    + b"".join(b'<!ENTITY %c "%s">' % (98 + i, (b"&%c;" % (97 + i)) * 10) for i in range(9))
    + b']><VirtualBox><HardDisk uuid="&j;" location="&j;"/></VirtualBox>',
    "external entity": b'<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b'<VirtualBox><HardDisk uuid="{U}" location="&x;"/></VirtualBox>',
    "external dtd": b'<?xml version="1.0"?><!DOCTYPE v SYSTEM "http://example.invalid/x.dtd">'
    b'<VirtualBox><HardDisk uuid="{U}" location="x.vdi"/></VirtualBox>',
    "parameter entity": b'<?xml version="1.0"?><!DOCTYPE v [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>'
    b"<VirtualBox/>",
    "not xml": b"\x00\xff garbage <<<",
    "deep": b"<a>" * 10000 + b"</a>" * 10000,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_registry_is_refused_by_the_parser(name):
    with pytest.raises((registry.RefusedXML, ExpatError)):
        registry.hard_disks(HOSTILE[name])


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_registry_is_ignored_and_the_scan_finds_the_parent(tmp_path, name):
    b, c, base, child = pair(tmp_path / "VM")
    data = HOSTILE[name].replace(b"{U}", b"{%s}" % str(base.create).encode())
    (tmp_path / "VM" / "VM.vbox").write_bytes(data)
    with open_chain(c) as chain:
        assert chain.found_by(0) == "search by vdi-uuid-create"
        assert chain.layers[0].info()["vdi-registry"] is None
        assert chain.pread(0, 2 * M) == pattern(1) + pattern(2)


def test_huge_registry_is_not_read(tmp_path):
    b, c, base, child = pair(tmp_path / "VM")
    big = tmp_path / "VM" / "VM.vbox"
    write_registry(big, [(base, "disk.vdi"), (child, "x")])
    with open(big, "ab") as f:
        f.truncate(registry.MAX_REGISTRY_BYTES + 1)  # sparse: cheap to make, would be costly to read
    opener = Opener(OpenOptions())
    assert opener.read_sidecar(str(c), "../VM.vbox", registry.MAX_REGISTRY_BYTES) is None
    with open_chain(c) as chain:
        assert chain.found_by(0) == "search by vdi-uuid-create"


def test_read_sidecar_policy(tmp_path):
    b, c, base, child = pair(tmp_path / "VM")
    write_registry(tmp_path / "VM" / "VM.vbox", [(base, "disk.vdi"), (child, "x")])
    o = Opener(OpenOptions())
    assert o.read_sidecar(str(c), "../VM.vbox", 1 << 20).startswith(b"<?xml")
    assert o.read_sidecar(str(c), "../missing.vbox", 1 << 20) is None
    assert o.read_sidecar(str(c), "http://example.invalid/VM.vbox", 1 << 20) is None
    fenced = Opener(OpenOptions(backing_dir=str(tmp_path / "VM" / "Snapshots")))
    assert fenced.read_sidecar(str(c), "../VM.vbox", 1 << 20) is None
    os.mkfifo(tmp_path / "VM" / "fifo.vbox")
    assert o.read_sidecar(str(c), "../fifo.vbox", 1 << 20) is None  # returns at once: never opened


def test_identify_reads_the_head_alone(tmp_path):
    b, c, base, child = pair(tmp_path / "VM")
    head = c.read_bytes()[:4096]
    assert identify(head) == {"vdi-uuid-create": str(child.create), "vdi-uuid-modify": str(child.modify)}
    assert identify(b"\0" * 4096) == {}
    assert identify(head[:100]) == {}


def test_scan_skips_files_without_the_suffix_and_reads_only_heads(tmp_path):
    vm = tmp_path / "VM"
    b, c, base, child = pair(vm)
    os.rename(b, vm / "disk.img")  # right header, wrong suffix: not considered
    with pytest.raises(ChainError) as exc:
        open_chain(c)
    msg = str(exc.value)
    assert f"vdi-uuid-create {base.create} not found" in msg
    assert str(vm / "Snapshots") in msg and str(vm) in msg
    os.rename(vm / "disk.img", vm / "DISK.VDI")  # the suffix in any case
    with open_chain(c) as chain:
        assert chain.layers[1].path == str(vm / "DISK.VDI")


def test_scan_does_not_take_the_child_itself_or_a_symlink_twice(tmp_path):
    vm = tmp_path / "VM"
    b, c, base, child = pair(vm)
    os.symlink(b, vm / "link.vdi")  # the same file under two names: one candidate
    with open_chain(c) as chain:
        assert os.path.realpath(chain.layers[1].path) == str(b)


def test_a_parent_that_is_itself_differencing_is_followed_by_scan(tmp_path):
    vm = tmp_path / "VM"
    b, c, base, child = pair(vm)
    grand = Vdi(2 * M, blocks={0: pattern(9, 10)}).over(child)
    g = grand.write(vm / "Snapshots" / f"{{{grand.create}}}.vdi")
    with open_chain(g) as chain:
        assert len(chain.layers) == 3
        assert chain.pread(0, 11) == pattern(9, 10) + b"\0"
