"""flatfs-serve@.service and .socket: systemd-analyze accepts them, they are hardened, and
socket activation works for real (systemd-socket-activate passes the socket, nbdkit serves it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ..helpers.chains import qemu_chain
from ..helpers.nbd import Servers, flatfs_map_as_nbd, nbd_map, stop, unix_uri, wait_for
from ..helpers.needs import require
from ..helpers.qemu import Qemu

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "systemd" / "flatfs-serve@.service"
SOCKET = ROOT / "systemd" / "flatfs-serve@.socket"


def _settings(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def _flatfs_bin(tmp_path: Path) -> Path:
    exe = Path(sys.executable).with_name("flatfs")
    if not exe.exists():
        exe = tmp_path / "flatfs"
        exe.write_text(f'#!/bin/sh\nexec {sys.executable} -m flatfs "$@"\n')
        exe.chmod(0o755)
    return exe


def test_units_are_hardened_and_socket_activated() -> None:
    svc, sock = _settings(SERVICE), _settings(SOCKET)
    assert svc["CapabilityBoundingSet"] == ["CAP_DAC_READ_SEARCH"]
    for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes")):
        assert svc[key] == [want], key
    assert "AF_INET" in svc["RestrictAddressFamilies"][0]  # a TCP ListenStream= drop-in must work
    assert "serve --foreground" in svc["ExecStart"][0] and "${IMAGE}" in svc["ExecStart"][0]
    assert svc["EnvironmentFile"] == ["/etc/flatfs/%i.conf"]
    assert sock["ListenStream"] == ["/run/flatfs/%i.sock"] and sock["SocketMode"] == ["0600"]
    assert sock["Accept"] == ["no"]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    text = SERVICE.read_text().replace("/usr/local/bin/flatfs", str(_flatfs_bin(tmp_path)))
    (tmp_path / "flatfs-serve@vm1.service").write_text(text)
    shutil.copy(SOCKET, tmp_path / "flatfs-serve@vm1.socket")
    units = [str(tmp_path / f"flatfs-serve@vm1.{k}") for k in ("service", "socket")]
    # --man=no: Documentation=man:flatfs-serve(1) exists only once make install has run
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "flatfs" not in out, out


def test_socket_activation(servers: Servers, tmp_path: Path) -> None:
    require(shutil.which("systemd-socket-activate") is not None, "systemd-socket-activate is missing")
    top = qemu_chain(Qemu(), tmp_path)
    sock = tmp_path / "act.sock"
    cmd = [str(_flatfs_bin(tmp_path)), "serve", "--foreground", str(top)]
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), *cmd], stderr=subprocess.PIPE)
    try:
        assert wait_for(sock)
        assert nbd_map(unix_uri(sock)) == flatfs_map_as_nbd(top)  # the first client starts the server
    finally:
        stop(proc.pid)  # flatfs exec'd nbdkit in this very process (LISTEN_PID)
        proc.communicate()
