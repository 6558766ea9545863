"""bench/ shares the tests' helpers deliberately: only bench/shared.py imports from ``tests``,
and only the helper modules listed in tests/helpers/__init__.py (BENCH_SHARED), which import
nothing from the tests beyond each other."""

from __future__ import annotations

import ast
from pathlib import Path

from ..helpers import BENCH_SHARED

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports, relative imports resolved inside tests/helpers."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.add("tests.helpers." + (node.module or ""))
            elif node.module:
                out.add(node.module)
    return out


def test_only_bench_shared_imports_the_tests() -> None:
    for path in sorted((ROOT / "bench").glob("*.py")):
        from_tests = sorted(m for m in _imports(path) if m == "tests" or m.startswith("tests."))
        if path.name == "shared.py":
            allowed = {f"tests.helpers.{m}" for m in BENCH_SHARED}
            assert set(from_tests) <= allowed, f"bench/shared.py imports {set(from_tests) - allowed}"
        else:
            assert not from_tests, f"bench/{path.name} imports {from_tests}: go through bench/shared.py"


def test_the_shared_helpers_import_only_each_other() -> None:
    allowed = {f"tests.helpers.{m}" for m in BENCH_SHARED}
    for name in BENCH_SHARED:
        path = ROOT / "tests" / "helpers" / f"{name}.py"
        from_tests = {m for m in _imports(path) if m.startswith("tests.")}
        assert from_tests <= allowed, (
            f"tests/helpers/{name}.py (shared with bench) imports {from_tests - allowed}"
        )
