"""The compilation pipeline: a flat list of passes, then the lowering to Triton (DESIGN.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from attnc.codegen.lower import build_spec
from attnc.codegen.spec import KernelSpec
from attnc.ir.nodes import ModuleIR, PatternIR, deep_recursion
from attnc.passes import (
    BindParams,
    BlockSparsify,
    Canonicalize,
    ClassifyTiles,
    DeriveRanges,
    Fuse,
    Inline,
    PassManager,
)
from attnc.passes.manager import Compiled
from attnc.runtime import cache

Value = int | float | bool
LOWER_STAGE = "lower-triton"


@dataclass(frozen=True)
class CompiledPattern:
    """Every stage of one compilation: the IR after each pass, the kernel spec and its Triton source."""

    passes: Compiled
    spec: KernelSpec
    source: cache.KernelSource

    @property
    def final(self) -> ModuleIR:
        return self.passes.final

    @property
    def entry(self) -> PatternIR:
        return self.passes.final.entry

    @property
    def stages(self) -> dict[str, str]:
        """Text of every stage by name, in pipeline order; `lower-triton` is the Triton source."""
        return {**self.passes.stages, LOWER_STAGE: self.source.text}


def compile_pattern(
    module: ModuleIR, values: tuple[tuple[str, Value], ...], print_between: TextIO | None = None
) -> CompiledPattern:
    """Run the pipeline on a pattern (the module's entry) with its parameter values."""
    pm = PassManager(print_between=print_between)
    pm.add(Inline())
    pm.add(BindParams(values))
    pm.add(Canonicalize())
    pm.add(ClassifyTiles())
    pm.add(DeriveRanges())
    pm.add(BlockSparsify())
    pm.add(Fuse())
    with deep_recursion():
        passes = pm.run(module)
        spec = build_spec(passes.final.entry)
    source = cache.source(passes.final.entry, spec)  # rendered only if neither memory nor disk has it
    pm.emit(len(pm.passes) + 1, LOWER_STAGE, passes.final.entry.name, source.text)
    return CompiledPattern(passes, spec, source)
