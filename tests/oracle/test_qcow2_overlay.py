"""The growing qcow2 overlay (formats/qcow2/overlay.py) alone, judged by QEMU: after any sequence of
writes, zero writes and flushes, `qemu-img check` finds nothing and the image reads as the model
(the backing file's bytes with the writes over them), whatever the disk size and alignment."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatfs.formats import lookup

from ..helpers.qemu import Qemu

CS = 65536


def _overlay_class():
    entry = lookup("qcow2")
    assert entry is not None and entry.overlay is not None
    return entry.overlay()


OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "flush"]),
        st.integers(0, 5 * CS),
        st.integers(1, 3 * CS),
        st.integers(1, 255),
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([3 * CS, 5 * CS + 512, 4 * CS + 3 * 512]), OPS)
def test_overlay_reads_as_the_model(qemu: Qemu, tmp_path_factory, size: int, ops) -> None:
    d = tmp_path_factory.mktemp("ov")
    base = d / "base.raw"
    model = bytearray(os.urandom(size))
    base.write_bytes(model)
    ov = _overlay_class()(str(d / "ov.qcow2"), size, str(base), "raw")

    def fill(offset: int, buf: memoryview) -> None:
        buf[:] = model[offset : offset + len(buf)]

    try:
        for op, off, n, val in ops:
            if op == "flush":
                ov.flush()
                continue
            off = min(off, size - 1)
            n = min(n, size - off)
            if op == "write":
                data = bytes([val]) * n
                ov.write(off, data, fill)
                model[off : off + n] = data
            else:
                ov.zero(off, n, fill)
                model[off : off + n] = bytes(n)
    finally:
        ov.close()
    out = d / "ov.qcow2"
    check = qemu.img("check", out, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = d / "got.raw"
    qemu.img("convert", "-O", "raw", out, raw)
    assert raw.read_bytes() == bytes(model)


def test_exists_is_refused(tmp_path: Path) -> None:
    there = tmp_path / "x.qcow2"
    there.write_bytes(b"mine")
    try:
        _overlay_class()(str(there), CS, str(tmp_path / "b"), "raw")
    except Exception as exc:
        assert "File exists" in str(exc) or "exists" in str(exc)
    else:
        raise AssertionError("an existing file was overwritten")
    assert there.read_bytes() == b"mine"
