"""What each pass needs of its input IR, checked before it runs when the pipeline is entered from IR text.

Each pass's docstring states its **Requires:**; this module is those statements as predicates over a
module, one place for all passes (and for `lower-triton`, the codegen stage), so that `attnc opt` can
refuse `block-sparsify` on IR that `classify-tiles` has not seen with an error naming what is missing
and the pass that provides it, instead of failing somewhere inside the pass. A requirement whose
provider ran earlier in the same run holds by that pass's **Ensures:** and is not checked again (the
driver forgets a provider when a pass earlier in the pipeline runs after it, see `compiler.optimize`).

A result the IR shows (tile classes, sparsity) is checked by looking at it. A property the IR does not
record (canonical form; "no closed-form ranges exist") is checked as a fixed point: running the
providing pass would change nothing, which the golden tests check for every pass.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from attnc.errors import AttnError
from attnc.ir.nodes import ModuleIR, Op
from attnc.passes.bind_params import BindParams
from attnc.passes.block_sparsify import BlockSparsify
from attnc.passes.canonicalize import Canonicalize
from attnc.passes.classify_tiles import ClassifyTiles
from attnc.passes.derive_ranges import DeriveRanges
from attnc.passes.fuse import Fuse
from attnc.passes.inline import Inline

LOWER_STAGE = "lower-triton"
"""The last stage: the kernel spec and its Triton source (`codegen/lower.py`), not a pass over IR."""


class PipelineError(AttnError):
    """A request to the pass driver that cannot run: an unknown pass name, or a pass whose input lacks
    what it requires."""


@dataclass(frozen=True)
class Requirement:
    """A property of a pass's input: what it is (for the message), the pass that provides it (None for
    one that no pass provides: the input must come from earlier in the pipeline), and the predicate
    that says whether a module has it."""

    what: str
    provider: str | None
    holds: Callable[[ModuleIR], bool]


def _inlined(module: ModuleIR) -> bool:
    entry = module.entry
    if module.fns or len(module.patterns) > 1 or entry.lets:
        return False
    return not any(n.op in (Op.CALL, Op.PATTERN) for root in entry.roots() for n in root.walk())


INLINED = Requirement("fn calls, pattern references and lets expanded", Inline.name, _inlined)
BOUND = Requirement("parameters bound", BindParams.name, lambda m: m.entry.bindings is not None)
CANONICAL = Requirement(
    "mask and score in canonical form", Canonicalize.name, lambda m: Canonicalize().run(m) == m
)
TILES = Requirement("tile classes", ClassifyTiles.name, lambda m: m.entry.tiles is not None)
RANGES = Requirement(
    "key ranges (or proof that none exist in closed form)",
    DeriveRanges.name,
    lambda m: m.entry.ranges is not None or DeriveRanges().run(m) == m,
)
SPARSITY = Requirement("a sparsity", BlockSparsify.name, lambda m: m.entry.sparsity is not None)
FUSED = Requirement("kernel values", Fuse.name, lambda m: m.entry.kernel is not None)
NOT_FUSED = Requirement(
    "IR that fuse has not run on (its lets are the kernel values' own)",
    None,
    lambda m: m.entry.kernel is None,
)

REQUIRES: dict[str, tuple[Requirement, ...]] = {
    Inline.name: (NOT_FUSED,),
    BindParams.name: (INLINED,),
    Canonicalize.name: (INLINED,),
    ClassifyTiles.name: (BOUND, CANONICAL),
    DeriveRanges.name: (BOUND, CANONICAL),
    BlockSparsify.name: (TILES, RANGES),
    Fuse.name: (BOUND, CANONICAL),
    LOWER_STAGE: (SPARSITY, FUSED),
}
"""The requirements of every pass (and of `lower-triton`), in the order they are checked: the first
one missing is reported."""


def check(stage: str, module: ModuleIR, ran: Collection[str]) -> None:
    """Raise `PipelineError` if `module` lacks something `stage` requires and no pass in `ran` provides."""
    for requirement in REQUIRES[stage]:
        if requirement.provider in ran or requirement.holds(module):
            continue
        if requirement.provider is None:
            raise PipelineError(f"{stage} needs {requirement.what}", module.entry.loc)
        raise PipelineError(
            f"{stage} needs {requirement.what}, which the input lacks: run {requirement.provider} first",
            module.entry.loc,
        )
