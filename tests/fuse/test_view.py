"""The FUSE view's logic without FUSE: attributes, open flags, errno mapping."""

from __future__ import annotations

import errno
import logging
import os
import stat
from types import SimpleNamespace

import pytest

from flatfs.chain.dataindex import DataIndex, scan
from flatfs.errors import CorruptImage, ImageIOError, UnsupportedImage
from flatfs.extents import Extent, Kind
from flatfs.fuse.mount import _fuse_opt_escape
from flatfs.fuse.mountinfo import _unescape
from flatfs.fuse.view import View, errno_for, view_name

SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE


class FakeChain:
    def __init__(self, size: int = 1 << 30, data: int = 3 * 4096 + 1, fail: Exception | None = None) -> None:
        self.size = size
        self._data = data
        self.fail = fail
        self.data_calls = 0
        self.index: DataIndex | None = None
        self.data = 0

    def extents(self):
        """``data`` bytes of DATA from 0, then nothing: walked once, when the view is made."""
        self.data_calls += 1
        n = min(self._data, self.size)
        yield Extent(0, n, Kind.DATA)
        if n < self.size:
            yield Extent(n, self.size - n, Kind.ABSENT)

    def readinto(self, offset: int, buf: memoryview) -> int:
        if self.fail:
            raise self.fail
        buf[:] = b"x" * len(buf)
        return len(buf)

    def build_index(self) -> None:
        self.index, self.data = scan(self.size, self.extents())

    def data_bytes(self) -> int:
        return self.data

    def seek(self, offset: int, whence: int) -> int:
        assert self.index is not None, "the view builds the chain's data-run index at mount"
        return self.index.seek(offset, whence)


def st() -> os.stat_result:
    # View reads only the nanosecond times of the top image.
    return SimpleNamespace(
        st_atime_ns=1_000_000_001,
        st_mtime_ns=2_000_000_002,  # type: ignore[return-value]
        st_ctime_ns=3_000_000_003,
    )


def test_view_name() -> None:
    assert view_name("/a/vm.qcow2") == "vm.raw"
    assert view_name("vm.raw") == "vm.raw"
    assert view_name("disk") == "disk.raw"
    assert view_name("a.b.qcow2") == "a.b.raw"


def test_dir_mode_attrs() -> None:
    ch = FakeChain()
    v = View(ch, "vm.raw", st(), uid=7, gid=8)
    f = v.getattr("/vm.raw")
    assert stat.S_ISREG(f["st_mode"]) and stat.S_IMODE(f["st_mode"]) == 0o444
    assert f["st_size"] == ch.size
    assert f["st_blocks"] == (3 * 4096 + 1 + 511) // 512  # rounded up
    assert f["st_mtime"] == 2_000_000_002 and (f["st_uid"], f["st_gid"]) == (7, 8)
    d = v.getattr("/")
    assert stat.S_ISDIR(d["st_mode"]) and stat.S_IMODE(d["st_mode"]) == 0o555
    assert v.readdir("/") == [".", "..", "vm.raw"]
    with pytest.raises(OSError) as ei:
        v.getattr("/other")
    assert ei.value.errno == errno.ENOENT
    for _ in range(5):
        v.getattr("/vm.raw")
        v.statfs()
    assert ch.data_calls == 1  # computed once, at mount


def test_file_mode_root_is_the_file() -> None:
    v = View(FakeChain(), None, st())
    assert stat.S_ISREG(v.getattr("/")["st_mode"])
    assert v.file_path == "/"
    buf = bytearray(10)
    assert v.readinto("/", 0, memoryview(buf)) == 10


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
def test_open_for_write_is_erofs(flags: int) -> None:
    v = View(FakeChain(), "x.raw", st())
    with pytest.raises(OSError) as ei:
        v.check_open("/x.raw", flags)
    assert ei.value.errno == errno.EROFS
    v.check_open("/x.raw", os.O_RDONLY)


def test_seek_never_enosys() -> None:
    v = View(FakeChain(size=100), "x.raw", st())
    assert v.seek("/x.raw", 5, SEEK_DATA) == 5
    for whence in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, 99):
        with pytest.raises(OSError) as ei:
            v.seek("/x.raw", 0, whence)
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        v.seek("/x.raw", 100, SEEK_HOLE)
    assert ei.value.errno == errno.ENXIO


def test_errno_mapping_and_log_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="flatfs")
    io = ImageIOError.from_oserror("/img/a.qcow2", OSError(errno.EBADF, "Bad file descriptor"), 0x1000)
    assert errno_for(io, "/a.raw", 0x2000) == errno.EBADF
    assert errno_for(io, "/a.raw", 0x2000) == errno.EBADF
    corrupt = CorruptImage("/img/b.qcow2", "L2 entry points past the end", 0x30000)
    assert errno_for(corrupt, "/a.raw", 0x4000) == errno.EIO
    assert errno_for(UnsupportedImage("/img/c", "feature"), "/a.raw", 0) == errno.EOPNOTSUPP
    assert errno_for(OSError(errno.ENXIO, "x"), "/a.raw", 9) == errno.ENXIO
    assert errno_for(ValueError("bug"), "/a.raw", 1) == errno.EIO
    # the same damage met by a streaming reader, at other offsets and sizes: not logged again
    for i in range(5):
        short = ImageIOError(f"/img/d{7}.qcow2", f"short read: {i} of 65536 bytes", 0x50000 + i * 4096)
        assert errno_for(short, "/a.raw", 0x70000 + i * 4096) == errno.EIO
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("/img/a.qcow2" in m for m in msgs) == 1  # logged once
    assert sum("/img/d7.qcow2" in m for m in msgs) == 1
    assert any("/a.raw at offset 0x4000" in m and "L2 entry" in m for m in msgs)
    assert not any("ENXIO" in m or "/a.raw at offset 0x9" in m for m in msgs)  # an answer, not an error


def test_option_escaping_and_mountinfo_unescape() -> None:
    assert _fuse_opt_escape(r"/a,b\c") == r"/a\,b\\c"
    assert _unescape(r"/mnt/a\040b\134c") == "/mnt/a b\\c"


@pytest.mark.parametrize("major,minor", [(2, 9), (3, 7)])
def test_refuses_libfuse_without_lseek(major: int, minor: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    from types import ModuleType

    import flatfs.fuse.glue as ff
    from flatfs.errors import MountError

    fake = ModuleType("mfusepy")
    fake.fuse_version_major, fake.fuse_version_minor = major, minor  # type: ignore[attr-defined]
    fake._libfuse_path = "libfuse.so.2"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mfusepy", fake)
    monkeypatch.setattr(ff, "_MFUSEPY", None)
    monkeypatch.setenv("FUSE_LIBRARY_NAME", "fuse")
    with pytest.raises(MountError, match="needs libfuse 3.8"):
        ff.load_mfusepy()
    assert os.environ["FUSE_LIBRARY_NAME"] == "fuse3"
