"""The systemd template unit: systemd-analyze accepts it, and its hardening
never hides the mount in a private mount namespace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers.needs import require

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "flatfs@.service"
EXAMPLE = ROOT / "systemd" / "example.conf"

# Each of these creates a mount namespace for the service: the FUSE mount
# would be made there, invisible to the host.
NAMESPACING = {
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateNetwork",
    "PrivateUsers",
    "PrivateIPC",
    "ProtectSystem",
    "ProtectHome",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "RootImage",
    "MountAPIVFS",
    "DynamicUser",
    "MountFlags",
    "LogNamespace",
}
FALSY = {"no", "false", "0", "off", ""}


def _settings(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.append((k.strip(), v.strip()))
    return out


def test_unit_keeps_the_host_mount_namespace() -> None:
    settings = dict(_settings(UNIT.read_text()))
    bad = {k: v for k, v in settings.items() if k in NAMESPACING and v.lower() not in FALSY}
    assert not bad, f"these would hide the FUSE mount from the host: {bad}"
    assert settings["Type"] == "notify"
    assert "/etc/flatfs/%i.conf" in settings["EnvironmentFile"]
    assert re.search(r"\bmount (-f|--foreground)\b", settings["ExecStart"])
    assert "${IMAGE}" in settings["ExecStart"] and "${MOUNTPOINT}" in settings["ExecStart"]


def test_example_conf() -> None:
    keys = {k for k, _ in _settings(EXAMPLE.read_text())}
    assert {"IMAGE", "MOUNTPOINT"} <= keys


@pytest.mark.parametrize("unit_name", ["flatfs@.service", "flatfs@vm1.service"])
def test_systemd_analyze_verify(unit_name: str, tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    # verify insists that ExecStart= binaries exist: point them at this checkout's.
    flatfs_bin = Path(sys.executable).with_name("flatfs")
    if not flatfs_bin.exists():
        flatfs_bin = tmp_path / "flatfs"
        flatfs_bin.write_text(f'#!/bin/sh\nexec {sys.executable} -m flatfs "$@"\n')
        flatfs_bin.chmod(0o755)
    text = UNIT.read_text().replace("/usr/local/bin/flatfs", str(flatfs_bin))
    fusermount = shutil.which("fusermount3")
    if fusermount:
        text = text.replace("/usr/bin/fusermount3", fusermount)
    unit = tmp_path / unit_name
    unit.write_text(text)
    # verify also runs man for each Documentation= page: this checkout's pages, not installed ones
    man1 = tmp_path / "man" / "man1"
    man1.mkdir(parents=True)
    for page in (ROOT / "docs" / "man").glob("*.1"):
        shutil.copy(page, man1)
    env = {**os.environ, "MANPATH": str(tmp_path / "man")}
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    # Unknown keys and bad values are only warnings: treat any about our unit as failures.
    assert unit_name not in out and "flatfs" not in out, out
