"""The shape of the code: import rules, and a format added with one table entry.

- A format imports only ``formats.api``, ``formats.common`` (what formats share:
  the table cache, byte-order arrays), ``hostio``, ``extents``, ``errors`` and
  its own folder; nothing but a format imports ``formats.common``; the core
  (formats, chain, extents, errors, hostio) imports neither FUSE nor click.
- A consumer (convert, fuse, cli, readers, service) never imports a format
  module: it reaches a format's capabilities through the ``FORMATS`` table.
- A new format is one module plus one entry in ``FORMATS``: a toy format
  defined here opens, composes over a raw parent and reads through the chain
  and the CLI, with nothing else changed.
"""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

import flatfs.formats
from flatfs.chain import OpenOptions, open_chain
from flatfs.cli import main
from flatfs.errors import CorruptImage
from flatfs.extents import K_ABSENT, K_DATA, K_ZERO, Kind, Runs
from flatfs.formats.api import Format, HostFile, LayerBase, OpenContext, ParentRef
from flatfs.hostio import host_size, pread_exact

PKG = Path(flatfs.__file__).parent
SHARED = "flatfs.formats.common"  # what formats have in common, for formats only
# flatfs.deflate: zlib with the incompressible-data test, no flatfs import (writers and convert use it)
FORMAT_ALLOWED = {
    "flatfs.formats.api",
    SHARED,
    "flatfs.hostio",
    "flatfs.extents",
    "flatfs.errors",
    "flatfs.deflate",
}
CORE = ("formats", "chain", "extents.py", "errors.py", "hostio.py", "partitions.py", "deflate.py")
CONSUMERS = ("convert", "fuse", "cli", "readers.py", "service.py", "nbd")


