"""The package's floors: no module imports one on a higher floor (DESIGN.md section 1's layering).

Every `import` in every module of `attnc/` counts, those inside functions too: a lazy import upward is
still an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "attnc"

# Floor of each module, by the longest prefix of its dotted name. Equal floors may import each other.
FLOORS = {
    "attnc.errors": 0,
    "attnc.config": 0,  # the environment variables, read by every floor above
    "attnc.reserved": 0,
    "attnc.version": 0,
    "attnc.dsl.source": 0,
    "attnc.ir": 1,
    "attnc.analysis": 2,
    "attnc.dsl": 3,
    "attnc.passes": 3,
    "attnc.oracle": 3,
    "attnc.codegen": 4,
    "attnc.runtime": 5,
    "attnc.compiler": 6,
    "attnc.api": 6,
    "attnc": 7,  # the package facade, the CLI, run/show/demo/bench and the testing helpers
}


def floor(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise AssertionError(f"{module} is not under attnc")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every attnc module the file imports; `from attnc.ir import fold` imports the
    module `attnc.ir.fold`, `from attnc.ir.nodes import Node` the module `attnc.ir.nodes`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "attnc"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "attnc":
                continue
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.append((node.lineno, target if _is_module(target) else node.module))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_imports_a_higher_floor(path: Path) -> None:
    importer = module_name(path)
    upward = [
        f"line {line}: {target} (floor {floor(target)})"
        for line, target in imports(path)
        if floor(target) > floor(importer)
    ]
    assert not upward, f"{importer} (floor {floor(importer)}) imports upward: {upward}"


def test_floors_are_checked_on_real_imports() -> None:
    """The walker sees top-level and function-level imports, and `from package import module`."""
    found = dict((t, n) for n, t in imports(PACKAGE / "runtime" / "launch.py"))
    assert "attnc.oracle" in found and "attnc.runtime.plan" in found
    assert floor("attnc.analysis.value_ranges") == 2 and floor("attnc.cli") == 7
    assert floor("attnc.dsl.source") == 0 and floor("attnc.dsl.lower") == 3
