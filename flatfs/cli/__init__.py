"""The flatfs command line: one click group, its commands added explicitly.

The single error boundary: a FlatfsError becomes one line on stderr and exit
status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import click

from .. import __version__
from .common import FlatfsGroup
from .convert import convert, measure
from .inspect import info, map_
from .mount import mount, umount


@click.group(
    cls=FlatfsGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Each command's --help is short; the manual is flatfs(1), flatfs-mount(1), "
    "flatfs-convert(1), flatfs-measure(1).",
)
@click.version_option(version=__version__, prog_name="flatfs")
def main() -> None:
    """Inspect and flatten VM disk image chains (qcow2, raw)."""


for _command in (info, map_, mount, umount, convert, measure):
    main.add_command(_command)
