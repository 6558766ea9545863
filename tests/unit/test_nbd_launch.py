"""flatfs serve's nbdkit command line, URIs and start-up errors, without starting nbdkit."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from flatfs.chain import OpenOptions
from flatfs.errors import ServeError
from flatfs.nbd import launch
from flatfs.nbd.launch import ServeRequest


def _req(**kw: object) -> ServeRequest:
    return ServeRequest(image="vm.qcow2", options=OpenOptions(search_dirs=("a b",)), **kw)


def test_uris() -> None:
    assert launch.uri(_req(), "/run/x y.sock") == "nbd+unix:///?socket=/run/x%20y.sock"
    assert launch.uri(_req(export_name="vm 1", tls_psk="k"), "/s") == "nbds+unix:///vm%201?socket=/s"
    assert launch.uri(_req(port=10810), None) == "nbd://localhost:10810/"
    assert launch.uri(_req(address="::1", tls_certificates="d"), None) == "nbds://[::1]:10809/"


def test_command_is_read_only_and_carries_every_chain_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    cmd = launch.command(_req(tls_psk="/k.psk", pid_file="/p"), "/usr/sbin/nbdkit", "/s.sock")
    assert cmd[:2] == ["/usr/sbin/nbdkit", "--readonly"]
    assert cmd[cmd.index("--unix") + 1] == "/s.sock" and "--tls=require" in cmd and "--tls-psk=/k.psk" in cmd
    assert "--foreground" not in cmd and cmd[cmd.index("--threads") + 1] == str(launch.THREADS)
    params = dict(a.split("=", 1) for a in cmd[cmd.index("python") + 2 :])
    assert set(params) <= {"image", "options", "pythonpath", "python", "export", "foreground"}
    # nbdkit's filters stand before the plugin's name: cacheextents without an extent list,
    # extentlist (and its file) with one
    assert cmd[cmd.index("python") - 1] == "--filter=cacheextents"
    listed = launch.command(_req(), "/usr/sbin/nbdkit", "/s.sock", extent_fd=7)
    assert listed[listed.index("python") - 1] == "--filter=extentlist"
    assert listed[-1] == "extentlist=/proc/self/fd/7" and "--filter=cacheextents" not in listed
    assert not any("blocksize" in a for a in cmd + listed)
    assert json.loads(params["options"])["search_dirs"] == ["a b"]
    assert params["foreground"] == "0" and params["pythonpath"].split(":")[0] == str(
        Path(launch.__file__).parents[2]
    )
    run = launch.command(_req(run="true"), "nbdkit", None)
    assert (
        run[run.index("--unix") + 1] == "-"
        and "--foreground" in run
        and run[run.index("--run") + 1] == "true"
    )
    tcp = launch.command(_req(address="127.0.0.1"), "nbdkit", None)
    assert tcp[tcp.index("--port") + 1] == "10809" and tcp[tcp.index("--ipaddr") + 1] == "127.0.0.1"


def test_socket_activation_passes_no_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    cmd = launch.command(_req(foreground=True), "nbdkit", None)
    assert not {"--unix", "--port", "--ipaddr"} & set(cmd) and "--foreground" in cmd


def test_nbdkit_error_is_one_line() -> None:
    text = "nbdkit: python: error: config_complete: RuntimeError\nflatfs: vm.qcow2: bad header (at 0x0)\n"
    assert launch._nbdkit_error(text) == "vm.qcow2: bad header (at 0x0)"
    assert (
        launch._nbdkit_error("nbdkit: error: socket error: Address in use\n")
        == "error: socket error: Address in use"
    )
    assert launch._nbdkit_error("") == "nbdkit exited with an error"


def test_stale_sockets(tmp_path: Path) -> None:
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()  # bound, never listening: what a killed server leaves
    launch._clear_stale(str(dead))
    assert not dead.exists()
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(live))
        s.listen()
        with pytest.raises(ServeError, match="already listens"):
            launch._clear_stale(str(live))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ServeError, match="not a socket"):
        launch._clear_stale(str(tmp_path / "file"))


def test_extent_list_is_the_chain_map_in_nbd_flags(tmp_path: Path) -> None:
    """What nbdkit's extentlist filter gets: the chain's extents, neighbours of equal NBD flags
    merged (zero and absent are both hole,zero), covering the disk; over the limit, nothing."""
    from flatfs.chain import open_chain

    from ..helpers.images import M, write_sparse_raw

    raw = write_sparse_raw(tmp_path / "d.raw", 8 * M, [(0, b"x" * 65536), (3 * M, b"y" * 4096)])
    with open_chain(str(raw)) as chain:
        text = launch.extent_list(chain)
        assert text is not None
        rows = [line.split(" ") for line in text.decode().splitlines()]
        assert [(int(a), int(b), t) for a, b, t in rows] == [
            (0, 65536, ""),
            (65536, 3 * M - 65536, "hole,zero"),
            (3 * M, 4096, ""),
            (3 * M + 4096, 5 * M - 4096, "hole,zero"),
        ]
        assert launch.extent_list(chain, limit=2) is None


def test_no_memory_file_leaves_block_status_to_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """memfd_create failing (no descriptors left, no memory) is no error: the plugin answers."""

    def refuse(name: str, flags: int = 0) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(launch.os, "memfd_create", refuse)
    assert launch._extent_file(b"0 512 \n") is None
    monkeypatch.undo()
    fd = launch._extent_file(b"0 512 \n")
    assert fd is not None
    try:
        assert os.pread(fd, 16, 0) == b"0 512 \n"
    finally:
        os.close(fd)