def _imports(path: Path) -> set[str]:
    """Absolute names of the flatfs modules (and of every top-level package) ``path`` imports."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            # `from . import qcow2` names a module too
            out.update(f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}"))
    return out


def _is_module(name: str) -> bool:
    path = PKG.parent.joinpath(*name.split("."))
    return name.startswith("flatfs.") and (path.with_suffix(".py").exists() or path.is_dir())


def _files(*roots: str) -> list[Path]:
    out: list[Path] = []
    for r in roots:
        p = PKG / r
        if p.is_dir():
            out.extend(sorted(p.rglob("*.py")))
        elif p.exists():
            out.append(p)
    return out


def _format_dirs() -> list[Path]:
    base = PKG / "formats"
    return [p for p in sorted(base.iterdir()) if p.suffix == ".py" or (p / "__init__.py").exists()]


def test_a_format_imports_only_the_api_host_io_extents_and_errors() -> None:
    bad = []
    for entry in _format_dirs():
        if entry.name in ("__init__.py", "api.py", "common.py"):
            continue
        own = "flatfs.formats." + entry.stem
        for f in [entry] if entry.is_file() else sorted(entry.rglob("*.py")):
            for mod in _imports(f):
                if not mod.startswith("flatfs"):
                    continue
                if mod in FORMAT_ALLOWED or mod == own or mod.startswith(own + "."):
                    continue
                bad.append(f"{f.relative_to(PKG)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_core_imports_neither_fuse_nor_click() -> None:
    bad = [
        f"{f.relative_to(PKG)} imports {mod}"
        for f in _files(*CORE)
        for mod in _imports(f)
        if mod.split(".")[0] in ("click", "mfusepy", "fuse") or mod.startswith(("flatfs.fuse", "flatfs.cli"))
    ]
    assert not bad, "\n".join(bad)


def test_a_consumer_never_imports_a_format_module() -> None:
    bad = [
        f"{f.relative_to(PKG)} imports {mod}"
        for f in _files(*CONSUMERS)
        for mod in _imports(f)
        if mod.startswith("flatfs.formats.") and mod != "flatfs.formats.api"
    ]
    assert not bad, "\n".join(bad)


def test_only_a_format_imports_what_formats_share() -> None:
    users = {
        f.relative_to(PKG).as_posix()
        for f in sorted(PKG.rglob("*.py"))
        if SHARED in _imports(f) or any(m.startswith(SHARED + ".") for m in _imports(f))
    }
    assert users, "no format uses flatfs.formats.common: the rule checks nothing"
    not_formats = ("__init__.py", "api.py", "common.py")
    bad = sorted(u for u in users if not u.startswith("formats/") or u.split("/")[1] in not_formats)
    assert not bad, "\n".join(f"{u} imports {SHARED} (only a format may)" for u in bad)


def test_the_import_rule_can_fail(tmp_path: Path) -> None:
    # The checker sees relative imports of a format module from a consumer.
    fake = PKG / "convert" / "__init__.py" if (PKG / "convert").is_dir() else PKG / "convert.py"
    assert any(m.startswith("flatfs.") for m in _imports(fake))
    probe = PKG / "cli" / "_import_rule_probe.py"
    probe.write_text("from ..formats.qcow2 import spec\n")
    try:
        assert "flatfs.formats.qcow2" in _imports(probe)
    finally:
        probe.unlink()


# -- a toy format, added the way every format is added ------------------------------

TOY_MAGIC = b"TOYDISK\0"
TOY_BLOCK = 4096
_TOY_HEAD = struct.Struct(">8sQQ64s16s")  # magic, size, blocks, parent name, parent format
# then one map byte per block (0 absent, 1 zero, 2 data), then the data blocks in order
_TOY_KIND = {0: K_ABSENT, 1: K_ZERO, 2: K_DATA}


class ToyLayer(LayerBase):
    format = "toy"

    def __init__(self, path: str, fd: int, ctx: OpenContext) -> None:
        self.path, self.fd = path, fd
        head = bytearray(_TOY_HEAD.size)
        pread_exact(fd, path, memoryview(head), 0)
        magic, self.size, nblocks, parent, pfmt = _TOY_HEAD.unpack(head)
        if nblocks != -(-self.size // TOY_BLOCK):
            raise CorruptImage(path, f"{nblocks} blocks do not cover {self.size} bytes", 8)
        self.map = bytearray(nblocks)
        pread_exact(fd, path, memoryview(self.map), _TOY_HEAD.size)
        self.data_at: dict[int, int] = {}
        at = _TOY_HEAD.size + nblocks
        for i, k in enumerate(self.map):
            if k == 2:
                self.data_at[i] = at
                at += TOY_BLOCK
        if at > host_size(fd, path):
            raise CorruptImage(path, "data blocks run past the end of the file")
        name = parent.rstrip(b"\0").decode()
        self.parent = ParentRef((name,), pfmt.rstrip(b"\0").decode() or None) if name else None

    def runs(self, start: int, end: int) -> Runs:
        out = Runs()
        for i in range(start // TOY_BLOCK, -(-end // TOY_BLOCK)):
            s, e = max(start, i * TOY_BLOCK), min(end, (i + 1) * TOY_BLOCK)
            out.add(s, e, _TOY_KIND[self.map[i]])
        return out

    def readinto(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            i, rel = divmod(offset + done, TOY_BLOCK)
            n = min(len(buf) - done, TOY_BLOCK - rel)
            pread_exact(self.fd, self.path, buf[done : done + n], self.data_at[i] + rel)
            done += n

    def host_files(self) -> tuple[HostFile, ...]:
        return (HostFile(self.path, self.fd),)


TOY = Format("toy", probe=lambda head: head.startswith(TOY_MAGIC), open=ToyLayer)


def write_toy(
    path: Path, size: int, blocks: dict[int, bytes | None], parent: str = "", pfmt: str = ""
) -> None:
    """``blocks``: index -> 4 KiB of data, or None for a zero block; the others are absent."""
    nblocks = -(-size // TOY_BLOCK)
    kinds = bytes(0 if i not in blocks else 1 if blocks[i] is None else 2 for i in range(nblocks))
    data = b"".join(blocks[i] or b"" for i in sorted(blocks) if blocks[i] is not None)
    head = _TOY_HEAD.pack(TOY_MAGIC, size, nblocks, parent.encode(), pfmt.encode())
    path.write_bytes(head + kinds + data)


@pytest.fixture
def with_toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flatfs.formats, "FORMATS", (*flatfs.formats.FORMATS, TOY))


def test_a_format_is_one_entry_in_the_table(tmp_path: Path, with_toy: None) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * (4 * TOY_BLOCK))
    top = tmp_path / "top.toy"
    write_toy(top, 4 * TOY_BLOCK, {1: b"T" * TOY_BLOCK, 2: None}, parent="base.raw", pfmt="raw")
    with open_chain(top, OpenOptions(force_share=True)) as chain:
        assert [layer.format for layer in chain.layers] == ["toy", "raw"]
        assert (
            chain.pread(0, 4 * TOY_BLOCK)
            == b"B" * TOY_BLOCK + b"T" * TOY_BLOCK + bytes(TOY_BLOCK) + b"B" * TOY_BLOCK
        )
        kinds = [(e.start // TOY_BLOCK, e.kind, e.depth) for e in chain.extents()]
        assert kinds == [(0, Kind.DATA, 1), (1, Kind.DATA, 0), (2, Kind.ZERO, 0), (3, Kind.DATA, 1)]
    res = CliRunner().invoke(main, ["map", "--output=json", "-U", str(top)])
    assert res.exit_code == 0, res.output
    assert '"depth": 0' in res.output and '"depth": 1' in res.output


def test_without_its_entry_the_toy_format_is_raw_bytes(tmp_path: Path) -> None:
    top = tmp_path / "top.toy"
    write_toy(top, TOY_BLOCK, {0: b"T" * TOY_BLOCK})
    with open_chain(top, OpenOptions(force_share=True)) as chain:
        assert chain.format == "raw"


def test_a_broken_toy_image_is_one_line(tmp_path: Path, with_toy: None) -> None:
    top = tmp_path / "top.toy"
    write_toy(top, TOY_BLOCK, {0: b"T" * TOY_BLOCK})
    raw = bytearray(top.read_bytes())
    raw[16:24] = (9).to_bytes(8, "big")
    top.write_bytes(bytes(raw))
    res = CliRunner().invoke(main, ["info", "-U", str(top)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [f"flatfs: {top}: 9 blocks do not cover 4096 bytes (at 0x8)"]
