"""Numeric value ranges of int expressions over every launch attnc accepts, and the int64 guarantee.

The kernels compute index arithmetic in int32 where it cannot overflow and in int64 elsewhere, and use
truncating division where it equals floor division (non-negative operands). Both decisions need bounds
that hold for *every* launch, whatever the lengths: this analysis bounds each int expression by
interval arithmetic on Python ints (exact, never overflowing), assuming what the launcher checks:

- sizes (`BATCH`, `NUM_HEADS`, `Q_LEN`, `KV_LEN`) lie in `[0, SIZE_LIMIT]` (every evaluator raises an
  `InputError` for larger ones, `check_sizes`: the launcher, the oracle, the plans; an analytic `Plan`
  may be made for any lengths, as it computes nothing until asked for its block map);
- index variables and tile bounds in `[0, SIZE_LIMIT + POSITION_SLACK)` (a kernel's last tile reaches
  past the length by less than a tile, and tiles are at most `POSITION_SLACK` wide; those positions are
  computed, then discarded);
- a runtime int parameter (`Op.PARAM`) lies in `PARAM_RANGE` (the API checks each value given, at
  binding and at call time); a runtime float parameter may be any float64;
- a loaded input lies in its dtype's range; an int64 input in `INT64_INPUT`, half of int64 (the caller's
  contract, documented with the `input` declaration);
- `floor` / `ceil` of a float saturate (see `FLOAT_TO_INT`); the floats they read are bounded by a
  float interval analysis, widened for float32 rounding.

**Int64 by construction.** Every evaluator of the IR (the oracle, the launch plans, the kernels)
computes ints in (at most) int64, where an overflow wraps silently. So: the program as written, with
its parameter values, must keep every int value inside int64 for every launch (`bind-params` raises a
located `AttnTypeError` otherwise, `check_fits`); and a rewrite (`canonicalize`, `fuse`, the
plans' `separate_axes`, the tile analyses) is made only where the rewritten form keeps every int value
inside int64 too (`ValueRanges.fits`). A program accepted is then computed exactly everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from attnc.errors import AttnTypeError, InputError, Loc
from attnc.ir import fold
from attnc.ir.nodes import INDEX_VARS, TILE_VARS, Node, Op, PatternIR, Type

SIZE_LIMIT = 1 << 30
"""The largest batch, head count or length a launch may have (the launcher enforces it)."""
POSITION_SLACK = 1 << 10
"""How far past a length a kernel's tile may reach: block sizes are at most this."""

PARAM_RANGE = (-(1 << 30), 1 << 30)
"""The values a runtime int parameter may take: inside int32 (a Python int kernel argument is int32),
with room for a sum or difference of two of them, or of one and a size, to stay inside int32 too."""
INT32 = (-(1 << 31), (1 << 31) - 1)
INT64 = (-(1 << 63), (1 << 63) - 1)
INT64_INPUT = (-(1 << 62), (1 << 62) - 1)
"""The values an `int64` input may hold: the caller's contract (not checked, which would cost a pass
over the tensor and a device sync per call). Half of int64, so that the sum or difference of two such
values is exact (`doc[q] - doc[kv]`, `limit[q] + group[h]`)."""
_INPUT_RANGES = {"int32": INT32, "int64": INT64_INPUT, "bool": (0, 1)}

FLOAT_TO_INT = (
    "floor / ceil of a float are its floor / ceiling as an int64, saturating: at or below -(2**63 - 1) "
    "gives -(2**63 - 1), at or above 2**63 - 1 gives 2**63 - 1, NaN gives 0"
)

SATURATED = (-((1 << 63) - 1), (1 << 63) - 1)
"""The ints `floor` / `ceil` give: symmetric, so that their magnitude (`abs`, the kernels' division)
stays inside int64 too."""
# Float32 rounding may move a float of the kernel's score away from the float64 value bounded here.
_FLOAT32_SLACK = 2.0**-16

