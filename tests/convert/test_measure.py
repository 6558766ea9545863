"""flatfs measure: `required` is at least what convert then writes, and both figures are within a
few percent of qemu-img measure's (qemu-img also counts the L2 tables a sparse image does not need:
that much is allowed on top)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..helpers.cli import flatfs
from ..helpers.images import M, disk_usage
from ..helpers.qemu import Qemu

SOURCES = {
    "empty": [],
    "sparse": ["write -P 0x11 1M 3M", "write -z 40M 8M", "write -P 0x12 100M 64k"],
    "full": ["write -P 0x21 0 128M"],
    "scattered": [f"write -P {i} {i * 4}M 100k" for i in range(1, 30)],
}
OPTIONS = {
    "default": [],
    "compat-0.10": ["--compat", "0.10"],
    "cluster-4k": ["--cluster-size", "4k"],
    "cluster-2M": ["--cluster-size", "2M"],
    "extended-l2": ["--extended-l2"],
    "compressed": ["-c"],
    "raw": ["-O", "raw"],
}


def _qemu_args(args: list[str]) -> list[str]:
    """The same target options, spelled for qemu-img measure."""
    if args == ["-O", "raw"]:
        return ["-O", "raw"]
    opts = {
        "--compat": lambda v: f"compat={v}",
        "--cluster-size": lambda v: f"cluster_size={v}",
    }
    out = ["-O", "qcow2"]
    o = []
    it = iter(args)
    for a in it:
        if a in opts:
            o.append(opts[a](next(it)))
        elif a == "--extended-l2":
            o.append("extended_l2=on")
    return out + (["-o", ",".join(o)] if o else [])


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ..helpers.needs import have_qemu, require

    require(have_qemu(), "qemu-img/qemu-io are not installed")
    q = Qemu()
    d = tmp_path_factory.mktemp("measure")
    out = {}
    for name, cmds in SOURCES.items():
        img = q.create(d / f"{name}.qcow2", "128M")
        if cmds:
            q.io(img, *cmds)
        out[name] = img
    return out


@pytest.mark.qemu
@pytest.mark.parametrize("opt", OPTIONS)
@pytest.mark.parametrize("src", SOURCES)
def test_measure_bounds_convert_and_agrees_with_qemu(
    qemu: Qemu, sources: dict[str, Path], tmp_path: Path, src: str, opt: str
) -> None:
    args = OPTIONS[opt]
    image = sources[src]
    ours = json.loads(flatfs("measure", "--output=json", *args, image).stdout)
    theirs = json.loads(qemu.img("measure", "--output=json", *_qemu_args(args), image).stdout)
    assert set(ours) == set(theirs), (ours, theirs)  # `bitmaps` exactly where qemu-img prints it
    out = tmp_path / "out.img"
    done = json.loads(flatfs("convert", "--output=json", *args, image, out).stdout)
    assert ours["required"] >= out.stat().st_size == done["file-size"]
    assert ours["required"] >= done["bytes-written"]
    # the file system's own blocks (an extent tree) count in st_blocks too
    assert ours["required"] + 64 * 1024 >= disk_usage(out)
    cs = 2 * M if opt == "cluster-2M" else 4096 if opt == "cluster-4k" else 64 * 1024
    # qemu-img's required always counts the metadata of a fully allocated image
    full_metadata = theirs["fully-allocated"] - 128 * M
    for key in ("required", "fully-allocated"):
        slack = 0.03 * theirs[key] + (full_metadata if key == "required" else 0) + 2 * cs
        assert abs(ours[key] - theirs[key]) <= slack, (key, ours, theirs)
    if opt == "raw":
        assert ours == {"required": 128 * M, "fully-allocated": 128 * M}


@pytest.mark.qemu
def test_convert_n_accepts_a_target_of_exactly_the_measured_size(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    for name in ("sparse", "full"):
        need = json.loads(flatfs("measure", "--output=json", sources[name]).stdout)["required"]
        target = tmp_path / f"{name}.img"
        target.write_bytes(b"\xee" * need)
        flatfs("convert", "-n", sources[name], target)
        target.write_bytes(b"\xee" * (need - 512 * 1024))
        res = flatfs("convert", "-n", sources[name], target, check=False)
        assert res.returncode == 1 and f"needs {need} bytes" in res.stderr


def test_human_output_is_qemu_img_s(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x01" * M)
    res = flatfs("measure", src)
    lines = res.stdout.splitlines()
    assert lines[0].startswith("required size: ") and lines[1].startswith("fully allocated size: ")
    assert len(lines) == 2  # no bitmaps: a raw source has none (as qemu-img says)
    res = flatfs("measure", "-O", "raw", "-c", src, check=False)
    assert res.returncode == 2 and "needs a qcow2 target" in res.stderr
