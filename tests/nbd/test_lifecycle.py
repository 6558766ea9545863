"""`flatfs serve` when things go wrong: broken chains, missing packages, hostile requests,
clients that vanish, a server killed under its clients; --run, export names, a 64 TiB map."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..helpers.chains import qemu_chain
from ..helpers.cli import error_line, flatfs
from ..helpers.images import M
from ..helpers.nbd import RawRequests, Servers, dd, flatfs_map_as_nbd, nbd_map, unix_uri, wait_for
from ..helpers.qemu import Qemu, qemu_map


def test_a_broken_chain_is_one_line_and_starts_nothing(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    q.create(tmp_path / "base.qcow2", 4 * M)
    q.create(tmp_path / "top.qcow2", 4 * M, backing="base.qcow2", backing_fmt="qcow2")
    (tmp_path / "base.qcow2").unlink()
    line = error_line(
        "serve", "--socket", tmp_path / "s.sock", "--pid-file", tmp_path / "p", tmp_path / "top.qcow2"
    )
    assert "base.qcow2" in line
    assert not (tmp_path / "s.sock").exists() and not (tmp_path / "p").exists()


def test_missing_nbdkit_or_its_python_plugin_names_the_packages(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    img = q.create(tmp_path / "a.qcow2", M)
    env = {**os.environ, "PATH": str(tmp_path / "bin")}
    (tmp_path / "bin").mkdir()
    line = error_line("serve", img, prefix=("env", f"PATH={env['PATH']}"))
    assert "nbdkit nbdkit-plugin-python" in line, line
    fake = tmp_path / "bin" / "nbdkit"  # an nbdkit without its Python plugin
    fake.write_text("#!/bin/sh\necho 'nbdkit: error: cannot open plugin \"python\"' >&2\nexit 1\n")
    fake.chmod(0o755)
    line = error_line("serve", img, prefix=("env", f"PATH={env['PATH']}"))
    assert "nbdkit-plugin-python" in line, line
    # a plugin built for another Python than the one flatfs runs under
    fake.write_text("#!/bin/sh\necho name=python\necho python_version=3.9.2\n")
    line = error_line("serve", img, prefix=("env", f"PATH={env['PATH']}"))
    assert "Python 3.9" in line and f"Python {sys.version_info[0]}.{sys.version_info[1]}" in line, line


def test_foreground_serves_until_sigterm_and_cleans_up(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    top = qemu_chain(q, tmp_path)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "flatfs", "serve", "--foreground", str(top)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith(f"nbd+unix:///?socket={tmp_path}/flatfs-serve-"), uri
        sock = Path(uri.split("socket=", 1)[1])
        assert wait_for(sock)
        assert nbd_map(uri) == flatfs_map_as_nbd(top)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not sock.parent.exists(), "the private socket folder was left behind"


def test_bad_requests_get_an_nbd_error_and_the_server_keeps_serving(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    top = qemu_chain(q, tmp_path)
    sock = tmp_path / "raw.sock"
    servers.flatfs(top, "--socket", str(sock), tcp=True)
    c = RawRequests(sock)
    assert c.size == 48 * M
    assert c.read(c.size - 512, 1024)[0] != 0  # past the end
    assert c.read(c.size + 4096, 512)[0] != 0
    assert c.read(0, 0)[0] != 0  # zero length: nbdkit answers EINVAL
    err, data = c.read(M, 4096)
    assert err == 0 and data == b"\x66" * 4096  # qemu_chain's top writes 0x66 at 1M
    c.close()
    assert nbd_map(unix_uri(sock)) == flatfs_map_as_nbd(top)


def test_a_file_that_shrinks_under_the_server_fails_requests_in_one_line(tmp_path: Path) -> None:
    img = tmp_path / "a.raw"
    img.write_bytes(b"\x42" * M)
    sock = tmp_path / "f.sock"
    cmd = [sys.executable, "-m", "flatfs", "serve", "--foreground", "--socket", str(sock), str(img)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(sock)
        os.truncate(img, 4096)
        bad = subprocess.run(["nbdcopy", unix_uri(sock), str(tmp_path / "out.raw")], capture_output=True)
        assert bad.returncode != 0
        c = RawRequests(sock)  # the server still answers, with the bytes that are left
        assert c.read(0, 4096) == (0, b"\x42" * 4096)
        assert c.read(M - 4096, 4096)[0] == 5  # EIO
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "file shrank" in err and "Traceback" not in err, err
    assert all(line.startswith(("nbdkit: ", "flatfs: ")) for line in err.splitlines() if line.strip()), err


def test_a_client_that_disconnects_mid_read(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    top = qemu_chain(q, tmp_path)
    uri = servers.flatfs(top)
    for _ in range(3):
        proc = dd(uri, 0, 48 * M, tmp_path / "cut.raw")
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert q.img("compare", "-f", "raw", uri, "-F", "qcow2", top).returncode == 0


def test_a_server_killed_under_its_clients(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    top = qemu_chain(q, tmp_path)
    sock = tmp_path / "k.sock"
    uri = servers.flatfs(top, "--socket", str(sock), tcp=True)
    clients = [dd(uri, 0, 48 * M, tmp_path / f"k{i}.raw") for i in range(4)]
    os.kill(servers.pid(), signal.SIGKILL)
    for c in clients:
        c.communicate(timeout=120)  # each ends (an error or a finished copy), none hangs
    # The socket the killed server left behind is cleared by the next one.
    assert sock.exists()
    uri = servers.flatfs(top, "--socket", str(sock), tcp=True)
    assert q.img("compare", "-f", "raw", uri, "-F", "qcow2", top).returncode == 0
    # ...but a live server's socket is refused, not stolen.
    assert "already listens" in error_line("serve", "--socket", sock, top)


def test_an_old_pid_file_is_replaced(servers: Servers, tmp_path: Path) -> None:
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(65536))
    pid_file = tmp_path / "old.pid"
    pid_file.write_text("999999999\n")
    servers.pid_files.append(pid_file)  # stopped with the others
    flatfs("serve", "--socket", tmp_path / "o.sock", "--pid-file", pid_file, img)
    pid = int(pid_file.read_text())
    assert b"nbdkit" in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_run_exports_for_one_command_and_returns_its_status(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    top = qemu_chain(q, tmp_path)
    out = tmp_path / "run.raw"
    flatfs("serve", top, "--run", f'nbdcopy "$uri" {out}')
    assert q.img("compare", "-f", "raw", out, "-F", "qcow2", top).returncode == 0
    r = flatfs("serve", top, "--run", "exit 7", check=False)
    assert r.returncode == 7, r.stderr


def test_export_name(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    img = q.create(tmp_path / "a.qcow2", M)
    sock = tmp_path / "n.sock"
    uri = servers.flatfs(img, "--socket", str(sock), "--export-name", "vm1", tcp=True)
    assert uri == unix_uri(sock, "vm1")
    assert subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True).stdout.strip() == str(M)
    other = subprocess.run(["nbdinfo", "--size", unix_uri(sock, "vm2")], capture_output=True)
    assert other.returncode != 0


def test_a_64_tib_map_and_one_extent_requests(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    big = q.create(tmp_path / "big.qcow2", "64T")
    q.io(big, "write -P 0x11 1G 1M", "write -P 0x12 40T 64k")
    uri = servers.flatfs(big)
    assert nbd_map(uri) == flatfs_map_as_nbd(big)
    # QEMU's NBD client asks with NBD_CMD_FLAG_REQ_ONE: one extent a request.
    via_nbd = json.loads(q.img("map", "--output=json", "-f", "raw", uri).stdout)
    assert _data_zero(via_nbd) == _data_zero(qemu_map(q, big))


def _data_zero(entries: list[dict]) -> list[tuple[int, int, bool, bool]]:
    """A qemu-img map reduced to (start, length, data, zero), neighbours merged: what NBD carries."""
    out: list[tuple[int, int, bool, bool]] = []
    for e in entries:
        s, n, d, z = e["start"], e["length"], e["data"], e["zero"]
        if out and out[-1][2:] == (d, z) and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n, d, z)
        else:
            out.append((s, n, d, z))
    return out
