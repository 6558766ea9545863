"""The benchmark runs end to end at a tiny scale and reports every figure.

No timed assertions: the figures' values are not checked, only that each is
measured for both tools, that every figure with a goal reports whether flatfs
reached it (the "result" column), that every comparison of the two tools'
outputs was made and found them identical (same bytes, same map, same walk,
same converted image), and that nothing is left mounted or on disk.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers.needs import have_fuse, have_qemu, require

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"

pytestmark = [pytest.mark.qemu, pytest.mark.fuse, pytest.mark.slow]

# What bench/run.py compares between flatfs and QEMU (its "checks"): every one must be made.
COMPARISONS = {
    *(f"convert {case}: flatfs output vs qemu-img output" for case in ("seed-1t", "seed-64t", "compressed")),
    "view read: crc32 of the bytes read",
    "qemu-img map -f raw of the 1 TiB views",
    "SEEK_DATA/SEEK_HOLE walk of the 64 TiB views",
}


def figure_keys() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("flatfs_bench_run", RUN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return tuple(mod.FIGURE_KEYS)


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line for line in f if str(path) in line]


def test_quick_benchmark_reports_every_figure_and_comparison(tmp_path: Path) -> None:
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    require(shutil.which("qemu-storage-daemon") is not None, "qemu-storage-daemon is not installed")
    require(have_fuse(), "/dev/fuse or fusermount3 is missing")
    out = tmp_path / "bench"
    # --warm: leave the machine's page cache alone (and need no root for it)
    res = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--warm", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert not mounts_under(tmp_path), "the benchmark left a mount behind"
    assert not (out / "work").exists(), "the scratch folder was not removed"

    data = json.loads((out / "bench.json").read_text())
    assert data["cache"] == "warm" and data["quick"] is True
    assert data["machine"]["cores"] >= 1 and data["date"]
    figs = {f["key"]: f for f in data["figures"]}
    assert tuple(figs) == figure_keys()
    for key, f in figs.items():
        assert f["flatfs"] is not None, key
        assert f["qemu"] is not None, key
        assert f["ratio"] is not None, key
        # a figure with a goal says whether flatfs reached it; one without says nothing
        assert f["result"] in (("PASS", "MISS") if f["target"] else ("",)), (key, f["result"])
    assert any(f["target"] for f in figs.values()), "no figure has a goal"
    assert set(data["checks"]) == COMPARISONS, sorted(data["checks"])
    for name, verdict in data["checks"].items():
        assert verdict == "identical", f"{name}: {verdict}"

    md = (out / "bench.md").read_text()
    assert "| figure | flatfs | QEMU | flatfs/QEMU | target | result |" in md
    assert "warm cache" in md
    for f in figs.values():
        assert f["label"] in md
    assert "flatfs/QEMU" in res.stdout and ("PASS" in res.stdout or "MISS" in res.stdout)
    # the scenarios without a disk: tmpfs (where /dev/shm is tmpfs) and copy offload on a
    # loop-mounted reflink XFS (root and xfsprogs); each ran, or says why it could not
    for name in ("tmpfs", "reflink"):
        scen = data[name]
        if "skipped" in scen:
            assert scen["skipped"], name
            continue
        assert scen["checks"], name
        for check, verdict in scen["checks"].items():
            assert not verdict.startswith("DIFFERENT"), f"{check}: {verdict}"
    assert not any("reflink-mnt" in line for line in open("/proc/self/mounts"))


def test_quick_esxi_benchmark_compares_identical_outputs(tmp_path: Path) -> None:
    require(have_qemu(), "qemu-img is not installed")
    out = tmp_path / "esxi"
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "esxi.py"), "--quick", "--warm", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "Traceback" not in res.stderr, res.stderr
    for case in ("esxi-sesparse", "esxi-vmfssparse"):
        assert f"{case:16} outputs: identical" in res.stdout, res.stdout
        assert f"{case:16} flatfs " in res.stdout and "qemu-img" in res.stdout
    assert not out.exists()
