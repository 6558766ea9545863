"""NBD servers for the tests: `flatfs serve` (through the CLI) and `qemu-nbd -r`, always stopped.

Every server is started with a pid file in the test's own folder and stopped
by that pid (SIGTERM, then SIGKILL), never by name: other tests run servers
at the same time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .mounts import wait_gone


def have_nbd_tools() -> str | None:
    """Why the NBD tests cannot run here, or None: nbdkit, its Python plugin, libnbd's tools."""
    for tool, package in (("nbdkit", "nbdkit"), ("nbdinfo", "libnbd-bin"), ("nbdcopy", "libnbd-bin")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    r = subprocess.run(["nbdkit", "python", "--dump-plugin"], capture_output=True, text=True)
    if r.returncode != 0:
        return "nbdkit's Python plugin is not installed (Debian package nbdkit-plugin-python)"
    return None


def unix_uri(socket: Path, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={socket}"


class Servers:
    """Start `flatfs serve` and `qemu-nbd` in ``folder``; :meth:`close` stops every one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pid_files: list[Path] = []
        self.n = 0

    def _next(self, kind: str) -> tuple[Path, Path]:
        self.n += 1
        pid_file = self.folder / f"{kind}{self.n}.pid"
        self.pid_files.append(pid_file)
        return self.folder / f"{kind}{self.n}.sock", pid_file

    def flatfs(self, image: Path, *args: str, tcp: bool = False) -> str:
        """`flatfs serve IMAGE ARGS` in the background on a socket of ours; returns the URI it printed."""
        sock, pid_file = self._next("flatfs")
        where = [] if tcp else ["--socket", str(sock)]
        r = subprocess.run(
            [sys.executable, "-m", "flatfs", "serve", *where, "--pid-file", str(pid_file), *args, str(image)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1]

    def qemu_nbd(self, image: Path, fmt: str = "qcow2") -> str:
        """`qemu-nbd -r` of the same chain, on a socket of ours (persistent: -t)."""
        sock, pid_file = self._next("qemu")
        args = ["-r", "-t", "-f", fmt, "-k", str(sock), f"--pid-file={pid_file}", "--fork", str(image)]
        subprocess.run(["qemu-nbd", *args], check=True)
        return unix_uri(sock)

    def pid(self, uri_or_index: int = -1) -> int:
        return int(self.pid_files[uri_or_index].read_text())

    def close(self) -> None:
        for pid_file in self.pid_files:
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            stop(pid)


def stop(pid: int) -> None:
    """SIGTERM, and SIGKILL if it has not gone within the deadline (a hang is a failure elsewhere)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_gone(pid, 20):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_gone(pid, 20)


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """`nbdinfo --map --json`: (offset, length, type) with NBD's HOLE=1 and ZERO=2 bits."""
    out = subprocess.run(["nbdinfo", "--map", "--json", uri], capture_output=True, text=True, check=True)
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out.stdout)]


def flatfs_map_as_nbd(image: Path, *args: str) -> list[tuple[int, int, int]]:
    """`flatfs map --output=json`, as the NBD block status a server should give for it:
    data -> 0, allocated zeros -> ZERO, zeros and unallocated -> HOLE|ZERO; neighbours merged."""
    out = subprocess.run(
        [sys.executable, "-m", "flatfs", "map", "--output=json", *args, str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    merged: list[tuple[int, int, int]] = []
    for e in json.loads(out.stdout):
        t = (0 if e["data"] else 1) | (2 if e["zero"] else 0)
        if merged and merged[-1][2] == t:
            o, n, _ = merged[-1]
            merged[-1] = (o, n + e["length"], t)
        else:
            merged.append((e["start"], e["length"], t))
    return merged


def wait_for(path: Path, within: float = 20.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def dd(uri: str, offset: int, length: int, out: Path, **kw: Any) -> subprocess.Popen[bytes]:
    """A client reading [offset, offset+length) of the export into ``out`` (qemu-img dd, 4 KiB blocks)."""
    assert offset % 4096 == 0 and length % 4096 == 0
    skip, count = offset // 4096, (offset + length) // 4096  # qemu-img dd's count includes the skipped
    args = ["-f", "raw", "-O", "raw", "bs=4096", f"if={uri}", f"of={out}", f"skip={skip}", f"count={count}"]
    return subprocess.Popen(["qemu-img", "dd", *args], stderr=subprocess.PIPE, **kw)


class RawRequests:
    """Requests no well-behaved client sends (a read past the end, a zero-length read), over a
    bare fixed-newstyle handshake: NBD_OPT_GO, then simple replies (protocol.md in the NBD
    project). Only to see the server answer them with an NBD error and keep serving."""

    def __init__(self, socket_path: Path, name: str = "") -> None:
        import socket as socketlib

        self.sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(socket_path))
        magic, opt, _flags = struct.unpack(">8s8sH", self._recv(18))
        assert (magic, opt) == (b"NBDMAGIC", b"IHAVEOPT")
        self.sock.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
        data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
        self.sock.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)  # NBD_OPT_GO
        self.size = -1
        while True:
            _m, _o, rtype, n = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(n)
            assert not rtype & 0x80000000, f"NBD_OPT_GO refused: {rtype:#x}"
            if rtype == 3 and struct.unpack(">H", payload[:2])[0] == 0:  # NBD_REP_INFO, NBD_INFO_EXPORT
                self.size = struct.unpack(">Q", payload[2:10])[0]
            if rtype == 1:  # NBD_REP_ACK
                break
        self.handle = 0

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the server closed the connection"
            out += chunk
        return out

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        """NBD_CMD_READ: (the reply's error, the data when there is no error)."""
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, self.handle, offset, length))
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        assert magic == 0x67446698 and handle == self.handle
        return error, (b"" if error else self._recv(length))

    def close(self) -> None:
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, self.handle, 0, 0))  # NBD_CMD_DISC
        self.sock.close()


def serve_runs(flatfs_bin: Path, folder: Path) -> str:
    """`flatfs serve --run` from an installed flatfs (a PREFIX, a wheel's venv), outside the
    checkout: nbdkit must find the plugin and flatfs from there. Returns what the client printed."""
    img = folder / "served.raw"
    img.write_bytes(b"\x5a" * 65536)
    r = subprocess.run(
        [str(flatfs_bin), "serve", str(img), "--run", 'nbdinfo --size "$uri"'],
        capture_output=True,
        text=True,
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def x509_dirs(folder: Path) -> tuple[Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl): the server's folder
    in nbdkit's layout (ca-cert.pem, server-cert.pem, server-key.pem) and a client's (the CA)."""
    server, client = folder / "server-pki", folder / "client-pki"
    server.mkdir()
    client.mkdir()

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=server, check=True, capture_output=True)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
         "-days", "2", "-subj", "/CN=flatfs test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1")  # fmt: skip
    (server / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
         "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    (client / "ca-cert.pem").write_bytes((server / "ca-cert.pem").read_bytes())
    return server, client


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's choice), for a server of this test."""
    import socket as socketlib

    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