Range = tuple[int, int]
FloatRange = tuple[float, float, bool]  # lo, hi (inclusive, may be infinite), may it be NaN
_ANY_FLOAT: FloatRange = (-math.inf, math.inf, True)
_MONOTONE = (Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.SQRT, Op.TANH, Op.SIGMOID, Op.ERF)
# The members the int ranges' dispatch reads, as module constants: a read of `Op.ADD` costs Python 3.10
# and 3.11 a call of `EnumType.__getattr__`'s hook (`ir/nodes.py`), and every node of every
# expression bounded goes through the dispatch.
_CONST, _VAR, _SIZE, _PARAM, _REF, _LOAD = Op.CONST, Op.VAR, Op.SIZE, Op.PARAM, Op.REF, Op.LOAD
_ADD, _SUB, _MIN, _MAX, _NEG, _ABS, _WHERE = Op.ADD, Op.SUB, Op.MIN, Op.MAX, Op.NEG, Op.ABS, Op.WHERE
_INT, _FLOAT = Type.INT, Type.FLOAT
_BITAND = Op.BITAND
_BITOR = Op.BITOR
_BOUND = Op.BOUND
_COS = Op.COS
_DIV = Op.DIV
_FLOOR = Op.FLOOR
_LOG = Op.LOG
_LOG2 = Op.LOG2
_MUL = Op.MUL
_REDUCE = Op.REDUCE
_SHL = Op.SHL
_SHR = Op.SHR
_SIN = Op.SIN
_SQRT = Op.SQRT
_TOFLOAT = Op.TOFLOAT
_SUMMARIES = frozenset((Op.RANGE_MIN, Op.RANGE_MAX))
_ROUNDINGS = frozenset((Op.FLOOR, Op.CEIL))
_BINARY = frozenset((Op.ADD, Op.SUB, Op.MUL, Op.MIN, Op.MAX))
_DIVISIONS = frozenset((Op.FLOORDIV, Op.UDIV))
_MODULOS = frozenset((Op.MOD, Op.UMOD))
_DIVIDING = _DIVISIONS | _MODULOS
_BITWISE = frozenset((Op.BITAND, Op.BITOR, Op.BITXOR))


def fits_int32(r: Range) -> bool:
    return INT32[0] <= r[0] and r[1] <= INT32[1]


def fits_int64(r: Range) -> bool:
    return INT64[0] <= r[0] and r[1] <= INT64[1]


_HUGE = 1 << 126


def _clamped(r: Range) -> Range:
    """Bounds beyond +-2**126 cut there: such a value already cannot fit int64, which makes every
    expression over it fail `fits`, and exact bounds of repeated squaring would grow without limit
    (60 nested squares have bounds of 2**60 bits)."""
    return max(min(r[0], _HUGE), -_HUGE), max(min(r[1], _HUGE), -_HUGE)


def saturate(value: float) -> int:
    """A float's integral value as int64 the way every evaluator converts it (`FLOAT_TO_INT`)."""
    if math.isnan(value):
        return 0
    if math.isinf(value):
        return SATURATED[0] if value < 0 else SATURATED[1]
    return max(SATURATED[0], min(int(value), SATURATED[1]))


def check_sizes(loc: Loc | None, **sizes: int) -> None:
    """Raise an `InputError` for a size beyond what the analysis assumes (`SIZE_LIMIT`): whatever
    evaluates a pattern at given sizes (the oracle, the plans, the launcher) calls this first."""
    for name, value in sizes.items():
        if value > SIZE_LIMIT:
            raise InputError(f"{name} must be at most {SIZE_LIMIT} (2**30), got {value}", loc)


