"""The folders show the flow, and the imports keep to it (docs/architecture.md, "Import rules").

Read from the source with `ast`, so a lazy import inside a function counts as much as one at the
top of a module.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "receiver"

#: The floors, bottom to top. A module may import its own floor and the ones below, never above.
#: `web` and `jobs` share a floor and never import each other: they meet in the ledger.
FLOORS = [
    {"errors", "batch_status", "cooperative", "logs"},
    {"config", "signature", "layout", "retry"},
    {"manifest", "storage", "batchrouter", "results", "emulator"},
    {"ledger"},
    {"metrics"},
    {"web", "jobs"},
    {"cli", "app", "gunicorn_conf", "__main__"},
]
FLOOR_OF = {name: level for level, names in enumerate(FLOORS) for name in names}


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "emulator" not in p.relative_to(PACKAGE).parts)


def _part(path: pathlib.Path) -> str:
    """The top-level part of the package a file belongs to: `web`, `ledger`, `config`, …"""
    first = path.relative_to(PACKAGE).parts[0]
    return first.removesuffix(".py")


def _imported_parts(path: pathlib.Path) -> set[str]:
    """The top-level parts of `receiver` that a file imports, relative or absolute."""
    tree = ast.parse(path.read_text(), str(path))
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for receiver/x.py, 1 for receiver/web/x.py
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level <= depth:
                    continue  # inside its own part (from . import x, from .x import y)
                base = (node.module or "").split(".")[0]
                names = [base] if base else [alias.name for alias in node.names]
            elif (node.module or "").startswith("receiver."):
                names = [node.module.split(".")[1]]  # type: ignore[union-attr]
            elif node.module == "receiver":
                names = [alias.name for alias in node.names]
            else:
                continue
            found.update(names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("receiver."):
                    found.add(alias.name.split(".")[1])
    return {name for name in found if name != "__version__"}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_upward_or_across(path: pathlib.Path) -> None:
    part = _part(path)
    if part == "__init__":
        return
    floor = FLOOR_OF[part]
    for imported in _imported_parts(path) - {part}:
        assert imported in FLOOR_OF, f"{imported!r} is not placed on a floor in this test"
        assert FLOOR_OF[imported] <= floor, f"{part} imports {imported}, a floor above it"
        assert not {part, imported} == {"web", "jobs"}, "web and jobs meet only in the ledger"


def test_the_emulator_stands_apart() -> None:
    """The emulator is BatchRouter's side: it shares only the signature with the receiver."""
    for path in (PACKAGE / "emulator").rglob("*.py"):
        assert _imported_parts(path) - {"emulator"} <= {"signature"}, path


def test_every_part_is_on_a_floor() -> None:
    parts = {_part(p) for p in _modules()} - {"__init__"}
    assert parts <= set(FLOOR_OF), parts - set(FLOOR_OF)
