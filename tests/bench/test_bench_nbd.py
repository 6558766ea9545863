"""bench/nbd.py runs end to end at its quick scale: every figure measured for both servers,
every comparison made and equal, no scratch folder left (the servers are stopped by pid
in the bench's finally). No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers.nbd import have_nbd_tools
from ..helpers.needs import have_qemu, require

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_quick_nbd_bench(tmp_path: Path) -> None:
    why = have_nbd_tools()
    require(why is None, why or "")
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "nbd.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (out / "work").exists()
    data = json.loads((out / "bench-nbd.json").read_text())
    assert set(data["figures"]) == {"copy_null", "copy_file", "map_64t"}
    for key, fig in data["figures"].items():
        assert fig["flatfs"]["n"] == fig["qemu"]["n"] == fig["ratio"]["n"] == 1, key
    assert len(data["checks"]) == 3 and all(data["checks"].values()), data["checks"]
