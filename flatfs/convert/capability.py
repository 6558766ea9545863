"""The qcow2 target writer, reached through the format table, never imported.

``flatfs.formats.lookup("qcow2").target()`` is the class that writes a qcow2
image front to back; ``ClusterWriterClass`` and ``ClusterWriter`` in
``formats/api.py`` name the part of it convert uses, so convert is typed (no
``cast``) without importing a format module.
"""

from __future__ import annotations

from .. import formats
from ..errors import ConvertError
from ..formats.api import ClusterWriter, ClusterWriterClass

__all__ = ["ClusterWriter", "ClusterWriterClass", "qcow2_writer"]


def qcow2_writer() -> ClusterWriterClass:
    """The qcow2 format's ``target`` capability."""
    fmt = formats.lookup("qcow2")
    if fmt is None or fmt.target is None:
        raise ConvertError("qcow2 targets are not available")
    return fmt.target()
