"""The compilation pipeline, as a flat list of passes (see DESIGN.md section 4)."""

from __future__ import annotations

from typing import TextIO

from attnc.ir.nodes import ModuleIR, deep_recursion
from attnc.passes import (
    BindParams,
    BlockSparsify,
    Canonicalize,
    ClassifyTiles,
    DeriveRanges,
    Inline,
    PassManager,
)
from attnc.passes.manager import Compiled

Value = int | float | bool


def compile_pattern(
    module: ModuleIR, values: tuple[tuple[str, Value], ...], print_between: TextIO | None = None
) -> Compiled:
    """Run the pipeline on a pattern (the module's entry) with its parameter values."""
    pm = PassManager(print_between=print_between)
    pm.add(Inline())
    pm.add(BindParams(values))
    pm.add(Canonicalize())
    pm.add(ClassifyTiles())
    pm.add(DeriveRanges())
    pm.add(BlockSparsify())
    with deep_recursion():
        return pm.run(module)
