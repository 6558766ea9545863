"""The qcow2 target writer, reached through the format table, never imported.

``flatfs.formats.lookup("qcow2").target()`` is the class that writes a qcow2
image front to back; these protocols name the part of it convert uses, so
convert is typed without importing a format module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, cast

from .. import formats
from ..errors import ConvertError


class WriteIO(Protocol):
    """Where a writer's bytes go."""

    def write(self, bufs: list[memoryview], offset: int) -> None: ...


class ClusterWriter(Protocol):
    """A qcow2 writer: guest clusters fed in ascending order, metadata written as it becomes final."""

    cs: int  # cluster size
    size: int  # virtual size
    extended_l2: bool
    bytes_written: int
    data_clusters: int
    compressed_clusters: int
    zero_clusters: int

    @property
    def file_size(self) -> int: ...

    def write_clusters(
        self,
        guest_cluster: int,
        data: memoryview,
        segments: Iterable[tuple[int, int]] | None = None,
        bitmaps: Sequence[int] | None = None,
    ) -> None: ...

    def write_compressed(self, guest_cluster: int, payload: bytes) -> None: ...

    def place_clusters(
        self, guest_cluster: int, n: int, fill: Callable[[int], None] | None = None
    ) -> int: ...

    def write_zero(
        self, guest_cluster: int, count: int = 1, bitmaps: Sequence[int] | None = None
    ) -> None: ...

    def finish(self) -> None: ...


class ClusterWriterClass(Protocol):
    """The writer class itself: its facts, and its constructor."""

    DEFAULT_CLUSTER_SIZE: int
    SUBCLUSTERS: int  # per cluster, with extended L2 entries
    ALL_ALLOCATED: int  # the extended L2 bitmap with every subcluster allocated

    def check_cluster_size(self, cluster_size: int) -> int: ...

    def check_options(
        self, cluster_size: int, version: int, extended_l2: bool, compression_type: str, path: str = ...
    ) -> None: ...

    def entries_per_l2(self, cluster_size: int, extended_l2: bool) -> int: ...

    def layout_bytes(
        self, size: int, cluster_size: int, extended_l2: bool, data_clusters: int, l2_tables: int
    ) -> int: ...

    def __call__(
        self,
        fd: int,
        size: int,
        *,
        path: str,
        cluster_size: int,
        version: int,
        backing_file: str | None,
        backing_format: str | None,
        extended_l2: bool,
        compression_type: str,
        io: WriteIO,
        resize: bool = True,
    ) -> ClusterWriter: ...


def qcow2_writer() -> ClusterWriterClass:
    """The qcow2 format's ``target`` capability."""
    fmt = formats.lookup("qcow2")
    if fmt is None or fmt.target is None:
        raise ConvertError("qcow2 targets are not available")
    return cast(ClusterWriterClass, fmt.target())
