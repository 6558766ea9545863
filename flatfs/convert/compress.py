"""Compressing qcow2 clusters, the way QEMU does (zlib raw deflate, 4 KiB window; or zstd)."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable

ZLIB_LEVEL = 6  # what QEMU uses (Z_DEFAULT_COMPRESSION)
ZLIB_WBITS = -12  # raw deflate, 4 KiB window: what qcow2 requires
ZSTD_LEVEL = 3  # QEMU's zstd default

Compress = Callable[[bytes | memoryview], bytes]

_tls = threading.local()  # one zstd compressor per thread (they are not thread-safe)


def _zlib(data: bytes | memoryview) -> bytes:
    return zlib.compress(data, ZLIB_LEVEL, ZLIB_WBITS)


def compressor(kind: str) -> Compress:
    """The compress function of ``kind`` ("zlib" or "zstd") for the calling thread."""
    if kind == "zlib":
        return _zlib
    c: Compress | None = getattr(_tls, "zstd", None)
    if c is None:
        import zstandard

        c = _tls.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress
    return c


def compress_clusters(kind: str, cluster_size: int, clusters: list[memoryview]) -> list[bytes | None]:
    """Compress each cluster; None where compression would not make it smaller.

    A short last cluster is padded with zeros to a whole cluster first.
    """
    comp = compressor(kind)
    out: list[bytes | None] = []
    for mv in clusters:
        data: bytes | memoryview = (
            mv if len(mv) == cluster_size else bytes(mv) + bytes(cluster_size - len(mv))
        )
        p = comp(data)
        out.append(p if len(p) < cluster_size else None)
    return out
