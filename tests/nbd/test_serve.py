"""`flatfs serve` against real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-nbd as the reference.

Block status must equal `flatfs map` and what `qemu-nbd -r` says of the same
chain; nbdcopy must copy the flattened bytes and keep the holes; qemu-img
must read the export over a Unix socket and over TCP with TLS; 8 clients
read random ranges at once, each checked against qemu-img's own conversion.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

from ..helpers.chains import qemu_chain
from ..helpers.images import M
from ..helpers.nbd import Servers, dd, flatfs_map_as_nbd, free_port, nbd_map, x509_dirs
from ..helpers.needs import require
from ..helpers.qemu import Qemu, data_extents, qemu_map


def _prealloc_chain(q: Qemu, d: Path) -> Path:
    """A qcow2 with preallocated metadata: allocated clusters that read zeros (flatfs's ALLOC_ZERO)."""
    q.create(d / "meta.qcow2", 16 * M, opts="preallocation=metadata")
    q.io(d / "meta.qcow2", "write -P 0x51 1M 64k", "write -z 9M 512k", "discard 12M 1M")
    return d / "meta.qcow2"


def test_block_status_equals_flatfs_map_and_qemu_nbd(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    for top, fmt in ((qemu_chain(q, tmp_path), "qcow2"), (_prealloc_chain(q, tmp_path), "qcow2")):
        ours = nbd_map(servers.flatfs(top))
        assert ours == flatfs_map_as_nbd(top)
        assert ours == nbd_map(servers.qemu_nbd(top, fmt))
        assert len({t for _, _, t in ours}) >= 2, ours  # the chain has data and holes


def test_nbdcopy_copies_the_bytes_and_keeps_the_holes(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    top = qemu_chain(q, tmp_path)
    ref = tmp_path / "ref.raw"
    q.img("convert", "-O", "raw", top, ref)
    out = tmp_path / "out.raw"
    subprocess.run(["nbdcopy", servers.flatfs(top), str(out)], check=True)
    assert out.read_bytes() == ref.read_bytes()
    data = sum(n for _, n in data_extents(qemu_map(q, top)))
    assert os.stat(out).st_blocks * 512 <= data + M, "nbdcopy wrote the holes"


def test_qemu_img_over_unix_socket_and_tcp_with_tls(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    top = qemu_chain(q, tmp_path)
    assert q.img("compare", "-f", "raw", servers.flatfs(top), "-F", "qcow2", top).returncode == 0
    # TLS with a pre-shared key (psktool's file format: USER:HEXKEY), served on TCP.
    keys = tmp_path / "psk"
    keys.mkdir()
    (keys / "keys.psk").write_text(f"flatfs:{os.urandom(32).hex()}\n")
    port = free_port()
    uri = servers.flatfs(
        top, "--address", "127.0.0.1", "--port", str(port), "--tls-psk", str(keys / "keys.psk"), tcp=True
    )
    assert uri == f"nbds://127.0.0.1:{port}/"
    creds = f"tls-creds-psk,id=tls0,endpoint=client,dir={keys},username=flatfs"
    src = f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"
    out = tmp_path / "tls.raw"
    r = q.img("convert", "--object", creds, "--image-opts", src, "-O", "raw", out, check=False)
    assert r.returncode == 0, r.stderr
    assert q.img("compare", "-f", "raw", out, "-F", "qcow2", top).returncode == 0
    # Without TLS the server refuses: --tls-psk means --tls=require.
    plain = q.img(
        "convert", "-f", "raw", f"nbd://127.0.0.1:{port}/", "-O", "raw", tmp_path / "no.raw", check=False
    )
    assert plain.returncode != 0


def test_tcp_with_x509_certificates(servers: Servers, tmp_path: Path) -> None:
    require(shutil.which("openssl") is not None, "openssl is not installed")
    q = Qemu()
    top = qemu_chain(q, tmp_path)
    server_pki, client_pki = x509_dirs(tmp_path)
    port = free_port()
    args = ["--address", "127.0.0.1", "--port", str(port), "--tls-certificates", str(server_pki)]
    uri = servers.flatfs(top, *args, tcp=True)
    assert uri == f"nbds://127.0.0.1:{port}/"
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={client_pki}"
    out = tmp_path / "x509.raw"
    src = f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"
    r = q.img("convert", "--object", creds, "--image-opts", src, "-O", "raw", out, check=False)
    assert r.returncode == 0, r.stderr
    assert q.img("compare", "-f", "raw", out, "-F", "qcow2", top).returncode == 0
    # libnbd's clients verify the server against the same CA
    assert nbd_map(f"{uri}?tls-certificates={client_pki}") == flatfs_map_as_nbd(top)


def test_eight_clients_read_random_ranges_at_once(servers: Servers, tmp_path: Path) -> None:
    q = Qemu()
    top = qemu_chain(q, tmp_path)
    ref = tmp_path / "ref.raw"
    q.img("convert", "-O", "raw", top, ref)
    want = ref.read_bytes()
    uri = servers.flatfs(top)
    rnd = random.Random(22)
    jobs = []
    for i in range(8):
        off = rnd.randrange(0, len(want) // 4096 - 512) * 4096
        length = rnd.randrange(1, 512) * 4096
        jobs.append((off, length, tmp_path / f"c{i}.raw", dd(uri, off, length, tmp_path / f"c{i}.raw")))
    for off, length, out, proc in jobs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.read_bytes() == want[off : off + length], (off, length)
