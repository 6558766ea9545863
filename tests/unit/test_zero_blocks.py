"""Zero detection inside a chunk (flatfs.convert.plan.zero_blocks): the head-sampling fast path
finds exactly the all-zero blocks that a plain byte search finds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flatfs.convert.plan import _zero_blocks_by_search, zero_blocks

H = 512  # small blocks keep the examples small; the code is the same for 4 KiB

# a block is all zeros, zeros but for one byte (anywhere, the head too), or random
_BLOCK = st.one_of(
    st.just(bytes(H)),
    st.builds(
        lambda i, v: bytes(i) + bytes([v]) + bytes(H - i - 1), st.integers(0, H - 1), st.integers(1, 255)
    ),
    st.binary(min_size=H, max_size=H),
)


@given(st.lists(_BLOCK, min_size=1, max_size=24), st.integers(0, H - 1), st.sampled_from([0, 8, 24]))
def test_head_sampling_finds_the_same_zero_blocks(blocks: list[bytes], tail: int, start: int) -> None:
    buf = bytearray(bytes(start) + b"".join(blocks) + bytes(tail))
    end = len(buf)
    zh = bytes(H)
    assert zero_blocks(buf, start, end, H, zh) == _zero_blocks_by_search(buf, start, end, H, zh)


def test_zero_runs_across_heads_are_not_mistaken_for_a_zero_head() -> None:
    """Two neighbouring heads whose bytes together hold 8 zeros, but neither alone."""
    blocks = [b"\x01" * 4 + bytes(H - 4), bytes(4) + b"\x01" * (H - 4), bytes(H)]
    buf = bytearray(b"".join(blocks))
    assert zero_blocks(buf, 0, len(buf), H, bytes(H)) == bytearray([0, 0, 1])