class ValueRanges:
    """Bounds of the int expressions of one pattern; `lets` gives the ranges of named values.

    Inputs' dtypes come from `pattern` (or `dtypes`, by input name); a load of an input of unknown
    dtype may be any int64. `known`: the value ranges of the same inputs' dtypes without lets
    (`normal_form.value_ranges`, which the passes of a compilation share): what they found of a node
    that refers to no let (`$name`) holds here too, and is taken, not found again."""

    def __init__(
        self,
        pattern: PatternIR | None = None,
        lets: Mapping[str, Node] | None = None,
        dtypes: Mapping[str, str] | None = None,
        known: ValueRanges | None = None,
    ) -> None:
        self.pattern = pattern
        self.lets = dict(lets or {})
        self.dtypes = dict(dtypes or {})
        if pattern is not None:
            self.dtypes.update({d.name: d.dtype for d in pattern.inputs})
        assert known is None or (not known.lets and known.dtypes == self.dtypes), "not the same inputs"
        self._known = known
        self._ranges: dict[Node, Range] = {}
        self._floats: dict[Node, FloatRange] = {}
        self._fits: dict[Node, bool] = {}  # every int value of the node's expression inside int64
        self._refers: set[Node] = set()  # the nodes visited that refer to a let, whose bounds it gives

    def of(self, node: Node) -> Range:
        """Inclusive bounds of an int expression (exact Python ints: they may lie outside int64)."""
        assert node.type is _INT, f"value ranges are for ints, got {node.type}"
        self._visit(node)
        return self._ranges[node]

    def nonnegative(self, node: Node) -> bool:
        return self.of(node)[0] >= 0

    def positive(self, node: Node) -> bool:
        return self.of(node)[0] > 0

    def overflow(self, node: Node) -> Node | None:
        """The first int value of the expression (operands before their users) that may leave int64
        for some launch, or None: None means every evaluator computes the expression exactly."""
        if self.fits(node):
            return None
        return next(n for n in node.walk() if not self._own_fits(n))

    def fits(self, *nodes: Node) -> bool:
        """Whether every int value of these expressions stays inside int64 for every launch."""
        ok = True
        for node in nodes:
            self._visit(node)
            ok = ok and self._fits[node]
        return ok

    def _own_fits(self, n: Node) -> bool:
        if n.type is _INT and not fits_int64(self._ranges[n]):
            return False
        return not (n.op in _DIVIDING and self._divides_min(n))

    def _divides_min(self, n: Node) -> bool:
        # The kernels divide magnitudes (|a| // |b|), and -2**63 // -1 overflows the hardware's quotient
        # (x86 traps on it): an operand of a division may not be -2**63.
        return min(self._ranges[n.args[0]][0], self._ranges[n.args[1]][0]) == INT64[0]

    def _visit(self, node: Node) -> None:
        fits = self._fits
        if node in fits:
            return
        ranges, refers = self._ranges, self._refers
        skip = fits.__contains__ if self._known is None else self._taken
        for n in node.walk(skip=skip):  # then its operands are known too
            if n.op is _REF or (refers and not refers.isdisjoint(n.args)):
                refers.add(n)
            let = self.lets.get(str(n.attr)) if n.op is _REF else None
            if let is not None:
                self._visit(let)
            # `_own_fits`, inline: every node of every expression bounded comes through here.
            ok = True
            if n.type is _INT:
                r = self._range(n)
                lo, hi = r
                if not -_HUGE <= lo <= hi <= _HUGE:
                    r = _clamped(r)
                ranges[n] = r
                ok = INT64[0] <= r[0] and r[1] <= INT64[1]
            elif n.type is _FLOAT:
                self._floats[n] = self._float(n)
            if ok and n.op in _DIVIDING:
                ok = not self._divides_min(n)
            for a in n.args:
                ok = ok and fits[a]
            fits[n] = ok and (let is None or fits[let])

    def _taken(self, n: Node) -> bool:
        """Whether the node is known here, or to `known` without a let below it (then taken from it)."""
        if n in self._fits:
            return True
        known = self._known
        assert known is not None
        if n not in known._fits or n in known._refers:
            return False
        self._fits[n] = known._fits[n]
        for mine, theirs in ((self._ranges, known._ranges), (self._floats, known._floats)):
            if n in theirs:
                mine[n] = theirs[n]  # type: ignore[index]
        return True

    def _input_range(self, name: str) -> Range:
        dtype = self.dtypes.get(name)
        return INT64 if dtype is None else _INPUT_RANGES.get(dtype, INT64)  # unknown: any int64

    def _range(self, n: Node) -> Range:
        op = n.op
        if op is _CONST:
            return int(n.attr), int(n.attr)  # type: ignore[arg-type]
        if op is _VAR:
            assert n.attr in INDEX_VARS + TILE_VARS
            return 0, SIZE_LIMIT + POSITION_SLACK - 1
        if op is _SIZE:
            return 0, SIZE_LIMIT
        if op is _PARAM:
            return PARAM_RANGE
        if op is _REF:
            value = self.lets.get(str(n.attr))
            return INT64 if value is None else self.of(value)  # visits the let
        if op is _LOAD:
            return self._input_range(str(n.attr))
        if op in _SUMMARIES:  # out-of-range positions read 0
            lo, hi = self._input_range(str(n.attr))
            return min(lo, 0), max(hi, 0)
        if op in _ROUNDINGS:
            return self._to_int(op, self._floats[n.args[0]])
        args = [self._ranges[a] for a in n.args if a.type is _INT]
        if op in _BINARY:
            (alo, ahi), (blo, bhi) = args
            if op is _ADD:
                return alo + blo, ahi + bhi
            if op is _SUB:
                return alo - bhi, ahi - blo
            if op is _MIN:
                return min(alo, blo), min(ahi, bhi)
            if op is _MAX:
                return max(alo, blo), max(ahi, bhi)
            corners = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
            return min(corners), max(corners)
        if op is _NEG:
            lo, hi = args[0]
            return -hi, -lo
        if op is _ABS:
            lo, hi = args[0]
            if lo >= 0:
                return lo, hi
            if hi <= 0:
                return -hi, -lo
            return 0, max(-lo, hi)
        if op in _DIVISIONS:
            return self._floordiv(args[0], args[1])
        if op in _MODULOS:
            return self._mod(args[0], args[1])
        if op is _WHERE:
            (alo, ahi), (blo, bhi) = args
            return min(alo, blo), max(ahi, bhi)
        if op in _BITWISE:
            return _bitwise(op, args[0], args[1])
        if op is _BOUND:  # a reduction's variable: lo, ..., hi - 1 (nothing if hi <= lo)
            (alo, _), (_, bhi) = args
            return alo, max(alo, bhi - 1)
        if op is _REDUCE:  # sum: up to hi - lo terms; max / min: a term, or 0 if empty
            (alo, _), (_, bhi), (tlo, thi) = args
            if str(n.attr).startswith("sum:"):
                count = max(0, bhi - alo)
                return min(0, tlo * count), max(0, thi * count)
            return min(tlo, 0), max(thi, 0)
        if op in (_SHL, _SHR):
            (alo, ahi), (nlo, nhi) = args
            counts = (fold.shift_count(nlo), fold.shift_count(nhi))  # monotone in the count
            corners = [fold.evaluate(op, [x, c]) for x in (alo, ahi) for c in counts]
            return min(corners), max(corners)  # type: ignore[type-var]
        return INT64  # nothing else yields an int; a bound that is always sound

    @staticmethod
    def _to_int(op: Op, f: FloatRange) -> Range:
        lo, hi, nan = f
        rounding = math.floor if op is _FLOOR else math.ceil
        ends = []
        for x, sign in ((lo, -1), (hi, 1)):
            if math.isfinite(x):
                x += sign * (abs(x) * _FLOAT32_SLACK + 1.0)
                ends.append(saturate(rounding(x)) if math.isfinite(x) else saturate(x))
            else:
                ends.append(saturate(x))
        low, high = ends
        if nan:
            low, high = min(low, 0), max(high, 0)
        return max(low, SATURATED[0]), min(high, SATURATED[1])

    # ---- floats (only to bound floor and ceil) ------------------------------------------------------

    def _float(self, n: Node) -> FloatRange:
        op = n.op
        if op is _CONST:
            value = float(n.attr)  # type: ignore[arg-type]
            return _ANY_FLOAT if math.isnan(value) else (value, value, False)
        if op is _TOFLOAT:
            lo, hi = self._ranges[n.args[0]]
            return float(lo), float(hi), False
        if op is _REF and str(n.attr) in self.lets:
            self._visit(self.lets[str(n.attr)])
            return self._floats[self.lets[str(n.attr)]]
        args = [self._floats[a] for a in n.args if a.type is _FLOAT]
        if op in (_ADD, _SUB, _MUL, _DIV, _MIN, _MAX):
            (alo, ahi, anan), (blo, bhi, bnan) = args
            if op is _SUB:
                blo, bhi = -bhi, -blo
            if op is _DIV and blo <= 0 <= bhi:
                return _ANY_FLOAT
            fn = {
                _ADD: lambda x, y: x + y,
                _SUB: lambda x, y: x + y,
                _MUL: lambda x, y: x * y,
                _DIV: lambda x, y: x / y,
                _MIN: min,
                _MAX: max,
            }[op]
            corners = [fn(x, y) for x in (alo, ahi) for y in (blo, bhi)]
            if any(math.isnan(c) for c in corners):  # inf - inf, 0 * inf: anything
                return _ANY_FLOAT
            return min(corners), max(corners), anan or bnan
        if op is _NEG:
            lo, hi, nan = args[0]
            return -hi, -lo, nan
        if op is _ABS:
            lo, hi, nan = args[0]
            if lo >= 0:
                return lo, hi, nan
            return (0.0 if hi >= 0 else -hi), max(-lo, hi), nan
        if op in _MONOTONE:
            lo, hi, nan = args[0]
            if op in (_LOG, _LOG2, _SQRT) and lo < 0:
                lo, nan = 0.0, True
                hi = max(hi, 0.0)
            low, high = (fold.evaluate(op, [x]) for x in (lo, hi))
            if math.isnan(low) or math.isnan(high):  # type: ignore[arg-type]
                return _ANY_FLOAT
            return float(low), float(high), nan  # type: ignore[arg-type]
        if op is _WHERE:
            (alo, ahi, anan), (blo, bhi, bnan) = args
            return min(alo, blo), max(ahi, bhi), anan or bnan
        if op in (_SIN, _COS):  # NaN of NaN or of an infinity
            lo, hi, nan = args[0]
            return -1.0, 1.0, nan or not (math.isfinite(lo) and math.isfinite(hi))
        return _ANY_FLOAT  # the score, float inputs, parameters not yet bound

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


