"""The typed results of the tile analyses and of `fuse`: what the passes tell codegen and the runtime.

Each is a frozen record of IR expressions held in a field of the entry `PatternIR`, set by one pass,
checked by the verifier (`ir/verify.py`: which variables each may read, its types, that its parts
agree) and written in the IR text as one kind of line (`ir/printer.py`, read back by `ir/parser.py`):

    line in the IR text                                              record         set by
    tiles any = %12, all = %17                                       TileClasses    classify-tiles
    ranges conjuncts = 2                                             Ranges         derive-ranges
    range kv 0: lo = %19, hi = %21, full_lo = %23, full_hi = %25     AxisRange (per axis, conjunct)
    kernel mask = %44, score = none, dscore = none                   KernelValues   fuse
    kernel grad 0: load = $row_1, value = %45                        ScoreGradient (per input load)
    sparsity metadata[b, h]                                          Sparsity       block-sparsify

An absent kernel value is written `none`; each line refers to nodes defined on the lines above it.

Codegen and the runtime read these fields; no value is ever looked up by a name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from attnc.ir.nodes import Node, Op, PatternIR

RANGE_AXES = ("kv", "q")
"""The axes `Ranges` bounds: key positions over a query tile, query positions over a key tile."""
METADATA_AXES = ("b", "h")
"""The axes a metadata plan may be built per (batch row, head), in this order."""


@dataclass(frozen=True)
class TileClasses:
    """How the mask behaves over a tile box (`classify-tiles`): two bool expressions of the box's
    bounds (`TILE_VARS`), `b`, `h` and the sizes. `any` is false only if the mask is false at every
    position of the tile (EMPTY); `all` is true only if it is true at every position (FULL); a tile
    where `any and not all` is PARTIAL."""

    PARTS: ClassVar[tuple[str, ...]] = ("any", "all")

    any: Node
    all: Node

    def roots(self) -> Iterator[Node]:
        yield self.any
        yield self.all

    def named(self) -> dict[str, Node]:
        """The expressions by the names the IR text gives them (`PARTS`)."""
        return {"any": self.any, "all": self.all}  # (`PARTS`, spelt out: the verifier and printer ask often)


@dataclass(frozen=True)
class AxisRange:
    """One conjunct's closed-form range of positions along one axis over a tile of the other axis
    (`derive-ranges`): int expressions of that tile's bounds, `b`, `h` and the sizes. Hull `[lo, hi]`:
    every allowed position is inside (empty if lo > hi). Core `[full_lo, full_hi]`: every position
    inside is allowed for every position of the tile (empty if full_lo > full_hi)."""

    PARTS: ClassVar[tuple[str, ...]] = ("lo", "hi", "full_lo", "full_hi")

    lo: Node
    hi: Node
    full_lo: Node
    full_hi: Node

    def roots(self) -> Iterator[Node]:
        yield from (self.lo, self.hi, self.full_lo, self.full_hi)

    def named(self) -> dict[str, Node]:
        """The expressions by the names the IR text gives them (`PARTS`)."""
        # (`PARTS`, spelt out: the verifier and the printer ask for every conjunct of every build.)
        return {"lo": self.lo, "hi": self.hi, "full_lo": self.full_lo, "full_hi": self.full_hi}


@dataclass(frozen=True)
class Ranges:
    """The mask's closed-form ranges (`derive-ranges`), one `AxisRange` per conjunct of its normal
    form on each axis: `kv[j]`, the keys conjunct j allows over a query tile (`q_first`, `q_last`);
    `q[j]`, the queries it allows over a key tile (`kv_first`, `kv_last`), which the backward pass
    iterates. Both have the same number of conjuncts (none: the mask is false)."""

    kv: tuple[AxisRange, ...]
    q: tuple[AxisRange, ...]

    @property
    def conjuncts(self) -> int:
        return len(self.kv)

    def axis(self, name: str) -> tuple[AxisRange, ...]:
        """The ranges along `name` ("kv" or "q")."""
        return self.kv if name == "kv" else self.q

    def roots(self) -> Iterator[Node]:
        for axis in RANGE_AXES:
            for r in self.axis(axis):
                yield from r.roots()


@dataclass(frozen=True)
class Sparsity:
    """How a kernel finds its tiles (`block-sparsify`): `analytic`, from the closed-form `Ranges`, no
    metadata; or `metadata`, compressed rows of tiles built at launch from the `TileClasses`, per
    batch row and/or head for the `axes` ("b", "h") the tile predicates read."""

    kind: Literal["analytic", "metadata"]
    axes: tuple[str, ...] = ()

    @property
    def analytic(self) -> bool:
        return self.kind == "analytic"

    def __str__(self) -> str:
        """As the IR text and `Plan.sparsity` write it: `analytic`, `metadata`, `metadata[b, h]`."""
        return self.kind + (f"[{', '.join(self.axes)}]" if self.axes else "")


@dataclass(frozen=True)
class ScoreGradient:
    """d score / d load for one load of a float input in the score (`fuse`). `load` is the load as the
    kernel computes it: the load itself, or a ref to the let `fuse` hoisted it into."""

    load: Node
    value: Node

    def input_load(self, lets: Mapping[str, Node]) -> Node:
        """The load, through the lets it was hoisted into."""
        load = self.load
        while load.op is Op.REF and str(load.attr) in lets:
            load = lets[str(load.attr)]
        return load


@dataclass(frozen=True)
class KernelValues:
    """The mask and score as the kernel's loop body computes them, and their derivatives (`fuse`):
    `mask` (None: every key allowed), `score` (None: the score is `s`), `dscore` = d score / d s (None:
    it is 1), and a `ScoreGradient` per load of a float input whose derivative is not identically 0."""

    mask: Node | None = None
    score: Node | None = None
    dscore: Node | None = None
    gradients: tuple[ScoreGradient, ...] = ()

    def roots(self) -> Iterator[Node]:
        yield from (v for v in (self.mask, self.score, self.dscore) if v is not None)
        for g in self.gradients:
            yield from (g.load, g.value)


def grad_loads(pattern: PatternIR) -> tuple[tuple[Node, Node], ...]:
    """(load, d score / d load) for each gradient of a fused pattern, in order, each load given as
    the load itself, not the let it was hoisted into; none before `fuse`."""
    if pattern.kernel is None:
        return ()
    lets = dict(pattern.lets)
    return tuple((g.input_load(lets), g.value) for g in pattern.kernel.gradients)


def differentiable_inputs(pattern: PatternIR) -> frozenset[str]:
    """The inputs of a fused pattern that can have a gradient: float inputs the score reads where its
    derivative is not identically zero."""
    return frozenset(str(load.attr) for load, _ in grad_loads(pattern))
