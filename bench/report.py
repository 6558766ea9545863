"""Figures, targets, and the table (terminal and markdown)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Figure:
    key: str
    label: str
    unit: str  # "s", "ms", "MiB", "MiB/s", "x"
    flatfs: float | None
    qemu: float | None
    qemu_note: str = ""  # e.g. "first 120 calls" when QEMU's side was capped
    # target: ("ratio<=", 1.0) | ("ratio>=", 1.0) | ("flatfs<=", 80) | None
    target: tuple[str, float] | None = None
    note: str = ""
    flatfs_range: tuple[float, float] | None = None  # (min, max) over the pairs
    qemu_range: tuple[float, float] | None = None
    pair_ratio: float | None = None  # median of flatfs/QEMU within each pair

    @property
    def ratio(self) -> float | None:
        if self.flatfs is None or self.qemu is None or self.qemu == 0:
            return None
        return self.flatfs / self.qemu

    @property
    def result(self) -> str:
        if self.target is None:
            return ""
        kind, limit = self.target
        value = self.flatfs if kind.startswith("flatfs") else self.ratio
        if value is None:
            return "n/a"
        ok = value <= limit if kind.endswith("<=") else value >= limit
        return "PASS" if ok else "MISS"

    @property
    def target_text(self) -> str:
        if self.target is None:
            return ""
        kind, limit = self.target
        op = "≤" if kind.endswith("<=") else "≥"
        if kind.startswith("flatfs"):
            return f"flatfs {op} {fmt(limit, self.unit)}"
        return f"{op} {limit:.2f}×"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["result"] = self.result
        d["target"] = self.target_text or None
        return d


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if unit == "ms":
        return f"{v:.3f} ms" if v < 1 else (f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms")
    if unit == "MiB":
        return f"{v:.1f} MiB"
    if unit == "MiB/s":
        return f"{v:.0f} MiB/s"
    if unit == "x":
        return f"{v:.3f}"
    if unit == "s/GiB":
        return f"{v:.2f} s/GiB"
    return f"{v:g} {unit}"


def rows(figs: list[Figure]) -> list[list[str]]:
    out = []
    for f in figs:
        q = fmt(f.qemu, f.unit) + (f" ({f.qemu_note})" if f.qemu_note else "")
        r = "—" if f.ratio is None else f"{f.ratio:.2f}×"
        out.append([f.label, fmt(f.flatfs, f.unit), q, r, f.target_text, f.result])
    return out


HEADER = ["figure", "flatfs", "QEMU", "flatfs/QEMU", "target", "result"]


def table_text(figs: list[Figure]) -> str:
    data = [HEADER] + rows(figs)
    widths = [max(len(r[i]) for r in data) for i in range(len(HEADER))]
    lines = []
    for k, r in enumerate(data):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def spread_markdown(figs: list[Figure]) -> str:
    """min–max over the pairs, for the figures that are medians of samples."""

    def rng(r: tuple[float, float] | None, unit: str) -> str:
        return "—" if r is None else f"{fmt(r[0], unit)} – {fmt(r[1], unit)}"

    lines = [
        "| figure | flatfs min – max | QEMU min – max | median of the pair ratios |",
        "|---|---|---|---|",
    ]
    for f in figs:
        if f.flatfs_range is None and f.qemu_range is None:
            continue
        pr = "—" if f.pair_ratio is None else f"{f.pair_ratio:.2f}×"
        lines.append(f"| {f.label} | {rng(f.flatfs_range, f.unit)} | {rng(f.qemu_range, f.unit)} | {pr} |")
    return "\n".join(lines)


def table_markdown(figs: list[Figure]) -> str:
    data = rows(figs)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in data:
        r = [c.replace("|", "\\|") for c in r]
        r[-1] = f"**{r[-1]}**" if r[-1] else ""
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)