def _width(r: Range) -> int:
    """The least w with every value of r in [-2**w, 2**w): a two's complement width, less the sign."""
    lo, hi = r
    return max((-lo - 1).bit_length() if lo < 0 else 0, hi.bit_length() if hi > 0 else 0)


def _bitwise(op: Op, a: Range, b: Range) -> Range:
    """Bounds of a & b, a | b, a ^ b (two's complement): every result lies in [-2**w, 2**w) for the
    operands' width w; & with a non-negative operand lies in [0, that operand]; | of two operands of
    one sign lies between the larger and that sign's end; ^ of two operands of one sign is
    non-negative, of opposite signs negative."""
    top = 1 << max(_width(a), _width(b))
    (alo, ahi), (blo, bhi) = a, b
    if op is _BITAND:
        if alo >= 0 or blo >= 0:
            return 0, min(h for lo_, h in (a, b) if lo_ >= 0)
        return -top, max(ahi, bhi)  # a negative operand's bits only clear: below the other operand
    if op is _BITOR:
        if alo >= 0 and blo >= 0:
            return max(alo, blo), top - 1
        if ahi < 0 and bhi < 0:
            return max(alo, blo), -1
        return -top, top - 1
    if (alo >= 0 and blo >= 0) or (ahi < 0 and bhi < 0):
        return 0, top - 1
    if (alo >= 0 and bhi < 0) or (ahi < 0 and blo >= 0):
        return -top, -1
    return -top, top - 1


