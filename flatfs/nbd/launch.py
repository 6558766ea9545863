"""Starting nbdkit with the flatfs plugin: checks, the command line, the URI, daemon or foreground.

``flatfs serve`` opens the chain itself first (a broken chain is its one-line
error, before anything starts), then runs ``nbdkit -r python plugin.py ...``:

* in the background, nbdkit forks once its socket listens and the plugin has
  opened the chain; its stderr goes to a file until then, so a failure
  becomes one line;
* in the foreground (``--foreground``, ``--run``), nbdkit runs as a child
  that gets the signals flatfs gets; under systemd socket activation
  (``LISTEN_FDS`` for this process) flatfs execs nbdkit, which takes the
  sockets over.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket as socketlib
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from ..chain import Chain, OpenOptions, open_chain
from ..errors import ServeError
from ..extents import CODES
from .export import EXTENT_HOLE, EXTENT_ZERO, NBD_FLAGS, options_to_json

PACKAGES = "nbdkit nbdkit-plugin-python"
PLUGIN = Path(__file__).with_name("plugin.py")
THREADS = 2  # nbdkit worker threads per connection (a multi-conn client opens more connections)
# Block status in C: flatfs serve computes the chain's extent map once (the export is immutable)
# and hands it to nbdkit's extentlist filter in an unnamed memory file (/proc/self/fd/N), so no
# block-status request enters Python. A map longer than MAX_LISTED extents is left to the plugin
# (behind nbdkit's cacheextents filter, fed by answers that reach past their request).
# blocksize-policy is not loaded: libnbd 1.14's nbdinfo then sends block-status requests of
# 2^32 - 1 bytes, and nbdkit 1.32 aborts on one whose first extent is longer (the extent list's
# holes are; docs/design.md).
LIST_FILTERS = ("extentlist",)
PLUGIN_FILTERS = ("cacheextents",)
MAX_LISTED = 1 << 20  # extents in the list (about 30 MiB of text at most)
EXTENT_NAMES = {0: "", EXTENT_ZERO: "zero", EXTENT_HOLE | EXTENT_ZERO: "hole,zero"}


class ServeRequest(NamedTuple):
    image: str
    options: OpenOptions
    socket: str | None = None
    port: int | None = None
    address: str | None = None
    export_name: str = ""
    tls_certificates: str | None = None
    tls_psk: str | None = None
    foreground: bool = False
    run: str | None = None
    pid_file: str | None = None


def find_nbdkit() -> str:
    """nbdkit's path, and a check that its Python plugin runs our Python's minor version."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise ServeError(f"nbdkit is not installed (Debian packages: {PACKAGES})")
    try:
        res = subprocess.run(
            [nbdkit, "python", "--dump-plugin"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServeError(f"{nbdkit}: cannot run it: {exc}") from None
    fields = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    if res.returncode != 0 or "python_version" not in fields:
        raise ServeError("nbdkit's Python plugin is not installed (Debian package: nbdkit-plugin-python)")
    embedded = ".".join(fields["python_version"].split(".")[:2])
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if embedded != ours:
        raise ServeError(
            f"flatfs runs under Python {ours} but nbdkit's Python plugin embeds Python {embedded}: "
            f"install flatfs for Python {embedded} (make install uses the system python3)"
        )
    return nbdkit


def python_path() -> list[str]:
    """Where the plugin finds flatfs and its dependencies: flatfs's own folder, then the
    venv's (or user's) site directories; never this interpreter's standard library, nor
    ``sys.path[0]`` (the script's folder or the current directory)."""
    out = [str(Path(__file__).resolve().parents[2])]
    base = os.path.realpath(sys.base_prefix)
    for p in sys.path[1:]:
        if p and os.path.isdir(p) and not os.path.realpath(p).startswith(base + os.sep) and p not in out:
            out.append(p)
    return out


def socket_activated() -> bool:
    return bool(os.environ.get("LISTEN_FDS")) and os.environ.get("LISTEN_PID") == str(os.getpid())


def uri(req: ServeRequest, socket: str | None) -> str:
    """What a client connects to: nbd[s]://host:port/NAME or nbd[s]+unix:///NAME?socket=PATH."""
    tls = "s" if req.tls_certificates or req.tls_psk else ""
    name = quote(req.export_name)
    if socket is not None:
        return f"nbd{tls}+unix:///{name}?socket={quote(socket)}"
    host = req.address or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"nbd{tls}://{host}:{req.port or 10809}/{name}"


def command(req: ServeRequest, nbdkit: str, socket: str | None, extent_fd: int | None = None) -> list[str]:
    """nbdkit's command line: read-only, the listening side, TLS, then the filters, the plugin and
    their parameters. ``extent_fd``: a descriptor holding the chain's extent list (extentlist)."""
    # Two worker threads a connection, not nbdkit's 16: the plugin's Python work holds the GIL, so
    # more only contend for it; with one, a cold disk had a single read in flight a connection
    # (docs/bench.md, the quiet runs at scale 1: two won both warm and cold). Parallel clients
    # open more connections: the export advertises multi-conn, and nbdcopy opens 4.
    cmd = [nbdkit, "--readonly", "--threads", str(THREADS), "--exportname", req.export_name]
    if socket_activated():
        pass  # nbdkit takes the sockets systemd passed
    elif socket is not None:
        cmd += ["--unix", socket]
    elif req.port is not None or req.address is not None:
        cmd += ["--port", str(req.port or 10809)]
        if req.address:
            cmd += ["--ipaddr", req.address]
    else:
        cmd += ["--unix", "-"]  # --run: a private socket nbdkit makes and removes
    if req.tls_certificates:
        cmd += ["--tls=require", f"--tls-certificates={req.tls_certificates}"]
    elif req.tls_psk:
        cmd += ["--tls=require", f"--tls-psk={req.tls_psk}"]
    if req.pid_file:
        cmd += ["--pidfile", req.pid_file]
    foreground = req.foreground or req.run is not None or socket_activated()
    if foreground:
        cmd.append("--foreground")
    if req.run is not None:
        cmd += ["--run", req.run]
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    cmd += [f"--filter={f}" for f in (PLUGIN_FILTERS if extent_fd is None else LIST_FILTERS)]
    cmd += [
        "python",
        str(PLUGIN),
        f"image={os.path.abspath(req.image)}",
        f"options={options_to_json(req.options)}",
        f"pythonpath={os.pathsep.join(python_path())}",
        f"python={ver}",
        f"export={req.export_name}",
        f"foreground={int(foreground)}",
    ]
    if extent_fd is not None:
        cmd.append(f"extentlist=/proc/self/fd/{extent_fd}")
    return cmd


def extent_list(chain: Chain, limit: int = MAX_LISTED) -> bytes | None:
    """The chain's extents as nbdkit's extentlist filter reads them ("offset length type" lines,
    neighbours of equal NBD flags merged), or None if there are more than ``limit``."""
    lines: list[str] = []
    start = end = 0
    flags = -1
    for e in chain.extents():
        f = NBD_FLAGS[CODES[e.kind]]
        if f == flags and e.start == end:
            end += e.length
            continue
        if flags >= 0:
            if len(lines) >= limit:
                return None
            lines.append(f"{start} {end - start} {EXTENT_NAMES[flags]}\n")
        start, end, flags = e.start, e.start + e.length, f
    if flags >= 0:
        lines.append(f"{start} {end - start} {EXTENT_NAMES[flags]}\n")
    return "".join(lines).encode()


def _extent_file(listed: bytes | None) -> int | None:
    """An unnamed memory file holding ``listed``, inheritable (nbdkit reads /proc/self/fd/N)."""
    if listed is None or not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create("flatfs-extents", 0)  # no MFD_CLOEXEC: nbdkit inherits it
    except OSError:
        return None  # no descriptor or memory for it: the plugin answers block status
    try:
        view = memoryview(listed)
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        os.close(fd)
        return None
    return fd


def _check(req: ServeRequest) -> bytes | None:
    if req.tls_certificates and req.tls_psk:
        raise ServeError("--tls-certificates and --tls-psk exclude each other")
    if req.socket is not None and (req.port is not None or req.address is not None):
        raise ServeError("--socket excludes --port and --address")
    if req.tls_certificates and not os.path.isdir(req.tls_certificates):
        raise ServeError(f"{req.tls_certificates}: not a directory of TLS certificates")
    if req.tls_psk and not os.access(req.tls_psk, os.R_OK):
        raise ServeError(f"{req.tls_psk}: cannot read the PSK file")
    if req.socket is not None:
        _clear_stale(req.socket)
    # The chain itself, so a missing parent or a corrupt header is our one line, now; and its
    # extent list for nbdkit's extentlist filter.
    with open_chain(req.image, req.options) as chain:
        return extent_list(chain)


def _clear_stale(path: str) -> None:
    """Remove a socket left by a server that was killed; refuse one in use, or anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ServeError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path}: exists and is not a socket")
    probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a dead server's
        return
    except OSError as exc:
        raise ServeError(f"{path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ServeError(f"{path}: a server already listens on this socket")


def _nbdkit_error(text: str) -> str:
    """The one line worth showing from what nbdkit said on stderr."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ours = [line[len("flatfs: ") :] for line in lines if line.startswith("flatfs: ")]
    if ours:
        return ours[-1]
    errors = [line for line in lines if "error" in line] or lines or ["nbdkit exited with an error"]
    return errors[-1].removeprefix("nbdkit: ")


def serve(req: ServeRequest) -> int:
    """Start the export; return the exit status for the CLI (the --run command's, in that mode)."""
    nbdkit = find_nbdkit()
    extent_fd = _extent_file(_check(req))
    try:
        return _serve(req, nbdkit, extent_fd)
    finally:
        if extent_fd is not None:
            os.close(extent_fd)  # nbdkit has its own copy


def _serve(req: ServeRequest, nbdkit: str, extent_fd: int | None) -> int:
    fds = () if extent_fd is None else (extent_fd,)
    private_dir: str | None = None
    socket = req.socket
    if socket is None and req.port is None and req.address is None and req.run is None:
        if not socket_activated():
            runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
            private_dir = tempfile.mkdtemp(prefix="flatfs-serve-", dir=runtime)
            socket = os.path.join(private_dir, "nbd.sock")
    if socket is not None:
        socket = os.path.abspath(socket)
    cmd = command(req, nbdkit, socket, extent_fd)
    if socket is not None:
        cmd.append(f"socket={socket}")
    if private_dir is not None:
        cmd.append(f"socket_dir={private_dir}")
    if socket_activated():
        os.execv(nbdkit, cmd)
    if req.foreground or req.run is not None:
        if req.run is None:
            print(uri(req, socket), flush=True)
        return _foreground(cmd, private_dir, fds)
    return _background(req, cmd, socket, private_dir, fds)


def _foreground(cmd: list[str], private_dir: str | None, fds: tuple[int, ...]) -> int:
    proc = subprocess.Popen(cmd, pass_fds=fds)

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    try:
        rc = proc.wait()
        return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's 128 + N
    finally:
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)


def _background(
    req: ServeRequest, cmd: list[str], socket: str | None, private_dir: str | None, fds: tuple[int, ...]
) -> int:
    if req.pid_file and os.path.isfile(req.pid_file):
        os.unlink(req.pid_file)  # an old server's: the wait below must see the new one's
    with tempfile.TemporaryFile("w+") as err:
        with open(os.devnull, "rb") as null:
            rc = subprocess.run(cmd, stdin=null, stdout=err, stderr=err, check=False, pass_fds=fds).returncode
        if rc != 0:
            if private_dir is not None:
                shutil.rmtree(private_dir, ignore_errors=True)
            err.seek(0)
            raise ServeError(_nbdkit_error(err.read()))
    if req.pid_file:
        # nbdkit's child writes it just after the parent returned: wait for it, briefly
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _pid_in(req.pid_file):
            time.sleep(0.01)
    print(uri(req, socket), flush=True)
    return 0


def _pid_in(path: str) -> bool:
    try:
        return Path(path).read_text().strip().isdigit()
    except OSError:
        return False
