"""The flatfs command line: one click group, its commands added explicitly.

The single error boundary: a FlatfsError becomes one line on stderr and exit
status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

import click

from .. import __version__, formats
from .common import FlatfsGroup
from .convert import convert, measure
from .inspect import info, map_
from .mount import mount, umount
from .serve import serve


@click.group(
    cls=FlatfsGroup,
    # from FORMATS, so that a format added later is named here too
    help=f"Inspect and flatten VM disk image chains ({', '.join(formats.names())}).",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Each command's --help is short; the manual is flatfs(1), flatfs-mount(1), "
    "flatfs-convert(1), flatfs-measure(1), flatfs-serve(1).",
)
@click.version_option(version=__version__, prog_name="flatfs")
def main() -> None:
    """The flatfs command group (its help is built from FORMATS above)."""


for _command in (info, map_, mount, umount, convert, measure, serve):
    main.add_command(_command)


def run() -> None:
    """The console script: ``main``, then leave without tearing the interpreter down.

    Once a command has returned, everything it wrote is closed or flushed
    (a converted TARGET is fsynced and renamed before the command returns);
    the interpreter's teardown (module cleanup, collecting every object) only
    costs time, about 12 ms of every command on the development machine.
    Exceptions that escape click (bugs) keep the normal path and their traceback.
    """
    try:
        main(prog_name="flatfs")
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"), as the interpreter would: the message, status 1
            print(exc.code, file=sys.stderr)
            code = 1
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # a closed pipe (`flatfs map | head`): nothing left to say
            pass
        except (OSError, ValueError) as exc:  # a full disk under `flatfs map > file`: the output is short
            if code == 0 and stream is sys.stdout:
                print(f"flatfs: cannot write the output: {getattr(exc, 'strerror', exc)}", file=sys.stderr)
            code = code or 1
    os._exit(code)
