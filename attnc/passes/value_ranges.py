"""Numeric value ranges of int expressions over every launch attnc accepts.

The kernels compute index arithmetic in int32 where it cannot overflow and in int64 elsewhere, and use
truncating division where it equals floor division (non-negative operands). Both decisions need bounds
that hold for *every* launch, whatever the lengths: this analysis bounds each int expression by
interval arithmetic on Python ints (exact, never overflowing), assuming what the launcher checks:

- sizes (`BATCH`, `NUM_HEADS`, `Q_LEN`, `KV_LEN`) lie in `[0, SIZE_LIMIT]`;
- index variables and tile bounds in `[0, SIZE_LIMIT + POSITION_SLACK)` (a kernel's last tile reaches
  past the length by less than a tile; those positions are computed, then discarded);
- a loaded input lies in its dtype's range.

Unlike `intervals.py`, whose bounds are IR expressions over one tile box, these are plain numbers over
all launches. Floats are not tracked.
"""

from __future__ import annotations

from collections.abc import Mapping

from attnc.ir.nodes import INDEX_VARS, TILE_VARS, Node, Op, PatternIR, Type

SIZE_LIMIT = 1 << 30
"""The largest batch, head count or length a launch may have (the launcher enforces it)."""
POSITION_SLACK = 1 << 10

INT32 = (-(1 << 31), (1 << 31) - 1)
INT64 = (-(1 << 63), (1 << 63) - 1)
_INPUT_RANGES = {"int32": INT32, "int64": INT64, "bool": (0, 1)}

Range = tuple[int, int]


def fits_int32(r: Range) -> bool:
    return INT32[0] <= r[0] and r[1] <= INT32[1]


class ValueRanges:
    """Bounds of the int expressions of one pattern; `lets` gives the ranges of named values."""

    def __init__(self, pattern: PatternIR, lets: Mapping[str, Node] | None = None) -> None:
        self.pattern = pattern
        self.lets = dict(lets or {})
        self._ranges: dict[Node, Range] = {}

    def of(self, node: Node) -> Range:
        """Inclusive bounds of an int expression (the int64 range where nothing better is known)."""
        assert node.type is Type.INT, f"value ranges are for ints, got {node.type}"
        for n in node.walk():
            if n.type is Type.INT and n not in self._ranges:
                self._ranges[n] = self._range(n)
        return self._ranges[node]

    def nonnegative(self, node: Node) -> bool:
        return self.of(node)[0] >= 0

    def positive(self, node: Node) -> bool:
        return self.of(node)[0] > 0

    def _range(self, n: Node) -> Range:
        op = n.op
        if op is Op.CONST:
            return int(n.attr), int(n.attr)  # type: ignore[arg-type]
        if op is Op.VAR:
            assert n.attr in INDEX_VARS + TILE_VARS
            return 0, SIZE_LIMIT + POSITION_SLACK - 1
        if op is Op.SIZE:
            return 0, SIZE_LIMIT
        if op is Op.REF:
            value = self.lets.get(str(n.attr))
            return INT64 if value is None else self.of(value)
        if op is Op.LOAD:
            decl = self.pattern.input(str(n.attr))
            return INT64 if decl is None else _INPUT_RANGES.get(decl.dtype, INT64)
        args = [self._ranges[a] for a in n.args if a.type is Type.INT]
        if op in (Op.ADD, Op.SUB, Op.MUL, Op.MIN, Op.MAX):
            (alo, ahi), (blo, bhi) = args
            if op is Op.ADD:
                return alo + blo, ahi + bhi
            if op is Op.SUB:
                return alo - bhi, ahi - blo
            if op is Op.MIN:
                return min(alo, blo), min(ahi, bhi)
            if op is Op.MAX:
                return max(alo, blo), max(ahi, bhi)
            corners = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
            return min(corners), max(corners)
        if op is Op.NEG:
            lo, hi = args[0]
            return -hi, -lo
        if op is Op.ABS:
            lo, hi = args[0]
            if lo >= 0:
                return lo, hi
            if hi <= 0:
                return -hi, -lo
            return 0, max(-lo, hi)
        if op in (Op.FLOORDIV, Op.UDIV):
            return self._floordiv(args[0], args[1])
        if op in (Op.MOD, Op.UMOD):
            return self._mod(args[0], args[1])
        if op is Op.WHERE:
            (alo, ahi), (blo, bhi) = args
            return min(alo, blo), max(ahi, bhi)
        return INT64  # floor / ceil of floats, and anything else: no static bound

    @staticmethod
    def _floordiv(a: Range, b: Range) -> Range:
        (alo, ahi), (blo, bhi) = a, b
        if blo == bhi:  # by a constant
            c = blo
            if c == 0:
                return 0, 0  # x // 0 is 0
            ends = [alo // c, ahi // c]
            return min(ends), max(ends)
        if blo > 0:  # a positive divisor shrinks magnitudes toward the floor
            candidates = [x // y for x in (alo, ahi) for y in (blo, bhi)]
            return min(candidates), max(candidates)
        bound = max(abs(alo), abs(ahi))  # |a // b| <= |a| (and 0 for b == 0)
        return -bound, bound

    @staticmethod
    def _mod(a: Range, b: Range) -> Range:
        (alo, ahi), (blo, bhi) = a, b
        if blo == bhi == 0:
            return a  # x % 0 is x
        if blo > 0:
            if alo >= 0 and ahi < blo:
                return a  # already a residue
            return 0, bhi - 1
        if bhi < 0:
            return blo + 1, 0
        bound = max(abs(blo), abs(bhi)) - 1  # the sign of b, magnitude below |b|; or a itself for b == 0
        return min(-bound, alo), max(bound, ahi)
