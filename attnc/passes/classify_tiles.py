"""`classify-tiles`: how the mask behaves over a tile, as two bool expressions of the tile box.

A tile is the box `q in [q_first, q_last]`, `kv in [kv_first, kv_last]` of one batch row `b` and head
`h` (`q_last` and `kv_last` already cut at the lengths). The pass derives, by the three-valued
interval analysis of `analysis/intervals.py`:

    derive tile_any = ...   false only if the mask is false at every position of the tile: EMPTY
    derive tile_all = ...   true only if the mask is true at every position of the tile:   FULL

and a tile where `tile_any and not tile_all` is PARTIAL (the analysis could not prove it either way; it
may still be empty or full, which `Kernel.block_map` settles exactly). Both are sound always and exact
for a single affine constraint (and for and/or of constraints on one linear form, which canonicalize
merges into one); for several constraints a few tiles may stay PARTIAL. They are evaluated for
every tile at once (`runtime/plan.py`), in O(number of tiles), or inlined into a kernel; loads of inputs
become `range_min` / `range_max` summaries, so data-dependent masks never touch (query, key) pairs.

**Requires:** a canonicalized, bound entry pattern. **Ensures:** the entry has derived values
`tile_any` and `tile_all`, canonical, over `q_first q_last kv_first kv_last b h` and the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.analysis.intervals import IntervalAnalysis
from attnc.analysis.normal_form import canonicalize
from attnc.ir.nodes import ModuleIR, Node, PatternIR, const, var

TILE_BOX = {"q": (var("q_first"), var("q_last")), "kv": (var("kv_first"), var("kv_last"))}


def classify(pattern: PatternIR) -> tuple[Node, Node]:
    """(tile_any, tile_all) of the pattern's mask over the tile box."""
    if pattern.mask is None:
        return const(True), const(True)
    truth = IntervalAnalysis(pattern, TILE_BOX).truth(pattern.mask)
    return canonicalize(truth.may, pattern), canonicalize(truth.must, pattern)


def with_derived(pattern: PatternIR, values: dict[str, Node]) -> PatternIR:
    """The pattern with these derived values set (replacing earlier ones of the same names)."""
    kept = tuple((n, v) for n, v in pattern.derived if n not in values)
    return replace(pattern, derived=kept + tuple(values.items()))


@dataclass(frozen=True)
class ClassifyTiles:
    name: ClassVar[str] = "classify-tiles"

    def run(self, module: ModuleIR) -> ModuleIR:
        tile_any, tile_all = classify(module.entry)
        return module.with_entry(with_derived(module.entry, {"tile_any": tile_any, "tile_all": tile_all}))
