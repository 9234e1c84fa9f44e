"""Context parallelism: one long sequence over several ranks, balanced by the exact tile costs of its
pattern (`docs/distributed.md`; DESIGN.md section 3, "Context parallel")."""

from attnc.distributed.census import Census, tile_census
from attnc.distributed.context_parallel import ContextParallel
from attnc.distributed.layout import CostModel, Layout, Part

__all__ = ["Census", "ContextParallel", "CostModel", "Layout", "Part", "tile_census"]
