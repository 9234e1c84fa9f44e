"""`classify-tiles`: how the mask behaves over a tile, as two bool expressions of the tile box.

A tile is the box `q in [q_first, q_last]`, `kv in [kv_first, kv_last]` of one batch row `b` and head
`h` (`q_last` and `kv_last` already cut at the lengths). The pass derives, by the three-valued
interval analysis of `analysis/intervals.py`, the entry's `TileClasses` (`ir/results.py`):

    tiles any = ..., all = ...
        any: false only if the mask is false at every position of the tile: EMPTY
        all: true only if the mask is true at every position of the tile:   FULL

and a tile where `any and not all` is PARTIAL (the analysis could not prove it either way; it
may still be empty or full, which `Kernel.block_map` settles exactly). Both are sound always and exact
for a single affine constraint (and for and/or of constraints on one linear form, which canonicalize
merges into one); for several constraints a few tiles may stay PARTIAL. They are evaluated for
every tile at once (`runtime/plan.py`), in O(number of tiles), or inlined into a kernel; loads of inputs
become `range_min` / `range_max` summaries, so data-dependent masks never touch (query, key) pairs.
The summaries are the exact bounds of the entries a tile reads (`analysis/summaries.py`), so a mask
whose class on a tile follows from those bounds (a block map, a per-block selection, consecutive document
ids) is classified exactly: the plan visits what `block_map` visits (`tests/test_plan_exact.py`).

**Requires:** a canonicalized, bound entry pattern. **Ensures:** the entry's `tiles` are set, both
canonical, over `q_first q_last kv_first kv_last b h` and the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.analysis.intervals import IntervalAnalysis
from attnc.analysis.normal_form import canonicalize_all, value_ranges
from attnc.ir.nodes import ModuleIR, PatternIR, const, var
from attnc.ir.results import TileClasses

TILE_BOX = {"q": (var("q_first"), var("q_last")), "kv": (var("kv_first"), var("kv_last"))}


def classify(pattern: PatternIR) -> TileClasses:
    """The tile classes of the pattern's mask over the tile box."""
    if pattern.mask is None:
        return TileClasses(any=const(True), all=const(True))
    truth = IntervalAnalysis(pattern, TILE_BOX, value_ranges(pattern)).truth(pattern.mask)
    may, must = canonicalize_all((truth.may, truth.must), pattern)  # one rewrite: they share parts
    return TileClasses(any=may, all=must)


@dataclass(frozen=True)
class ClassifyTiles:
    name: ClassVar[str] = "classify-tiles"

    def run(self, module: ModuleIR) -> ModuleIR:
        return module.with_entry(replace(module.entry, tiles=classify(module.entry)))
