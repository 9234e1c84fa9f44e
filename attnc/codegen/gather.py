"""Input loads whose indices take few values over a tile: loaded as scalars, not per element.

A block map `blocks[b, h, q // 128, kv // 128]` read per element of a [BLOCK_M, BLOCK_N] tile is a 2-D
gather: Triton loads it in a blocked layout and converts it to the MMA layout of the scores through
shared memory, and its layout then pulls the softmax out of the MMA layout too (the forward's
registers spill). But over one tile `q // 128` takes at most two values (one row block and the next),
and so does `kv // 128`: the load is the four scalars `blocks[b, h, r + i, k + j]` (r, k the indices
at the tile's first positions) and a choice per row and per key column, which needs no layout of its
own. `tile_width` proves such a bound for an index that is a non-decreasing function of one position
(sums, constant factors, floor division and right shifts by constants, min / max, a choice by a value
of neither position); the bound depends on the tile's size, which the autotuner picks when it
launches, so the kernel chooses the form by a constexpr condition on it (`TileAxis`), keeping the
per-element gather for tiles too large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attnc.ir.nodes import Node, Op
from attnc.ir.rewrite import rewrite

TILE_SIZES = tuple(1 << k for k in range(4, 11))  # what a BLOCK_M / BLOCK_N may be: 16 to 1024
MOST_VALUES = 2  # a scalar form's index takes at most this many values over a tile
MOST_INDICES = 2  # and a load has at most this many such indices (2 ** 2 scalar loads)


@dataclass(frozen=True)
class TileAxis:
    """How the positions of one index variable (`q` or `kv`) run over one tile of a kernel's loop
    body, in the kernel's names: the tile's first position, its size (a constexpr), the constexpr
    condition under which every tile starts at a multiple of its size (no offset shifts the
    positions), the one under which the tile's positions are consecutive (None: always), and the one
    under which they all lie inside the rows, below the launch's rows plus their offset ("True":
    always; None: no tile is known to), where an input read at the position needs no bound test
    (`emit.covered_sizes`), and, where the positions are always consecutive, their offsets from the
    first (a tensor the same for every tile of the loop, `offs_n[None, :]`): an input read at the
    position is then addressed as one scalar offset per tile plus those (`emit.Emitter._loaded`)."""

    first: str
    size: str
    aligned: str
    consecutive: str | None = None
    inside: str | None = None
    offsets: str | None = None


def expand_lets(node: Node, lets: dict[str, Node]) -> Node:
    """The value with each `$let` replaced by its expression, recursively."""
    memo: dict[str, Node] = {}

    def rule(n: Node) -> Node | None:
        if n.op is not Op.REF or str(n.attr) not in lets:
            return None
        name = str(n.attr)
        if name not in memo:
            memo[name] = rewrite(lets[name], rule)
        return memo[name]

    return rewrite(node, rule)


def tile_width(node: Node, var: str, span: int, modulus: int = 1, residue: int = 0) -> int | None:
    """A bound on f(last) - f(first), where f is the int value `node` (no lets) as a function of the
    position `var` and [first, last] any `span + 1` consecutive positions with first % modulus ==
    residue; None unless f is provably non-decreasing, so that every value over the positions lies in
    [f(first), f(first) + bound]. Values of neither position (b, h, sizes, parameters) are constants."""
    if var not in node.free:
        return 0
    op, args = node.op, node.args
    if op is Op.VAR:
        return span

    def width(n: Node) -> int | None:
        return tile_width(n, var, span, modulus, residue)

    if op is Op.ADD:
        widths = [width(a) for a in args]
        return None if None in widths else sum(widths)  # type: ignore[arg-type]
    if op is Op.SUB:  # non-decreasing minus a constant
        return width(args[0]) if var not in args[1].free else None
    if op is Op.MUL:
        for factor, other in (args, args[::-1]):
            if factor.is_const and int(factor.attr) >= 0:  # type: ignore[arg-type]
                w = width(other)
                return None if w is None else int(factor.attr) * w  # type: ignore[arg-type]
        return None
    if op in (Op.FLOORDIV, Op.UDIV, Op.SHR):
        dividend, divisor = args
        if not divisor.is_const or var in divisor.free:
            return None
        count = int(divisor.attr)  # type: ignore[arg-type]
        if op is Op.SHR:  # an arithmetic shift: floor division by 2 ** count
            if not 0 <= count <= 62:
                return None
            count = 1 << count
        if count <= 0:
            return None
        w = width(dividend)
        if w is None:
            return None
        # floor((r + w) / d), r = first % d at its largest: d - 1, or less where the tiles' alignment
        # fixes it (a position divided by a divisor of its tile size starts at a multiple of it).
        largest_r = count - 1
        if dividend.op is Op.VAR:
            g = math.gcd(modulus, count)
            largest_r = count - g + residue % g
        return (largest_r + w) // count
    if op in (Op.MIN, Op.MAX):  # of non-decreasing values: moves by at most the larger move
        widths = [width(a) for a in args]
        return None if None in widths else max(widths)  # type: ignore[type-var]
    if op is Op.WHERE and var not in args[0].free:  # one branch for the whole tile
        widths = [width(a) for a in args[1:]]
        return None if None in widths else max(widths)  # type: ignore[type-var]
    return None


def largest_tile(node: Node, var: str, aligned: bool, most: int = MOST_VALUES) -> int:
    """The largest tile size (of `TILE_SIZES`) over which the index takes at most `most` values, its
    tiles starting at multiples of their size where `aligned`; 0 if none."""
    found = 0
    for size in TILE_SIZES:
        width = tile_width(node, var, size - 1, size if aligned else 1)
        if width is None or width > most - 1:
            break  # the bound grows with the size
        found = size
    return found


def tile_condition(node: Node, var: str, axis: TileAxis, most: int = MOST_VALUES) -> str | None:
    """The constexpr condition under which the index takes at most `most` values over a tile of the
    axis, or None where it may take more at every tile size (`most=1`: one value, as `kv // 128` over
    aligned tiles of 128 keys or fewer)."""
    anywhere, aligned = largest_tile(node, var, False, most), largest_tile(node, var, True, most)
    if not aligned:
        return None
    terms = []
    if anywhere:
        terms.append(f"({axis.size} <= {anywhere})")
    if aligned > anywhere:
        terms.append(f"(({axis.aligned}) & ({axis.size} <= {aligned}))")
    condition = " | ".join(terms)
    if axis.consecutive is not None:
        condition = f"({condition}) & ({axis.consecutive})"
    return f"({condition})"
