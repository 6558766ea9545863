"""The format plug-in interface: what a format gives the chain, and what the chain gives a format.

A format answers only for its own layer: its size, where its own data is,
and its own bytes. It never opens its parent: it names it with a
:class:`ParentRef`, and the chain resolves that name through one policy
(``flatfs.chain.open``). Files a format needs besides its image (a qcow2
external data file, VMDK extent files, a VirtualBox registry) come through
the :class:`OpenContext` the chain hands it, under the same policy.

A format module imports only this module, ``flatfs.hostio``,
``flatfs.extents`` and ``flatfs.errors`` (a test enforces it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from ..extents import Extent, Runs

PROBE_SIZE = 4096  # bytes of an image's head that probing looks at

# Where a piece of a layer's DATA lives on the host: (guest offset, length, fd, host offset).
# fd < 0: not stored as plain bytes there (compressed, encrypted, past the file's end, a
# format that does not say): read it through ``Layer.readinto``.
HostRun = tuple[int, int, int, int]


class ParentRef(NamedTuple):
    """How a layer names its parent. The chain, not the format, resolves it.

    ``candidates``: names to try, in order, as the image records them
    (qcow2: one; VHDX: relative, volume, absolute). ``loose``: the names were
    written by another operating system (Windows paths in VMDK, VHD and VHDX
    images), so the chain maps them onto the child's folder and tries the
    bare file name there last; a qcow2 name is used exactly as QEMU uses it.
    ``identity``: (kind, value) that the parent's :meth:`Layer.identity` must
    return, else the chain refuses (``--ignore-parent-id`` overrides).
    ``by_id``: (kind, value) by which the parent is found when no candidate
    name resolves (a VirtualBox snapshot names its parent only by UUID): the
    chain scans folders for files of ``format`` whose header has it.
    """

    candidates: tuple[str, ...]
    format: str | None = None
    identity: tuple[str, str] | None = None
    by_id: tuple[str, str] | None = None
    loose: bool = False

    @property
    def name(self) -> str:
        """The name as the image records it first (what ``info`` shows)."""
        return self.candidates[0] if self.candidates else ""


class HostFile(NamedTuple):
    """A host file a layer reads: to lock, to show in ``info``, to compare against a TARGET."""

    path: str
    fd: int
    role: str = "image"  # "image", "data file", "extent", ...


class OpenContext(Protocol):
    """What the chain offers a format while it opens: related files, under the chain's policy."""

    def open_related(self, referrer: str, name: str, what: str, raw_at: int | None = None) -> tuple[str, int]:
        """Open a file ``referrer`` names (resolved against its folder); return (path, fd).

        The chain owns the fd. Refused like a backing file would be: outside
        ``--backing-dir``, a special file without ``--allow-special``, a URL.
        ``raw_at``: the file is raw data read from that offset on (a FLAT extent,
        a qcow2 data file): refused if it looks like a host text file there.
        """
        ...

    def read_sidecar(self, referrer: str, name: str, max_bytes: int) -> bytes | None:
        """The bytes of a small file ``referrer`` may consult (a VirtualBox ``.vbox`` registry).

        ``name`` resolves against the referrer's folder. None, without an
        error, when the file is missing, outside ``--backing-dir``, not a
        regular file (never opened then: a FIFO would hang) or larger than
        ``max_bytes``: a sidecar is a hint, never required.
        """
        ...

    def snapshot_for(self, path: str) -> str | None:
        """The internal snapshot (``-l ID|NAME``) the image ``path`` is to be read at, or None.

        Set for the top image only, and answered once: a format with internal
        snapshots asks while it opens and reads that snapshot's tables; the
        chain refuses ``-l`` for a top image whose format never asked.
        """
        ...

    def charge(self, referrer: str, what: str, nbytes: int) -> None:
        """Count ``nbytes`` of tables a format is about to hold (a grain directory, a block
        table) against the chain-wide budget, before allocating them; raises a one-line
        error naming the limit when the chain as a whole would pass it."""
        ...


