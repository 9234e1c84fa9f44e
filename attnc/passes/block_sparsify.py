"""`block-sparsify`: decide how a kernel finds its tiles, and what metadata a launch needs.

The entry's `Sparsity` (`ir/results.py`):

- `sparsity analytic`: `derive-ranges` found closed-form ranges; the kernel computes its own loop bounds
  from them and no metadata tensor exists.
- `sparsity metadata`, `metadata[b]`, `metadata[h]`, `metadata[b, h]`: everything else. At launch,
  `runtime/plan.py` evaluates the `tiles` predicates for every tile (in O(number of tiles), inputs read
  through their range summaries) and stores the non-empty key tiles of each query tile, PARTIAL and FULL
  apart, and the transpose, in compressed rows. They are built per batch row and/or head only when the
  tile predicates depend on `b` / `h` (through the mask or through the inputs it loads); otherwise one
  set serves every batch row and head.

**Requires:** `classify-tiles` and `derive-ranges` have run. **Ensures:** the entry's `sparsity` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.errors import InternalError
from attnc.ir.nodes import ModuleIR, PatternIR
from attnc.ir.results import METADATA_AXES, Sparsity


def sparsity(pattern: PatternIR) -> Sparsity:
    if pattern.ranges is not None:
        return Sparsity("analytic")
    if pattern.tiles is None:
        raise InternalError("block-sparsify runs after classify-tiles")
    used = pattern.tiles.any.free | pattern.tiles.all.free
    return Sparsity("metadata", tuple(axis for axis in METADATA_AXES if axis in used))


@dataclass(frozen=True)
class BlockSparsify:
    name: ClassVar[str] = "block-sparsify"

    def run(self, module: ModuleIR) -> ModuleIR:
        return module.with_entry(replace(module.entry, sparsity=sparsity(module.entry)))
