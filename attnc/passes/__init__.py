"""Compiler passes over `ModuleIR`, one per file, and the manager that runs them."""

from attnc.passes.bind_params import BindParams
from attnc.passes.block_sparsify import BlockSparsify
from attnc.passes.canonicalize import Canonicalize
from attnc.passes.classify_tiles import ClassifyTiles
from attnc.passes.derive_ranges import DeriveRanges
from attnc.passes.fuse import Fuse
from attnc.passes.inline import Inline
from attnc.passes.manager import Pass, PassManager

PASSES: dict[str, type] = {
    Inline.name: Inline,
    BindParams.name: BindParams,
    Canonicalize.name: Canonicalize,
    ClassifyTiles.name: ClassifyTiles,
    DeriveRanges.name: DeriveRanges,
    BlockSparsify.name: BlockSparsify,
    Fuse.name: Fuse,
}
"""Every pass by its CLI name, in pipeline order."""

__all__ = [
    "PASSES",
    "BindParams",
    "BlockSparsify",
    "Canonicalize",
    "ClassifyTiles",
    "DeriveRanges",
    "Fuse",
    "Inline",
    "Pass",
    "PassManager",
]