def check_fits(pattern: PatternIR, roots: Iterable[Node], ranges: ValueRanges | None = None) -> None:
    """Raise an `AttnTypeError` at the first int value of these expressions of the pattern that
    may leave int64 for some launch (a sub-expression of the user's source where it has one).
    `ranges`: the pattern's value ranges (its lets known), where the caller has them."""
    ranges = ValueRanges(pattern, dict(pattern.lets)) if ranges is None else ranges
    for root in roots:
        bad = ranges.overflow(root)
        if bad is None:
            continue
        if bad.type is _INT and not fits_int64(ranges.of(bad)):
            lo, hi = ranges.of(bad)
            what = f"this int value can reach {hi if hi > INT64[1] else lo}, which does not fit in 64 bits"
        else:
            what = "this division's operand can be -2**63, whose magnitude does not fit in 64 bits"
        raise AttnTypeError(
            f"integer overflow: {what} (for lengths up to 2**30{_params(pattern)})",
            _located(root, bad) or pattern.loc,
        )


def _params(pattern: PatternIR) -> str:
    given = ", ".join(f"{k}={v!r}" for k, v in pattern.bindings or ())
    runtime = [p.name for p in pattern.params if p.type is _INT] if pattern.bindings is not None else []
    text = f", with parameters {given}" if given else ""
    if runtime:
        text += f", and runtime {', '.join(runtime)} anywhere in [-2**30, 2**30]"
    return text


def _located(root: Node, target: Node) -> Loc | None:
    """The location of `target`, or of the nearest enclosing expression that has one."""
    if target.loc is not None:
        return target.loc
    parents: dict[Node, Node] = {}
    for n in root.walk():
        for a in n.args:
            parents.setdefault(a, n)
    node = target
    while node in parents:
        node = parents[node]
        if node.loc is not None:
            return node.loc
    return None
