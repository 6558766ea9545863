"""Running a server as a daemon, for any flatfs server: no FUSE code here.

* :func:`daemonize` forks; the child calls ``setsid()``, points stdio at
  ``/dev/null``, logs to syslog and serves; the parent waits on a readiness pipe
  for one line from the child, ``ready`` or ``error <message>``, and returns a
  :class:`Startup` that says which (or the child's exit status if it died first).
* :func:`sd_notify` speaks systemd's notify protocol without libsystemd.
* :class:`StderrCapture` points fd 2 at a pipe while a library that complains on
  stderr starts, so its last line can become our one-line error.
* :func:`setup_logging`: the ``flatfs`` loggers to stderr, or to syslog once daemonised.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NamedTuple

from .errors import FlatfsError

log = logging.getLogger("flatfs.service")


def setup_logging(debug: bool, to_syslog: bool, library_loggers: tuple[str, ...] = ()) -> None:
    """Send the ``flatfs`` loggers to stderr (``flatfs: <message>``), or to syslog when daemonised.

    Without ``/dev/log`` a daemon logs nowhere. ``library_loggers`` (a library's
    per-request lines, noise unless ``debug``) get the same handler at WARNING,
    INFO with ``debug``.
    """
    root = logging.getLogger("flatfs")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if to_syslog and os.path.exists("/dev/log"):
        try:
            from logging.handlers import SysLogHandler  # only a daemon logs to syslog

            h: logging.Handler = SysLogHandler(address="/dev/log")
            h.setFormatter(logging.Formatter(f"flatfs[{os.getpid()}]: %(message)s"))
        except OSError:
            h = logging.NullHandler()
    elif to_syslog:
        h = logging.NullHandler()
    else:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("flatfs: %(message)s"))
    root.handlers[:] = [h]
    for name in library_loggers:
        lib = logging.getLogger(name)
        lib.setLevel(logging.INFO if debug else logging.WARNING)
        lib.handlers[:] = [h]
        lib.propagate = False


class StderrCapture:
    """Point fd 2 at a pipe while a library starts (libfuse mounting), so its one-line
    complaints ("fuse: unknown option(s): ...") can become our one-line error.

    Lines are kept (the last few) and, with ``echo``, copied to the real stderr.
    """

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.lines: list[str] = []
        self._saved: int | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        sys.stderr.flush()
        r, w = os.pipe()
        self._saved = os.dup(2)
        os.dup2(w, 2)
        os.close(w)
        self._thread = threading.Thread(target=self._pump, args=(r,), name="flatfs-stderr", daemon=True)
        self._thread.start()

    def _pump(self, r: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                if self.echo:
                    with self._lock:  # stop() swaps fd 2 back under this lock
                        try:
                            os.write(2 if self._saved is None else self._saved, chunk)
                        except OSError:
                            pass
                pending += chunk
                *done, pending = pending.split(b"\n")
                with self._lock:
                    self.lines.extend(x.decode("utf-8", "replace") for x in done)
                    del self.lines[:-50]
        finally:
            if pending:
                with self._lock:
                    self.lines.append(pending.decode("utf-8", "replace"))
            os.close(r)

    def stop(self) -> None:
        """Give fd 2 back. Idempotent; safe from any thread."""
        with self._lock:
            saved, self._saved = self._saved, None
            if saved is None:
                return
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def last_line(self) -> str | None:
        with self._lock:
            for line in reversed(self.lines):
                line = line.strip()
                if line and not line.startswith("Traceback"):
                    return line
        return None


def sd_notify(address: str | None, message: str) -> None:
    """Send one sd_notify datagram (``READY=1`` ...) to ``address``; no libsystemd needed.

    ``@name`` is an abstract socket; only AF_UNIX addresses are supported.
    """
    if not address:
        return
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        log.warning("NOTIFY_SOCKET=%s: unsupported address, not notifying", address)
        return
    try:
        import socket  # only under systemd (NOTIFY_SOCKET)

        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(target)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)


class Startup(NamedTuple):
    """How a daemon's start ended, as its parent saw it.

    ``ready``: it is serving. Otherwise ``interrupted`` (^C in the parent: the
    daemon was let finish its start, then undone), or ``error`` (the daemon's
    one-line error), or neither: it exited first, with exit code ``status``.
    """

    ready: bool
    interrupted: bool = False
    error: str | None = None
    status: int | None = None
    notes: tuple[str, ...] = ()  # warnings the daemon sent with "ready", for the user's terminal


def daemonize(
    serve: Callable[[Callable[..., None]], None],
    undo: Callable[[], None],
    library_loggers: tuple[str, ...] = (),
) -> Startup:
    """Fork; the child serves, the parent waits for "ready" or the child's one-line error.

    The child runs ``serve(ready)``, which calls ``ready(*notes)`` once it serves (each
    note a warning the parent hands back in :attr:`Startup.notes`) and
    returns when done; a FlatfsError from it becomes the parent's error line.
    On ^C the parent waits for the child's line and, if it was "ready", calls
    ``undo()`` to take the service down again: nothing is left behind.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()  # O_CLOEXEC: fusermount3 & co. never hold it
    pid = os.fork()
    if pid == 0:  # --- the daemon
        code = 1
        try:
            os.close(r)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            setup_logging(False, to_syslog=True, library_loggers=library_loggers)

            def ready(*notes: str) -> None:
                lines = "".join(f"note {' '.join(n.split())}\n" for n in notes)
                os.write(w, lines.encode("utf-8", "replace") + b"ready\n")
                os.close(w)

            serve(ready)
            code = 0
        except FlatfsError as exc:
            _report(w, str(exc))
        except BaseException as exc:  # a bug: say so in one line, keep the rest for syslog
            log.error("%s", traceback.format_exc())
            _report(w, f"internal error: {exc!r}")
        finally:
            os._exit(code)
    # --- the parent
    os.close(w)
    msg = bytearray()

    notes: list[str] = []

    def wait_line() -> str:
        """The next line that is not a note ("note <warning>" lines are kept in ``notes``)."""
        while True:
            while b"\n" not in msg:
                chunk = os.read(r, 4096)
                if not chunk:
                    text = msg.decode("utf-8", "replace").strip()
                    msg.clear()
                    return text
                msg.extend(chunk)
            line, _, rest = bytes(msg).partition(b"\n")
            msg[:] = rest
            text = line.decode("utf-8", "replace").strip()
            if not text.startswith("note "):
                return text
            notes.append(text[len("note ") :])

    try:
        text = wait_line()
    except KeyboardInterrupt:
        # The daemon is in its own session and did not see the ^C. Let it
        # finish, then take it down again: nothing is left behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if wait_line() == "ready":
            undo()
        os.waitpid(pid, 0)
        return Startup(ready=False, interrupted=True)
    finally:
        os.close(r)
    if text == "ready":
        return Startup(ready=True, notes=tuple(notes))
    _, status = os.waitpid(pid, 0)
    if text.startswith("error "):
        return Startup(ready=False, error=text[len("error ") :])
    return Startup(ready=False, status=os.waitstatus_to_exitcode(status))


def _report(w: int, message: str) -> None:
    try:
        os.write(w, ("error " + " ".join(message.split()) + "\n").encode("utf-8", "replace"))
    except OSError:
        pass