class Layer(Protocol):
    """One image file of a chain, answering only for itself."""

    path: str
    format: str
    size: int  # guest bytes
    parent: ParentRef | None

    def runs(self, start: int, end: int) -> Runs:
        """This layer's map of [start, end) in bulk: ascending, contiguous, covering it exactly."""
        ...

    def extents(self, start: int, end: int) -> Iterator[Extent]:
        """The same as :meth:`runs`, one Extent at a time (a convenience)."""
        ...

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with this layer's bytes at ``offset``. Only called for DATA ranges.

        Safe to call from many threads at once (FUSE workers, convert's readers).
        """
        ...

    def host_files(self) -> tuple[HostFile, ...]:
        """Every host file this layer reads, the image itself first."""
        ...

    def host_map(self, start: int, end: int) -> list[HostRun]:
        """Where this layer's bytes of [start, end) lie on the host, as they would be read.

        Only called for DATA ranges (as :meth:`runs` reported them). The runs are
        ascending and cover [start, end) exactly; a run whose fd is negative must be
        read through :meth:`readinto` (compressed data, bytes past a file's end).
        For copy offload: ``os.copy_file_range(fd, target, length, host, ...)`` of a
        run with fd >= 0 copies exactly what :meth:`readinto` would return. The fds
        belong to the chain (never close them). Thread-safe, like ``readinto``.
        """
        ...

    def identity(self, kind: str) -> str | None:
        """The value a child's ``ParentRef.identity`` of this ``kind`` compares to, or None."""
        ...

    def coarse_runs(self) -> Runs:
        """Where this layer may hold data, from table-level facts only (L1 entries, grain
        directories, a BAT): DATA where a table says data may lie, ABSENT where none can.
        Cheap on any disk, however fragmented; for pictures, never for reading."""
        ...

    def info(self) -> dict[str, Any]:
        """Format-specific facts for ``flatfs info`` (JSON-able, keys in qemu-img's style)."""
        ...

    def close(self) -> None: ...


class LayerBase:
    """Conveniences a format's layer class may inherit: ``extents`` from ``runs``, no identity."""

    parent: ParentRef | None = None

    def runs(self, start: int, end: int) -> Runs:
        raise NotImplementedError

    def extents(self, start: int, end: int) -> Iterator[Extent]:
        return self.runs(start, end).extents()

    def identity(self, kind: str) -> str | None:
        return None

    def host_map(self, start: int, end: int) -> list[HostRun]:
        """By default nothing is mappable: every byte is read through ``readinto``."""
        return [(start, end - start, -1, 0)] if end > start else []

    def coarse_runs(self) -> Runs:
        """By default the exact map, a window at a time; formats with tables override it."""
        size: int = getattr(self, "size", 0)
        out = Runs()
        pos = 0
        while pos < size:
            got = self.runs(pos, size)
            for s, e, k in got:
                out.add(s, e, k)
            pos = got.ends[len(got) - 1]
        return out

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


# How a format opens one of its files: (path, fd, context) -> its layer. Not to be confused with
# the chain's Opener (chain/open.py), the OpenContext a format is handed.
OpenLayer = Callable[[str, int, OpenContext], Layer]


TAIL_SIZE = 512  # what Format.probe_tail reads from a file's end


# -- writing: a target format's writer, over a sink it knows nothing about -----------

OptionValue = str | int | bool


class Sink(Protocol):
    """Where a writer's bytes land: a new file, or an existing one written in place.

    The writer never learns which: it writes its layout through ``write`` (and
    ``copy``, for data the kernel may copy or share from a source file) and the
    sink decides where and in which order the bytes become durable, and counts
    them. Buffers may be reused once ``write`` returns.
    """

    def write(self, bufs: list[memoryview], offset: int) -> None: ...

    def copy(self, src: HostFile, src_offset: int, length: int, offset: int) -> int:
        """``length`` bytes of ``src`` from ``src_offset`` to ``offset``; returns how many the
        kernel copied (or shared); the rest went through a buffer."""
        ...


class CopyRun(NamedTuple):
    """One run of a chunk of data passed by reference (copy offload, ``-C``): at ``offset`` in the
    chunk, ``length`` bytes, in ``src`` at ``host``; without ``src``, already read into the
    chunk's buffer at ``offset``."""

    offset: int
    length: int
    src: HostFile | None
    host: int


def copy_runs(sink: Sink, base: int, runs: Iterable[CopyRun], buf: memoryview | None) -> None:
    """Store ``runs`` at ``base`` + their offset: copied from their source file, or from ``buf``."""
    for off, n, src, h in runs:
        if src is not None:
            sink.copy(src, h, n, base + off)
        else:
            assert buf is not None
            sink.write([buf[off : off + n]], base + off)


class FileSink(Sink, Protocol):
    """The sink of a new TARGET, which can also make files that go with it (a VMDK's flat extent)."""

    def companion(self, name: str, size: int) -> Sink:
        """A new file ``name`` (a bare name) next to TARGET, ``size`` bytes, sparse: it appears,
        whole, just before TARGET does, and never without it."""
        ...


class ImageWriter(Protocol):
    """One target image being written: the source's data in ascending guest order, then finish.

    ``write_data`` receives only bytes that are not known zeros, in ascending,
    non-overlapping guest ranges aligned to 512 bytes (the last may end at
    the virtual size); whatever it is never given reads as zeros. ``finish``
    writes the tables and, last, the header, and returns the image's file size.
    """

    def write_data(self, offset: int, data: memoryview) -> None: ...

    def finish(self) -> int: ...


class CopyWriter(Protocol):
    """A writer that takes data by reference (copy offload, ``-C``): ``copy_data`` stores the chunk
    [offset, offset + length) of the guest from ``runs`` (what no run covers reads as zeros),
    chunks in ascending guest order; ``finish`` as :class:`ImageWriter`'s."""

    def copy_data(
        self, offset: int, length: int, runs: Sequence[CopyRun], buf: memoryview | None
    ) -> None: ...

    def finish(self) -> int: ...


class WriterOption(NamedTuple):
    """One ``-o KEY=VALUE`` key of a target writer, as ``-o help`` lists it."""

    key: str
    help: str
    default: OptionValue
    choices: tuple[str, ...] = ()  # a string from this list
    size: bool = False  # an int given as a size (512, 4k, 32M)


class TargetWriter(NamedTuple):
    """A format's writing capability: its ``-o`` keys, how to open a writer, how to measure one.

    ``open(sink, virtual_size, options, path)`` and ``measure(virtual_size,
    data_runs, options) -> (required, fully_allocated)`` take the options as
    parsed from ``-o`` (every key of ``options`` present, defaults filled in);
    each writer turns them into its own typed NamedTuple. ``data_runs`` are
    ascending (start, end) guest ranges that may hold data. The flags say
    what the format can do: ``in_place`` (``convert -n``), ``backing``
    (``-B``), ``compression`` (``-c``); ``copy`` opens a :class:`CopyWriter`
    when the format can take data by reference (``-C``); ``check(options)``
    raises a ConvertError for values the format cannot take (before any file is made).
    """

    options: tuple[WriterOption, ...]
    open: Callable[[FileSink, int, Mapping[str, OptionValue], str], ImageWriter]
    measure: Callable[[int, Iterable[tuple[int, int]], Mapping[str, OptionValue]], tuple[int, int]]
    in_place: bool = False
    backing: bool = False
    compression: bool = False
    check: Callable[[Mapping[str, OptionValue]], None] | None = None  # refuse bad values up front
    copy: Callable[[FileSink, int, Mapping[str, OptionValue], str], CopyWriter] | None = None


def block_pieces(offset: int, length: int, block: int) -> Iterator[tuple[int, int, int]]:
    """[offset, offset + length) cut at ``block`` boundaries: (block index, start, stop) each."""
    end = offset + length
    pos = offset
    while pos < end:
        b = pos // block
        stop = min(end, (b + 1) * block)
        yield b, pos, stop
        pos = stop


def blocks_touched(data_runs: Iterable[tuple[int, int]], block: int, size: int) -> int:
    """How many ``block``-sized blocks of [0, size) the ascending ``data_runs`` touch (for measure)."""
    count = 0
    last = -1
    for s, e in data_runs:
        e = min(e, size)
        if e <= s:
            continue
        a, b = max(s // block, last + 1), (e - 1) // block
        if b >= a:
            count += b - a + 1
            last = b
    return count


# -- the qcow2 target: a cluster writer that convert's qcow2 target drives -------------------


class ClusterWriter(Protocol):
    """A qcow2 writer: guest clusters fed in ascending order, metadata written as it becomes final."""

    cs: int  # cluster size
    size: int  # virtual size
    extended_l2: bool
    data_clusters: int
    compressed_clusters: int
    zero_clusters: int

    def write_clusters(
        self,
        guest_cluster: int,
        data: memoryview,
        segments: Iterable[tuple[int, int]] | None = None,
        bitmaps: Sequence[int] | None = None,
    ) -> None: ...

    def write_compressed(self, guest_cluster: int, payload: bytes) -> None: ...

    def copy_data(
        self, offset: int, length: int, runs: Sequence[CopyRun], buf: memoryview | None
    ) -> None: ...

    def write_zero(
        self, guest_cluster: int, count: int = 1, bitmaps: Sequence[int] | None = None
    ) -> None: ...

    def finish(self) -> int: ...


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
        sink: Sink,
        size: int,
        *,
        path: str,
        cluster_size: int,
        version: int,
        backing_file: str | None,
        backing_format: str | None,
        extended_l2: bool,
        compression_type: str,
    ) -> ClusterWriter: ...


class Format(NamedTuple):
    """One entry of ``FORMATS``: how to recognise and open a format, and what else it offers.

    Capabilities are optional and looked up by name by the consumers that
    need them, never imported: ``target()`` loads and returns the convert
    target writer class (``cls(sink, size, path=..., **options)``); ``identify`` reads the
    identities a ``ParentRef.by_id`` can search for from a file's head alone;
    ``suffixes`` are the file name endings such a search considers;
    ``info_rows`` name the keys of ``Layer.info()`` that the human ``info``
    prints, and their labels; ``writer()`` loads the format's
    :class:`TargetWriter` (``convert -O`` of the formats written over a sink).
    """

    name: str
    probe: Callable[[bytes], bool]  # does this head (PROBE_SIZE bytes) look like ours?
    open: OpenLayer
    aliases: tuple[str, ...] = ()
    target: Callable[[], ClusterWriterClass] | None = None
    identify: Callable[[bytes], dict[str, str]] | None = None
    suffixes: tuple[str, ...] = ()
    info_rows: tuple[tuple[str, str], ...] = ()  # (info() key, label) lines of the human `info`
    writer: Callable[[], TargetWriter] | None = None  # a target writer over a Sink (vpc, ...)
    # does this tail (a file's last TAIL_SIZE bytes, and the file's size) end an image of ours
    # that nothing at the head announces (a fixed VHD)? Trusted without -f only when the
    # file name ends with one of ``suffixes``.
    probe_tail: Callable[[bytes, int], bool] | None = None
    # loads the class of a growing overlay (``mount --overlay``): cls(path, size, backing, backing_format)
    # with write(offset, data, fill), zero(offset, length, fill), flush(), close()
    overlay: Callable[[], Any] | None = None
