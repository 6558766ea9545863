"""The chain as an NBD export: reads and block status, with no nbdkit import (testable alone).

Block status maps flatfs kinds onto NBD's ``base:allocation`` flags as
qemu-nbd maps QEMU's block status: DATA is data (0); ALLOC_ZERO is allocated
but reads zeros (ZERO); ZERO and ABSENT read zeros and are not allocated
(HOLE|ZERO). Every request does bounded work: at most :data:`MAX_EXTENTS`
extents a reply, one extent with NBD_CMD_FLAG_REQ_ONE, and the composer is
lazy, so one request over a 64 TiB empty tail costs one lookup.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from typing import Any

from ..chain import Chain, OpenOptions, open_chain
from ..errors import FlatfsError
from ..extents import K_ABSENT, K_ALLOC_ZERO, K_DATA, K_ZERO

EXTENT_HOLE = 1  # NBD_STATE_HOLE
EXTENT_ZERO = 2  # NBD_STATE_ZERO
# kind code -> NBD base:allocation flags
NBD_FLAGS = {
    K_DATA: 0,
    K_ALLOC_ZERO: EXTENT_ZERO,
    K_ZERO: EXTENT_HOLE | EXTENT_ZERO,
    K_ABSENT: EXTENT_HOLE | EXTENT_ZERO,
}
MAX_EXTENTS = 4096  # a reply's extents; the client asks again from where it stops


def options_to_json(options: OpenOptions) -> str:
    """Every field of ``options``, whatever fields it has today, as JSON (the plugin's parameter)."""
    return json.dumps(options._asdict())


def options_from_json(text: str) -> OpenOptions:
    """The inverse of :func:`options_to_json`: lists become tuples again; unknown fields are refused."""
    raw: dict[str, Any] = json.loads(text)
    unknown = set(raw) - set(OpenOptions._fields)
    if unknown:
        raise FlatfsError(f"the NBD plugin does not know the chain options {sorted(unknown)}")
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return OpenOptions(**fields)


class Export:
    """One open chain, shared by every connection: immutable, so reads run in parallel."""

    def __init__(self, image: str, options: OpenOptions) -> None:
        # Clients read what they ask for, in large requests: no readahead on the chain's files.
        self.chain: Chain = open_chain(image, options._replace(readahead=False))
        self.size = self.chain.size

    def pread(self, buf: Any, offset: int) -> None:
        """Fill ``buf`` (nbdkit's buffer) from ``offset``; a range past the end is EINVAL."""
        mv = memoryview(buf).cast("B")
        if offset < 0 or offset + len(mv) > self.size:
            raise OSError(errno.EINVAL, f"read of {len(mv)} bytes at {offset:#x} past the end")
        self.chain.readinto(offset, mv)

    def extents(self, count: int, offset: int, req_one: bool) -> list[tuple[int, int, int]]:
        """(offset, length, flags) covering [offset, ...) from ``offset``, neighbours of equal flags
        merged; one extent with ``req_one``; at most :data:`MAX_EXTENTS` otherwise."""
        end = min(self.size, offset + count)
        out: list[tuple[int, int, int]] = []
        if offset < 0 or offset >= end:
            return out
        cur_start = offset
        cur_end = offset
        cur_flags = -1
        for p in self.chain.pieces(offset, end):
            for s, e, k in zip(p.starts, p.ends, p.kinds):
                f = NBD_FLAGS[k]
                if f == cur_flags and s == cur_end:
                    cur_end = e
                    continue
                if cur_flags >= 0:
                    out.append((cur_start, cur_end - cur_start, cur_flags))
                    if req_one or len(out) >= MAX_EXTENTS:
                        return out
                cur_start, cur_end, cur_flags = s, e, f
        if cur_flags >= 0:
            out.append((cur_start, cur_end - cur_start, cur_flags))
        return out

    def close(self) -> None:
        self.chain.close()


def error_number(exc: BaseException) -> int:
    """The errno an NBD client gets for ``exc`` (EIO unless the error carries one)."""
    if isinstance(exc, FlatfsError):
        return getattr(exc, "errno", None) or errno.EIO
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return exc.errno
    return errno.EIO


def split_path(value: str) -> Sequence[str]:
    """The plugin's ``pythonpath=`` parameter: directories joined by ``os.pathsep``."""
    return [p for p in value.split(os.pathsep) if p]
