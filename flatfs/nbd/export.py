"""The chain as an NBD export: reads and block status, with no nbdkit import (testable alone).

Block status maps flatfs kinds onto NBD's ``base:allocation`` flags as
qemu-nbd maps QEMU's block status: DATA is data (0); ALLOC_ZERO is allocated
but reads zeros (ZERO); ZERO and ABSENT read zeros and are not allocated
(HOLE|ZERO). Every request does bounded work: at most :data:`MAX_EXTENTS`
extents a reply, one extent with NBD_CMD_FLAG_REQ_ONE, and the composer is
lazy, so one request over a 64 TiB empty tail costs one lookup. An answer
goes a little past its request (:data:`LOOKAHEAD`), so that nbdkit's
cacheextents filter answers a client's next requests without a Python call,
and remembers the long run it stopped in, so that a walk over an empty tail
does not compose it again for each of its 4 GiB requests.
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
LOOKAHEAD = 64  # extents (and composer answers) past a request's end, for nbdkit's cacheextents filter
MAX_LENGTH = (1 << 32) - (1 << 20)  # past the request, no extent longer (NBD lengths are 32-bit)


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
        self._long_run = (0, 0, 0)  # (start, end, flags): the run the last capped answer stopped in

    def pread(self, buf: Any, offset: int) -> None:
        """Fill ``buf`` (nbdkit's buffer) from ``offset``; a range past the end is EINVAL."""
        mv = memoryview(buf).cast("B")
        if offset < 0 or offset + len(mv) > self.size:
            raise OSError(errno.EINVAL, f"read of {len(mv)} bytes at {offset:#x} past the end")
        self.chain.readinto(offset, mv)

    def extents(self, count: int, offset: int, req_one: bool) -> list[tuple[int, int, int]]:
        """(offset, length, flags) from ``offset``, neighbours of equal flags merged; one extent
        with ``req_one``. The answer covers the request (unless :data:`MAX_EXTENTS` come first) and
        goes on past its end for at most :data:`LOOKAHEAD` extents and as many answers of the
        composer (nbdkit clips the reply; its cacheextents filter answers the next requests from
        the rest). Past the request no extent grows beyond :data:`MAX_LENGTH`."""
        want = min(self.size, offset + count)
        out: list[tuple[int, int, int]] = []
        if offset < 0 or offset >= want:
            return out
        start, end, flags = self._long_run
        if start <= offset and want < end:
            # inside the long run an earlier answer stopped in (a 64 TiB empty tail, whose
            # 16,385 requests would each compose it again): one extent, as that answer's would be
            return [(offset, min(end, max(want, offset + MAX_LENGTH)) - offset, flags)]
        limit = MAX_EXTENTS
        cur_start = offset
        cur_end = offset
        cur_flags = -1
        past = 0  # the composer's answers (a layer's table each, at most) past the request
        for p in self.chain.pieces(offset, self.size):
            if cur_end >= want:
                past += 1
                if past > LOOKAHEAD:
                    break
            for s, e, k in zip(p.starts, p.ends, p.kinds):
                f = NBD_FLAGS[k]
                if f != cur_flags:
                    if cur_flags >= 0:
                        out.append((cur_start, cur_end - cur_start, cur_flags))
                        if req_one or len(out) >= limit:
                            return out
                        if cur_end >= want and limit == MAX_EXTENTS:
                            limit = len(out) + LOOKAHEAD
                    cur_start, cur_flags = s, f
                cur_end = e
                if e > want and e - cur_start > MAX_LENGTH:
                    # nbdkit 1.32 asserts (and dies) on a block-status request of 2**32 - 1
                    # bytes whose first extent is longer: none longer may reach its cache
                    self._long_run = (cur_start, e, cur_flags)
                    cur_end = max(want, cur_start + MAX_LENGTH)
                    out.append((cur_start, cur_end - cur_start, cur_flags))
                    return out
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
