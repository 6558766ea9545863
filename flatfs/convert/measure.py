"""``flatfs measure``: how big a converted target will be, from the chain's metadata alone.

For a qcow2 target the figure is flatfs's own layout (header cluster, data
clusters, the L2 tables they need, the L1 table, refcount blocks and table),
counting every guest cluster that touches a DATA extent of the source (and,
with a backing chain, of the backing: those clusters may become zero or data
clusters). Nothing is read but the metadata: the data is not scanned for
zeros, so ``required`` is an upper bound of what ``convert`` writes (it
leaves all-zero clusters out; compressed clusters are smaller). qemu-img
measure works the same way from allocation status, but counts every L2 table
of a fully allocated image, so its ``required`` is larger by the L2 tables a
sparse image does not need.

For a raw target both figures are the virtual size (what a device or a
non-sparse file must hold), as qemu-img measure says.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..chain import Chain
from .archive import archive_size
from .capability import qcow2_writer
from .options import ConvertOptions, target_writer, validate, writer_values


@dataclass(frozen=True)
class Measure:
    required: int  # bytes the target needs at most for this source
    fully_allocated: int  # bytes with every guest cluster allocated
    bitmaps: int | None = None  # persistent bitmaps copied (never: flatfs copies none); None: not shown

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"required": self.required, "fully-allocated": self.fully_allocated}
        if self.bitmaps is not None:
            d["bitmaps"] = self.bitmaps
        return d


def _cluster_runs(chain: Chain, end: int, cs: int) -> Iterator[tuple[int, int]]:
    """[first, last + 1) guest clusters touching DATA of ``chain`` below ``end``, ascending, merged."""
    data = (e for e in chain.extents(0, end) if e.kind.must_read)
    return _merged((e.start // cs, -(-min(e.start + e.length, end) // cs)) for e in data)


def _union(a: Iterator[tuple[int, int]], b: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    import heapq

    return _merged(heapq.merge(a, b))


def _merged(runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Ascending [start, end) runs with overlapping and touching ones joined."""
    cur_a = cur_b = -1
    for s, t in runs:
        if cur_b >= s:
            cur_b = max(cur_b, t)
            continue
        if cur_b > cur_a:
            yield cur_a, cur_b
        cur_a, cur_b = s, t
    if cur_b > cur_a:
        yield cur_a, cur_b


def measure_chain(source: Chain, options: ConvertOptions, backing: Chain | None = None) -> Measure:
    """What converting ``source`` with ``options`` (over ``backing``) needs; reads metadata only."""
    options = validate(options)
    writer = target_writer(options.target_format)
    size = -(-source.size // options.size_align) * options.size_align
    if options.package == "tar.gz":
        stored = list(_merged((e.start, e.start + e.length) for e in source.extents() if e.kind.must_read))
        return Measure(archive_size(stored, size), archive_size([(0, size)], size))
    if writer is not None:
        runs = _merged((e.start, e.start + e.length) for e in source.extents() if e.kind.must_read)
        values = writer_values(options.target_format, writer, options.target_options)
        return Measure(*writer.measure(size, runs, values))
    qcow2 = qcow2_writer()
    cs = options.cluster_size or qcow2.DEFAULT_CLUSTER_SIZE
    extl2 = options.extended_l2
    size = -(-source.size // 512) * 512
    per_table = qcow2.entries_per_l2(cs, extl2)
    runs = _cluster_runs(source, size, cs)
    if backing is not None:
        runs = _union(runs, _cluster_runs(backing, min(backing.size, size), cs))
    data = tables = 0
    last_table = -1
    for a, b in runs:
        data += b - a
        first = a // per_table
        final = (b - 1) // per_table
        tables += final - max(first, last_table + 1) + 1
        last_table = final
    nclusters = -(-size // cs)
    required = qcow2.layout_bytes(size, cs, extl2, data, tables)
    full = qcow2.layout_bytes(size, cs, extl2, nclusters, -(-nclusters // per_table))
    bitmaps = 0 if options.compat != "0.10" and source.layers[0].format == "qcow2" else None
    return Measure(required, full, bitmaps)
