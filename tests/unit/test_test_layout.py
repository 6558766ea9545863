"""The test suite's own layout: shared code lives in tests/helpers/, fixtures in conftest.py.

A test module that imports another test module (or a conftest) runs that
module's tests' imports and fixtures twice and hides where a helper lives;
every shared helper belongs in tests/helpers/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
FILES = sorted(p for p in TESTS.rglob("*.py") if ".venv" not in p.parts)


def module_name(path: Path) -> str:
    rel = path.relative_to(TESTS.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_test_modules(path: Path, source: str | None = None) -> list[str]:
    """The modules inside tests/ that ``path`` (or ``source`` as if at ``path``) imports,
    relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
                names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [n for n in names if n == "tests" or n.startswith("tests.")]
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(TESTS)))
def test_imports_only_helpers(path: Path) -> None:
    bad = [m for m in imported_test_modules(path) if not m.startswith("tests.helpers")]
    assert not bad, f"{path.relative_to(TESTS)} imports {bad}: move shared code to tests/helpers/"


def test_the_rule_sees_a_test_module_import() -> None:
    """The check above fails on the imports it exists to catch."""
    fake = TESTS / "hardening" / "test_example.py"
    source = (
        "from ..conftest import Qemu\n"
        "from .test_malformed import error_line\n"
        "from .. import conftest\n"
        "from ..helpers.cli import flatfs\n"
    )
    assert imported_test_modules(fake, source) == [
        "tests.conftest",
        "tests.hardening.test_malformed",
        "tests.conftest",
        "tests.helpers.cli",
    ]


@pytest.mark.parametrize("path", sorted(TESTS.rglob("conftest.py")), ids=lambda p: str(p.relative_to(TESTS)))
def test_conftest_holds_only_fixtures(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            pytest.fail(f"{path.relative_to(TESTS)}: class {node.name} belongs in tests/helpers/")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            fixture = any("fixture" in ast.unparse(d) for d in node.decorator_list)
            assert fixture or node.name.startswith("pytest_"), (
                f"{path.relative_to(TESTS)}: {node.name}() is not a fixture; it belongs in tests/helpers/"
            )
