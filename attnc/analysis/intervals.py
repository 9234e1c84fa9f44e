"""Symbolic interval and three-valued analysis of an expression over a box of index values.

The tile analyses ask: over a tile box `q in [q_first, q_last]`, `kv in [kv_first, kv_last]` (one batch
row `b` and head `h`, the sizes fixed), what values can an int or float expression take, and is a
bool expression true everywhere, somewhere, or nowhere? The answers are themselves IR expressions of
the box bounds (and of `b`, `h` and the sizes), so they can be evaluated for every tile at once with
the evaluator, printed in golden tests, or inlined into a kernel.

- An int or float expression gets an `Interval`: inclusive bounds `lo` and `hi`, each an expression or
  `None` (unbounded). The bounds are sound: every value at every point of the box lies within them.
- A bool expression gets a `Truth`: `may` (false only where the expression is false at every point of
  the box) and `must` (true only where it is true at every point). Three-valued: TRUE is `must`, FALSE
  is `not may`, UNKNOWN otherwise.

Exactness: the bounds of an affine expression of independent variables (`q`, `kv`, the sizes, the
runtime int parameters, which like the sizes are one value per launch: symbols in the bounds) over a
box are attained at its corners, so comparisons of affine expressions with constants are classified
exactly. `min`, `max`, `abs`, `where`, floor `//` and `%` by constants (and `//` by a runtime parameter
or size) are bounded soundly (exactly where they are monotone over the box). `input` loads are bounded
by `range_min` / `range_max` summaries of the input over the box of their indices
(`analysis/summaries.py`: exact bounds of the input over that box, so a load whose indices are monotone
in q and kv, like `blocks[b, h, q // 64, kv // 64]` or `doc[b, q]`, is bounded by exactly the entries
the tile reads). Anything else (floats that may be NaN or infinite, division by a variable that changes
over the box) is unbounded, which only makes answers UNKNOWN. So is a comparison
whose bounds could leave int64 when computed (`value_ranges.py`): the predicates are evaluated in int64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from attnc.analysis.normal_form import combine, compare_form, linear, linear_form
from attnc.analysis.value_ranges import ValueRanges
from attnc.ir.nodes import Node, Op, PatternIR, Type, const, make

# Far beyond any index, for the bounds of a range query whose index is unbounded; the summaries clamp.
_FAR = 1 << 62
# Floats whose magnitude may exceed this could overflow to inf (and inf - inf is NaN): unbounded.
_FLOAT_LIMIT = 1e300
_INT_MAGNITUDE = float(1 << 63)

TRUE, FALSE = const(True), const(False)
_INT = Type.INT
_LINEAR_OPS = frozenset((Op.ADD, Op.SUB, Op.NEG, Op.MUL))
_BOOL = Type.BOOL  # read for every node: a read of `Type.BOOL` costs a call on Python 3.11 (`ir/nodes.py`)


@dataclass(frozen=True)
class Interval:
    lo: Node | None
    hi: Node | None
    magnitude: float = _INT_MAGNITUDE  # a static bound on |value| (floats only; ints keep the default)

    @property
    def bounded(self) -> bool:
        return self.lo is not None and self.hi is not None


@dataclass(frozen=True)
class Truth:
    may: Node
    must: Node


UNBOUNDED = Interval(None, None, float("inf"))
UNKNOWN = Truth(TRUE, FALSE)


# ---- expression builders that fold the trivial cases (the result is canonicalized afterwards) ------


def _and(*xs: Node) -> Node:
    if any(x == FALSE for x in xs):
        return FALSE
    rest = tuple(dict.fromkeys(x for x in xs if x != TRUE))
    return TRUE if not rest else rest[0] if len(rest) == 1 else make(Op.AND, *rest)


def _or(*xs: Node) -> Node:
    if any(x == TRUE for x in xs):
        return TRUE
    rest = tuple(dict.fromkeys(x for x in xs if x != FALSE))
    return FALSE if not rest else rest[0] if len(rest) == 1 else make(Op.OR, *rest)


def _not(x: Node) -> Node:
    if x.is_const:
        return const(not x.attr)
    if x.op is Op.NOT:
        return x.args[0]
    return make(Op.NOT, x)


def _min(a: Node, b: Node) -> Node:
    return a if a == b else make(Op.MIN, a, b)


def _max(a: Node, b: Node) -> Node:
    return a if a == b else make(Op.MAX, a, b)


def _where(c: Node, a: Node, b: Node) -> Node:
    if a == b or c == TRUE:
        return a
    return b if c == FALSE else make(Op.WHERE, c, a, b)


def _linear_end(parts: list[tuple[Interval, int]], upper: bool) -> Node | None:
    """The lower or upper end of `sum(k * part)`, in linear form; None if a part is unbounded that way."""
    terms: dict[Node, int] = {}
    constant = 0
    for part, k in parts:
        if k == 0:
            continue
        end = part.hi if (k > 0) == upper else part.lo
        if end is None:
            return None
        end_terms, end_constant = linear(end)
        terms = combine(terms, end_terms, k)
        constant += k * end_constant
    return linear_form(terms, constant)


def _scale(x: Node, k: int | float) -> Node:
    return make(Op.MUL, x, const(k))


class IntervalAnalysis:
    """Bounds of the expressions of one pattern over a box; `box` maps index variable names to their
    (lo, hi) expressions. Variables not in the box (and sizes) are single points: themselves. `ranges`,
    the pattern's `ValueRanges`, may be shared with other analyses of the same pattern."""

    def __init__(
        self, pattern: PatternIR, box: Mapping[str, tuple[Node, Node]], ranges: ValueRanges | None = None
    ) -> None:
        self.pattern = pattern
        self.box = dict(box)
        self._intervals: dict[Node, Interval] = {}
        self._truths: dict[Node, Truth] = {}
        self._ranges = ValueRanges(pattern) if ranges is None else ranges

    # ---- numbers ---------------------------------------------------------------------------------

    def interval(self, node: Node) -> Interval:
        self._visit(node)
        return self._intervals[node]

    def truth(self, node: Node) -> Truth:
        self._visit(node)
        return self._truths[node]

    def _visit(self, node: Node) -> None:
        truths, intervals = self._truths, self._intervals
        if node in truths or node in intervals:
            return

        def known(n: Node) -> bool:  # then so are its operands: not walked again
            return n in truths or n in intervals

        for n in node.walk(skip=known):  # children first, so no recursion is needed
            if n.type is _BOOL:
                truths[n] = self._truth(n)
            else:
                intervals[n] = self._interval(n)

    def _interval(self, n: Node) -> Interval:
        op = n.op
        if n.type is Type.FLOAT:
            result = self._float_interval(n)
            if result.magnitude > _FLOAT_LIMIT or not result.bounded:
                return UNBOUNDED
            return result
        if op is Op.CONST:
            return Interval(n, n)
        if op is Op.VAR:
            lo, hi = self.box.get(str(n.attr), (n, n))
            return Interval(lo, hi)
        if op in (Op.SIZE, Op.PARAM):  # one value for every tile of a launch: the symbol itself
            return Interval(n, n)
        if op is Op.LOAD:
            return self._load(n)
        args = [self._intervals[a] for a in n.args if a.type is not Type.BOOL]
        if op in (Op.FLOOR, Op.CEIL):
            x = args[0]
            if not x.bounded:
                return Interval(None, None)
            return Interval(make(op, x.lo), make(op, x.hi))  # type: ignore[arg-type]
        if op is Op.WHERE:
            return self._where(self._truths[n.args[0]], args[0], args[1])
        return self._arith(n, args)

    def _arith(self, n: Node, args: list[Interval]) -> Interval:
        """Ops shared by ints and floats (and, for ints, floor division and modulo by constants)."""
        op = n.op
        if n.type is _INT and op in _LINEAR_OPS:
            return self._linear(n, args)
        if op in (Op.ADD, Op.SUB):
            a, b = args
            if op is Op.SUB:
                b = Interval(
                    None if b.hi is None else make(Op.NEG, b.hi),
                    None if b.lo is None else make(Op.NEG, b.lo),
                    b.magnitude,
                )
            lo = None if a.lo is None or b.lo is None else make(Op.ADD, a.lo, b.lo)
            hi = None if a.hi is None or b.hi is None else make(Op.ADD, a.hi, b.hi)
            return Interval(lo, hi, a.magnitude + b.magnitude)
        if op is Op.NEG:
            (a,) = args
            return Interval(
                None if a.hi is None else make(Op.NEG, a.hi),
                None if a.lo is None else make(Op.NEG, a.lo),
                a.magnitude,
            )
        if op is Op.MUL:
            return self._mul(n, args)
        if op is Op.ABS:
            (a,) = args
            zero = const(0) if n.type is Type.INT else const(0.0)
            if a.lo is None and a.hi is None:
                return Interval(zero, None, a.magnitude)
            if a.lo is None:
                return Interval(_where(make(Op.LE, a.hi, zero), make(Op.NEG, a.hi), zero), None, a.magnitude)  # type: ignore[arg-type]
            if a.hi is None:
                return Interval(_where(make(Op.GE, a.lo, zero), a.lo, zero), None, a.magnitude)
            lo = _where(
                make(Op.GE, a.lo, zero), a.lo, _where(make(Op.LE, a.hi, zero), make(Op.NEG, a.hi), zero)
            )
            return Interval(lo, _max(make(Op.NEG, a.lo), a.hi), a.magnitude)
        if op in (Op.MIN, Op.MAX):
            a, b = args
            pick = _min if op is Op.MIN else _max
            if op is Op.MIN:  # the lower bound needs both; an unbounded side leaves the upper bound alone
                lo = None if a.lo is None or b.lo is None else pick(a.lo, b.lo)
                hi = b.hi if a.hi is None else a.hi if b.hi is None else pick(a.hi, b.hi)
            else:
                lo = b.lo if a.lo is None else a.lo if b.lo is None else pick(a.lo, b.lo)
                hi = None if a.hi is None or b.hi is None else pick(a.hi, b.hi)
            return Interval(lo, hi, max(a.magnitude, b.magnitude))
        if op is Op.FLOORDIV:
            return self._floordiv(n, args)
        if op is Op.MOD:
            return self._mod(n, args)
        return UNBOUNDED if n.type is Type.FLOAT else Interval(None, None)

    def _linear(self, n: Node, args: list[Interval]) -> Interval:
        """`+ - *c` of ints, each end built in the normal form's linear shape (`linear_form`: what
        `canonicalize` makes of the sum of the operands' ends), not as a tree of the ends that the
        rules would then take apart again."""
        op = n.op
        if op is Op.MUL:
            x, y = n.args
            if not (x.is_const or y.is_const):
                return self._mul(n, args)
            parts = [(args[1], int(x.attr))] if x.is_const else [(args[0], int(y.attr))]  # type: ignore[arg-type]
        elif op is Op.NEG:
            parts = [(args[0], -1)]
        else:
            parts = [(args[0], 1), (args[1], 1 if op is Op.ADD else -1)]
        magnitude = sum(abs(k) * part.magnitude for part, k in parts)
        return Interval(_linear_end(parts, upper=False), _linear_end(parts, upper=True), magnitude)

    def _mul(self, n: Node, args: list[Interval]) -> Interval:
        a, b = args
        x, y = n.args
        if y.is_const or x.is_const:
            (k, other) = (y.attr, a) if y.is_const else (x.attr, b)
            magnitude = other.magnitude * abs(k)  # type: ignore[arg-type]
            lo = None if other.lo is None else _scale(other.lo, k)  # type: ignore[arg-type]
            hi = None if other.hi is None else _scale(other.hi, k)  # type: ignore[arg-type]
            if k >= 0:  # type: ignore[operator]
                return Interval(lo, hi, magnitude)
            return Interval(hi, lo, magnitude)
        if not (a.bounded and b.bounded):
            return Interval(None, None, float("inf"))
        corners = [make(Op.MUL, p, r) for p in (a.lo, a.hi) for r in (b.lo, b.hi)]  # type: ignore[arg-type]
        lo, hi = corners[0], corners[0]
        for c in corners[1:]:
            lo, hi = _min(lo, c), _max(hi, c)
        return Interval(lo, hi, a.magnitude * b.magnitude)

    def _floordiv(self, n: Node, args: list[Interval]) -> Interval:
        a = args[0]
        d = n.args[1]
        divisor = args[1]
        if not d.is_const and divisor.lo is not None and divisor.lo == divisor.hi and a.bounded:
            # One divisor per launch (a runtime parameter, a size): monotone in the dividend, its
            # direction by the divisor's sign (and x // 0 is 0).
            zero, point = const(0), divisor.lo
            ascending = (make(Op.FLOORDIV, a.lo, point), make(Op.FLOORDIV, a.hi, point))  # type: ignore[arg-type]
            positive, negative = make(Op.GT, point, zero), make(Op.LT, point, zero)
            return Interval(
                _where(positive, ascending[0], _where(negative, ascending[1], zero)),
                _where(positive, ascending[1], _where(negative, ascending[0], zero)),
            )
        if not d.is_const or d.attr == 0:
            return Interval(None, None)
        lo = None if a.lo is None else make(Op.FLOORDIV, a.lo, d)
        hi = None if a.hi is None else make(Op.FLOORDIV, a.hi, d)
        return Interval(lo, hi) if d.attr > 0 else Interval(hi, lo)  # type: ignore[operator]

    def _mod(self, n: Node, args: list[Interval]) -> Interval:
        a = args[0]
        d = n.args[1]
        if not d.is_const or d.attr == 0:
            return Interval(None, None)
        k = int(d.attr)  # type: ignore[arg-type]
        whole = (const(0), const(k - 1)) if k > 0 else (const(k + 1), const(0))
        if not a.bounded:
            return Interval(*whole)
        # Within one block of |k| consecutive values x % k grows with x; across blocks it takes every value.
        same = make(Op.EQ, make(Op.FLOORDIV, a.lo, d), make(Op.FLOORDIV, a.hi, d))  # type: ignore[arg-type]
        return Interval(
            _where(same, make(Op.MOD, a.lo, d), whole[0]),  # type: ignore[arg-type]
            _where(same, make(Op.MOD, a.hi, d), whole[1]),  # type: ignore[arg-type]
        )

    def _where(self, c: Truth, a: Interval, b: Interval) -> Interval:
        def side(x: Node | None, y: Node | None, pick) -> Node | None:  # type: ignore[no-untyped-def]
            if x is None or y is None:
                return None
            return _where(c.must, x, _where(c.may, pick(x, y), y))

        return Interval(side(a.lo, b.lo, _min), side(a.hi, b.hi, _max), max(a.magnitude, b.magnitude))

    def _float_interval(self, n: Node) -> Interval:
        op = n.op
        if op is Op.CONST:
            value = float(n.attr)  # type: ignore[arg-type]
            return Interval(n, n, abs(value)) if abs(value) <= _FLOAT_LIMIT else UNBOUNDED
        if op is Op.TOFLOAT:
            a = self._intervals[n.args[0]]
            if not a.bounded:
                return UNBOUNDED
            return Interval(make(Op.TOFLOAT, a.lo), make(Op.TOFLOAT, a.hi), _INT_MAGNITUDE)  # type: ignore[arg-type]
        if op is Op.DIV:
            d = n.args[1]
            if not d.is_const or d.attr == 0 or not (abs(d.attr) >= 1e-300):  # type: ignore[arg-type, operator]
                return UNBOUNDED
            a = self._intervals[n.args[0]]
            lo = None if a.lo is None else make(Op.DIV, a.lo, d)
            hi = None if a.hi is None else make(Op.DIV, a.hi, d)
            magnitude = a.magnitude / abs(d.attr)  # type: ignore[arg-type]
            return Interval(lo, hi, magnitude) if d.attr > 0 else Interval(hi, lo, magnitude)  # type: ignore[operator]
        if op is Op.WHERE:
            return self._where(
                self._truths[n.args[0]], self._intervals[n.args[1]], self._intervals[n.args[2]]
            )
        if op in (Op.ADD, Op.SUB, Op.NEG, Op.MUL, Op.ABS, Op.MIN, Op.MAX):
            return self._arith(n, [self._intervals[a] for a in n.args])
        # Loads of float inputs and runtime float parameters (any value, NaN included), transcendental
        # functions.
        return UNBOUNDED

    def _load(self, n: Node) -> Interval:
        decl = self.pattern.input(str(n.attr))
        assert decl is not None
        bounds: list[Node] = []
        for index in n.args:
            i = self._intervals[index]
            bounds += [const(-_FAR) if i.lo is None else i.lo, const(_FAR) if i.hi is None else i.hi]
        return Interval(
            Node(Op.RANGE_MIN, decl.type, tuple(bounds), decl.name),
            Node(Op.RANGE_MAX, decl.type, tuple(bounds), decl.name),
        )

    # ---- bools -----------------------------------------------------------------------------------

    def _truth(self, n: Node) -> Truth:
        op = n.op
        if op is Op.CONST:
            return Truth(n, n)
        if op is Op.AND:
            parts = [self._truths[a] for a in n.args]
            return Truth(_and(*(p.may for p in parts)), _and(*(p.must for p in parts)))
        if op is Op.OR:
            parts = [self._truths[a] for a in n.args]
            return Truth(_or(*(p.may for p in parts)), _or(*(p.must for p in parts)))
        if op is Op.NOT:
            a = self._truths[n.args[0]]
            return Truth(_not(a.must), _not(a.may))
        if op is Op.LOAD:
            bounds = self._load(n)
            return self._exact(Truth(bounds.hi, bounds.lo))  # type: ignore[arg-type]
        if op is Op.WHERE:
            c, a, b = (self._truths[x] for x in n.args)
            may = _or(_and(c.may, a.may), _and(_not(c.must), b.may))
            must = _or(_and(c.must, a.must), _and(_not(c.may), b.must), _and(a.must, b.must))
            return Truth(may, must)
        if op in (Op.EQ, Op.NE) and n.args[0].type is Type.BOOL:
            a, b = (self._truths[x] for x in n.args)
            may = _or(_and(a.may, b.may), _and(_not(a.must), _not(b.must)))
            must = _or(_and(a.must, b.must), _and(_not(a.may), _not(b.may)))
            return Truth(may, must) if op is Op.EQ else Truth(_not(must), _not(may))
        if op in (Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE):
            return self._exact(self._compare(op, self._intervals[n.args[0]], self._intervals[n.args[1]]))
        return UNKNOWN

    def _exact(self, truth: Truth) -> Truth:
        """The truth, or UNKNOWN where computing it could leave int64 (a bound like `q_last + c` with c
        near 2**63 would wrap): the tile predicates are evaluated in int64 (`value_ranges.py`)."""
        return truth if self._ranges.fits(truth.may, truth.must) else UNKNOWN

    def _compare(self, op: Op, a: Interval, b: Interval) -> Truth:
        if op in (Op.GT, Op.GE):  # a > b is b < a
            op, a, b = (Op.LT if op is Op.GT else Op.LE), b, a

        def known(*xs: Node | None) -> bool:
            return all(x is not None for x in xs)

        if op in (Op.LT, Op.LE):
            ranges = self._ranges
            must = compare_form(op, a.hi, b.lo, ranges) if known(a.hi, b.lo) else FALSE  # type: ignore[arg-type]
            may = compare_form(op, a.lo, b.hi, ranges) if known(a.lo, b.hi) else TRUE  # type: ignore[arg-type]
            return Truth(may, must)
        # Equality: may where the ranges overlap; must where both are the same single value.
        if known(a.lo, a.hi, b.lo, b.hi):
            may = _and(make(Op.LE, a.lo, b.hi), make(Op.LE, b.lo, a.hi))  # type: ignore[arg-type]
            must = _and(make(Op.EQ, a.lo, a.hi), make(Op.EQ, b.lo, b.hi), make(Op.EQ, a.lo, b.lo))  # type: ignore[arg-type]
        else:
            may, must = TRUE, FALSE
            if known(a.lo, b.hi):
                may = _and(may, make(Op.LE, a.lo, b.hi))  # type: ignore[arg-type]
            if known(b.lo, a.hi):
                may = _and(may, make(Op.LE, b.lo, a.hi))  # type: ignore[arg-type]
        if op is Op.EQ:
            return Truth(may, must)
        return Truth(_not(must), _not(may))
