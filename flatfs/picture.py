"""Pictures of a chain: an SVG of the flattened disk and of each layer, and a one-line strip.

Both split the disk into cells and give each cell the strongest thing found
in it: data over zeros over nothing. A cell with a single byte of data is
drawn as data, so a disk of many terabytes holding a few megabytes still
shows where they are. No dependency beyond the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

from .chain import Chain
from .errors import FlatfsError
from .extents import K_ABSENT, K_ALLOC_ZERO, K_DATA, K_ZERO, Runs
from .units import human_size

STRIP_CELLS = 64
SVG_CELLS = 960  # one cell per pixel of the bands

# what a cell shows, weakest first; ALLOC_ZERO reads as zeros
_RANK = {K_ABSENT: 0, K_ZERO: 1, K_ALLOC_ZERO: 1, K_DATA: 2}
STRIP_CHARS = ".-#"  # nothing here, zeros decided here, data

_DEPTH_COLOURS = ("#1f4e9c", "#d9782d", "#3a9a4a", "#9c3a8f", "#8c6d1f", "#2a9c9c", "#c23b3b", "#555555")
_ZERO_COLOUR = "#c8c8c8"
_EMPTY_COLOUR = "#ffffff"


def cells(runs: Iterable[tuple[int, int, int, int]], size: int, n: int) -> list[tuple[int, int]]:
    """(rank, depth) of each of ``n`` cells of a ``size``-byte disk, from (start, end, kind, depth) runs.

    A cell takes the highest rank found in it (data 2, zeros 1, nothing 0); among
    data, the shallowest depth (the layer nearest the top).
    """
    out = [(0, 0)] * n
    if size <= 0:
        return out
    for s, e, k, d in runs:
        if e <= s:
            continue
        rank = _RANK[k]
        if rank == 0:
            continue
        first = s * n // size
        last = min(n - 1, (e - 1) * n // size)
        for i in range(first, last + 1):
            r, dd = out[i]
            if rank > r or (rank == r and d < dd):
                out[i] = (rank, d)
    return out


# The exact runs of a layer are read for its strip while they number at most this many
# (a few L2 or grain tables per run window); past it the strip stays coarse.
EXACT_RUNS = 100_000


def _exact_runs(chain: Chain, depth: int, budget: int) -> Runs | None:
    """Layer ``depth``'s own runs inside where its top tables say data may be, or None once
    they pass ``budget`` runs (reading them would no longer be cheap) or a table under them is
    damaged (``info`` describes a damaged image; the reads that need the table fail)."""
    layer = chain.layers[depth]
    out = Runs()
    count = 0
    for s, e, k in chain.coarse_runs(depth):
        if k == K_ABSENT:
            out.add(s, e, k)
            continue
        pos = s
        while pos < e:
            try:
                got = layer.runs(pos, e)
            except FlatfsError:
                return None
            count += len(got)
            if count > budget:
                return None
            for rs, re_, rk in got:
                out.add(rs, re_, rk)
            pos = got.ends[len(got) - 1]
    return out


def strip_and_resolution(chain: Chain, depth: int, width: int = STRIP_CELLS) -> tuple[str, bool]:
    """Where layer ``depth`` holds data (``#`` data, ``-`` zeros, ``.`` nothing), and whether
    that is exact at the strip's resolution (False: from its top tables alone, coarse)."""
    size = chain.layers[depth].size
    exact = _exact_runs(chain, depth, EXACT_RUNS)
    runs = exact if exact is not None else chain.coarse_runs(depth)
    got = cells(((s, e, k, 0) for s, e, k in runs), size, width)
    return "".join(STRIP_CHARS[r] for r, _ in got), exact is not None


def strip(chain: Chain, depth: int, width: int = STRIP_CELLS) -> str:
    """Where layer ``depth`` holds data, as :func:`strip_and_resolution` draws it."""
    return strip_and_resolution(chain, depth, width)[0]


def _band(out: list[str], y: int, x0: int, got: list[tuple[int, int]], by_depth: bool, h: int) -> None:
    """Rectangles for runs of equal cells."""
    out.append(
        f'<rect x="{x0}" y="{y}" width="{len(got)}" height="{h}" fill="{_EMPTY_COLOUR}" stroke="#888"/>'
    )
    i = 0
    while i < len(got):
        j = i
        while j < len(got) and got[j] == got[i]:
            j += 1
        rank, depth = got[i]
        if rank:
            colour = (
                _ZERO_COLOUR
                if rank == 1
                else _DEPTH_COLOURS[depth % len(_DEPTH_COLOURS)]
                if by_depth
                else _DEPTH_COLOURS[0]
            )
            out.append(f'<rect x="{x0 + i}" y="{y}" width="{j - i}" height="{h}" fill="{colour}"/>')
        i = j


def svg(chain: Chain, width: int = SVG_CELLS) -> str:
    """The flattened disk (data coloured by the layer it comes from) and each layer alone."""
    x0, band_h, row_h = 10, 22, 48
    size = chain.size
    n_layers = len(chain.layers)
    height = 60 + row_h * (n_layers + 1) + 40
    total_w = x0 * 2 + width
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{height}" '
        f'viewBox="0 0 {total_w} {height}" font-family="sans-serif" font-size="12">',
        f"<title>flatfs map of {escape(chain.path)}</title>",
        f'<text x="{x0}" y="20" font-size="14" font-weight="bold">{escape(chain.path)}: '
        f"{human_size(size)} virtual, {n_layers} layer{'s' if n_layers != 1 else ''}</text>",
    ]
    for k in range(5):
        x = x0 + k * width // 4
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        out.append(
            f'<text x="{x}" y="40" text-anchor="{anchor}" fill="#555">{human_size(size * k / 4)}</text>'
        )
    y = 52
    flat = cells(
        ((s, e, k, p.depth) for p in chain.pieces() for s, e, k in zip(p.starts, p.ends, p.kinds)),
        size,
        width,
    )
    data = chain.data_bytes()
    out.append(f'<text x="{x0}" y="{y + 12}">flattened: {human_size(data)} of data</text>')
    _band(out, y + 18, x0, flat, True, band_h)
    for d, layer in enumerate(chain.layers):
        y += row_h
        colour = _DEPTH_COLOURS[d % len(_DEPTH_COLOURS)]
        out.append(
            f'<text x="{x0}" y="{y + 12}"><tspan fill="{colour}">\u25a0</tspan> '
            f"[{d}] {escape(layer.path)} ({escape(layer.format)}, {human_size(layer.size)})</text>"
        )
        own = cells(((s, e, k, d) for s, e, k in chain.layer_runs(d)), size, width)
        _band(out, y + 18, x0, own, True, band_h)
    y += row_h + 8
    legend = [
        ("data (colour: the layer it comes from)", _DEPTH_COLOURS[0]),
        ("zeros decided here", _ZERO_COLOUR),
        ("nothing here (the layer below, or zeros)", _EMPTY_COLOUR),
    ]
    x = x0
    for label, colour in legend:
        out.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{colour}" stroke="#888"/>')
        out.append(f'<text x="{x + 16}" y="{y + 11}">{escape(label)}</text>')
        x += 16 + 7 * len(label) + 20
    out.append("</svg>")
    return "\n".join(out) + "\n"
