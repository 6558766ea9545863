"""The nbdkit Python plugin (API version 2) that serves a flattened chain: glue only.

nbdkit's Python plugin runs this file in its embedded interpreter (the
system's libpython), not in flatfs's venv. ``flatfs serve`` passes, as plugin
parameters: the directories flatfs and its dependencies live in
(``pythonpath=``, put first on ``sys.path`` before flatfs is imported); the
``python=X.Y`` flatfs runs under (refused if the embedded one differs); the
``image=`` and every chain option as JSON (``options=``); the export's name
(``export=``); whether nbdkit stays in the foreground (``foreground=``, for
where flatfs logs); and the Unix socket and the private folder of a default
socket, removed at exit (``socket=``, ``socket_dir=``). The chain is opened
in ``get_ready``, before nbdkit forks, so a broken chain stops the server
before it daemonises.

Errors reaching a client are NBD errors with an errno (``nbdkit.set_error``);
nbdkit itself rejects requests past the end and zero-length ones.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
import threading
from typing import Any

nbdkit: Any = importlib.import_module("nbdkit")  # exists only inside nbdkit's interpreter

API_VERSION = 2
PARAMETERS = ("image", "options", "pythonpath", "python", "export", "socket", "socket_dir", "foreground")

_params: dict[str, str] = {}
_state: dict[str, Any] = {}


def _fail(message: str) -> None:
    """One line that ``flatfs serve`` shows as its error, then stop nbdkit's start-up."""
    print(f"flatfs: {message}", file=sys.stderr, flush=True)
    raise RuntimeError(message)


def config(key: str, value: str) -> None:
    if key not in PARAMETERS:
        _fail(f"the NBD plugin has no parameter {key!r}")
    _params[key] = value


def config_complete() -> None:
    want = _params.get("python", "")
    have = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if want and want != have:
        _fail(
            f"flatfs runs under Python {want} but nbdkit's Python plugin embeds Python {have}: "
            f"install flatfs for Python {have} (make install uses the system python3)"
        )
    paths = [p for p in _params.get("pythonpath", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:0] = paths
    if "image" not in _params:
        _fail("the NBD plugin needs image=PATH")
    sys.tracebacklimit = 0  # nbdkit logs a failed request's exception: one line, not a traceback


def after_fork() -> None:
    """flatfs's log lines (a bug's traceback) to stderr in the foreground, to syslog once nbdkit
    has gone into the background."""
    from flatfs.service import setup_logging

    setup_logging(False, to_syslog=_params.get("foreground") != "1")


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def get_ready() -> None:
    try:
        from flatfs.errors import FlatfsError
        from flatfs.nbd.export import Export, options_from_json
    except ImportError as exc:
        _fail(f"the NBD plugin cannot import flatfs ({exc}); pythonpath={_params.get('pythonpath', '')}")
    try:
        _state["export"] = Export(_params["image"], options_from_json(_params.get("options", "{}")))
    except FlatfsError as exc:
        _fail(str(exc))


def cleanup() -> None:
    export = _state.pop("export", None)
    if export is not None:
        export.close()
    # nbdkit leaves its Unix socket behind (and would refuse to start on it again):
    # remove it, and the private folder flatfs serve made for a default socket.
    for remove, key in ((os.unlink, "socket"), (os.rmdir, "socket_dir")):
        if _params.get(key):
            try:
                remove(_params[key])
            except OSError:
                pass


def list_exports(readonly: bool, is_tls: bool) -> list[str]:
    return [_params.get("export", "")]


def default_export(readonly: bool, is_tls: bool) -> str:
    return _params.get("export", "")


def open(readonly: bool) -> object:  # the name nbdkit calls
    name = nbdkit.export_name()
    if name != _params.get("export", ""):
        nbdkit.set_error(2)  # ENOENT: only the one export is served
        raise LookupError(f"no export named {name!r}")
    return _state["export"]


def get_size(h: Any) -> int:
    return int(h.size)


def can_write(h: Any) -> bool:
    return False


def can_multi_conn(h: Any) -> bool:
    return True  # read-only and immutable: every connection sees the same bytes


def can_extents(h: Any) -> bool:
    return True


def can_cache(h: Any) -> int:
    return int(nbdkit.CACHE_NONE)


def is_rotational(h: Any) -> bool:
    return False


_pinned = threading.local()
_pin_lock = threading.Lock()
_pin_count = [0]
PIN_MAX = 64  # worker threads whose Python thread state we keep


def _pin() -> None:
    """Keep this nbdkit worker thread's Python thread state for the thread's life.

    nbdkit's Python plugin enters Python with ``PyGILState_Ensure`` and leaves
    with ``PyGILState_Release``, which on a thread Python did not start
    creates and destroys a thread state on every request. One extra
    ``PyGILState_Ensure``, never released, keeps it (as the FUSE glue does);
    :data:`PIN_MAX` bounds what threads of closed connections leave behind.
    """
    _pinned.on = True
    with _pin_lock:
        if _pin_count[0] >= PIN_MAX:
            return
        _pin_count[0] += 1
    ctypes.pythonapi.PyGILState_Ensure()


class RequestError(Exception):
    """A failed request, as nbdkit logs it: one line, ``RequestError: <flatfs's one line>``
    (``sys.tracebacklimit`` is 0 and it is raised outside the handler, so no traceback)."""


def _failed(exc: Exception, offset: int) -> RequestError:
    """The NBD error for ``exc`` (``nbdkit.set_error``) and the exception to raise for it."""
    from flatfs.errors import FlatfsError
    from flatfs.nbd.export import error_number

    if not isinstance(exc, FlatfsError | OSError):
        # A bug: its traceback, once, through flatfs's logging (errno_for's log-once).
        from flatfs.fuse.view import errno_for

        errno_for(exc, _params.get("image"), offset)
    nbdkit.set_error(error_number(exc))
    return RequestError(str(exc) or type(exc).__name__)


def pread(h: Any, buf: Any, offset: int, flags: int) -> None:
    if not getattr(_pinned, "on", False):
        _pin()
    try:
        h.pread(buf, offset)
        return
    except Exception as exc:
        err = _failed(exc, offset)
    raise err


def extents(h: Any, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    if not getattr(_pinned, "on", False):
        _pin()
    try:
        out: list[tuple[int, int, int]] = h.extents(count, offset, bool(flags & nbdkit.FLAG_REQ_ONE))
        return out
    except Exception as exc:
        err = _failed(exc, offset)
    raise err
