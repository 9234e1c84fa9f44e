"""`derive-ranges`: closed-form key ranges per query tile (and query ranges per key tile), no metadata.

For masks built from bounds on affine forms of `q` and `kv` (causal, bottom-right causal, sliding
windows, local bands, sinks, prefix LM, blocked forms like `q // 64 == kv // 64`, their unions and
intersections) the keys a query tile may see are a small union of intervals whose ends are simple
expressions of the tile's bounds. The pass writes the mask in disjunctive normal form and, for each
conjunct `j`, solves its constraints for `kv` over the query tile `q in [q_first, q_last]`, giving
the entry's `Ranges` (`ir/results.py`), an `AxisRange` per conjunct and axis:

    range kv j: lo, hi            every key the conjunct allows for some query of the tile lies in
                                  [lo, hi] (a sound hull; empty when lo > hi)
                full_lo, full_hi  every key in [full_lo, full_hi] is allowed for every query of the
                                  tile (a sound core; empty when full_lo > full_hi)

and likewise `range q j` over a key tile `kv in [kv_first, kv_last]`, the transposed ranges the
backward pass iterates. All are element positions, clipped to the lengths; a kernel turns them into
tile indices with its own block sizes, so they serve every tile shape. A key tile is visited if it
meets some hull, and is FULL if it lies in some core (`runtime/plan.py` spells this out).

A constraint `E op c` with `E` affine is solved for `kv` when `kv` appears in `E` once, as `kv` or as
`kv // d` (d > 0 constant); the rest of `E` is bounded over the tile by interval analysis. Constraints
without `kv` guard the conjunct (it is empty where they are false, and has no core where they are not
true). Strided constraints `(... kv ...) % d == r` with `d <= STRIDE_LIMIT` (dilation) leave the hull
as it is (tiles of at least 16 keys still meet them) and empty the core. Any other use of `kv`, a load
of an input, or a normal form with more than `MAX_CONJUNCTS` conjuncts: no ranges are derived, and
`block-sparsify` builds metadata instead.

**Requires:** a canonicalized, bound entry pattern. **Ensures:** either no `ranges`, or `ranges` with
the same number of conjuncts on both axes, every bound canonical.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.analysis.intervals import Interval, IntervalAnalysis
from attnc.analysis.normal_form import (
    Terms,
    canonicalize_all,
    combine,
    compare_form,
    linear,
    linear_form,
    value_ranges,
)
from attnc.analysis.value_ranges import ValueRanges
from attnc.ir.nodes import ModuleIR, Node, Op, PatternIR, Type, const, make, size, var
from attnc.ir.results import AxisRange, Ranges

# Members read on hot paths, as module constants: a read of `Op.X` or `Type.X` costs Python 3.10 and
# 3.11 a call of `EnumType.__getattr__`'s hook (`ir/nodes.py`).
_AND = Op.AND
_EQ = Op.EQ
_FLOORDIV = Op.FLOORDIV
_GE = Op.GE
_GT = Op.GT
_INT = Type.INT
_LE = Op.LE
_LOAD = Op.LOAD
_LT = Op.LT
_MAX = Op.MAX
_MIN = Op.MIN
_MOD = Op.MOD
_OR = Op.OR
_SUB = Op.SUB
_VAR = Op.VAR
_WHERE = Op.WHERE

MAX_CONJUNCTS = 16
STRIDE_LIMIT = 16

_LENGTH = {"q": "Q_LEN", "kv": "KV_LEN"}
_OTHER = {"q": "kv", "kv": "q"}
_COMPARISONS = (Op.LE, Op.LT, Op.GE, Op.GT, Op.EQ)

Bounds = tuple[Node, Node, Node, Node]
"""(lo, hi, full_lo, full_hi) of one conjunct on one axis."""


class NotAnalytic(Exception):
    """The mask has no closed-form ranges; the reason is the message."""


def dnf(mask: Node | None, memo: dict[Node, list[list[Node]]] | None = None) -> list[list[Node]]:
    """The mask as a disjunction of conjunctions of atoms (anything but and/or, and true/false).
    Each shared sub-expression is expanded once (`memo`); the size cap bounds the rest."""
    if mask is None:
        return [[]]
    memo = {} if memo is None else memo
    if mask in memo:
        return memo[mask]
    if mask.is_const:
        return [[]] if mask.attr else []
    if mask.op is _OR:
        result = [c for a in mask.args for c in dnf(a, memo)]
    elif mask.op is _AND:
        result = [[]]
        for a in mask.args:
            part = dnf(a, memo)
            result = [x + y for x in result for y in part]
            if len(result) > MAX_CONJUNCTS:
                break
    else:
        result = [[mask]]
    if len(result) > MAX_CONJUNCTS:
        raise NotAnalytic(f"the mask's normal form has more than {MAX_CONJUNCTS} conjuncts")
    memo[mask] = result
    return result


def _uses(node: Node, name: str) -> bool:
    return name in node.free


@dataclass(frozen=True)
class _Bound:
    """`var >= value` (lower) or `var <= value` (upper): `hull` for some query of the tile, `core` for
    every one (None: no such guarantee)."""

    upper: bool
    hull: Node | None
    core: Node | None
    point: Node  # the bound at one point of the other variable (and b, h), before taking hull or core


class _Solver:
    """Solves the conjuncts of one mask for one target. An atom shared by several conjuncts (the normal
    form repeats each factor of an `and` of `or`s in every conjunct it multiplies) is solved once, and
    so is each pair of bounds checked for crossing."""

    def __init__(self, pattern: PatternIR, target: str, ranges: ValueRanges) -> None:
        self.target = target
        other = _OTHER[target]
        self.box = {other: (var(f"{other}_first"), var(f"{other}_last"))}
        self.ranges = ranges
        self.analysis = IntervalAnalysis(pattern, self.box, ranges)
        self._bounds: dict[Node, list[_Bound] | None] = {}
        self._gaps: dict[tuple[Node, Node], Node | None] = {}

    def bounds(self, atom: Node) -> list[_Bound] | None:
        """The atom's constraint on the target variable, or None if it is not a solvable one."""
        if atom not in self._bounds:
            self._bounds[atom] = self._solve_atom(atom)
        return self._bounds[atom]

    def _solve_atom(self, atom: Node) -> list[_Bound] | None:
        if atom.op not in _COMPARISONS or atom.args[0].type is not _INT:
            return None
        left, right = atom.args
        terms_l, c_l = linear(left)
        terms_r, c_r = linear(right)
        terms = combine(terms_l, terms_r, -1)
        constant = c_r - c_l  # sum(terms) op constant
        dependent = [(a, k) for a, k in terms.items() if _uses(a, self.target)]
        if len(dependent) != 1:
            return None
        g, k = dependent[0]
        divisor = 1
        if g.op is _FLOORDIV and g.args[1].is_const and g.args[1].attr > 0:  # type: ignore[operator]
            divisor, g = int(g.args[1].attr), g.args[0]  # type: ignore[arg-type]
        if not (g.op is _VAR and g.attr == self.target):
            return None
        # k * atom + P op constant, so k * atom op R with R = constant - P.
        rest = {a: -c for a, c in terms.items() if a != dependent[0][0]}
        r_point = linear_form(rest, constant)
        r = self._linear_interval(rest, constant)
        op = atom.op
        if op is _LT:
            r, op, r_point = self._shift(r, -1), _LE, _affine(r_point, 1, -1)
        elif op is _GT:
            r, op, r_point = self._shift(r, 1), _GE, _affine(r_point, 1, 1)
        result = []
        if op in (_LE, _EQ):
            result.append(self._solve(k, r, r_point, divisor))
        if op in (_GE, _EQ):  # k * atom >= R is -k * atom <= -R
            negated = Interval(
                None if r.hi is None else _affine(r.hi, -1), None if r.lo is None else _affine(r.lo, -1)
            )
            result.append(self._solve(-k, negated, _affine(r_point, -1), divisor))
        return result

    @staticmethod
    def _shift(r: Interval, by: int) -> Interval:
        def add(x: Node | None) -> Node | None:
            return None if x is None else _affine(x, 1, by)

        return Interval(add(r.lo), add(r.hi))

    @staticmethod
    def _solve(k: int, r: Interval, r_point: Node, divisor: int) -> _Bound:
        """`k * (target // divisor) <= R`, R over [r.lo, r.hi] (R = r_point at a point), as a bound on
        the target."""

        def over(x: Node | None) -> Node | None:  # the bound on target // divisor, then on target
            if x is None:
                return None
            if k > 0:  # atom <= floor(R / k)
                t = x if k == 1 else make(_FLOORDIV, x, const(k))
                return t if divisor == 1 else _affine(t, divisor, divisor - 1)
            # atom >= ceil(R / k) = -floor(R / |k|)
            t = _affine(x if k == -1 else make(_FLOORDIV, x, const(-k)), -1)
            return t if divisor == 1 else _affine(t, divisor)

        # The largest R admits the most positions (the hull); the smallest, the fewest (the core).
        return _Bound(upper=k > 0, hull=over(r.hi), core=over(r.lo), point=over(r_point))  # type: ignore[arg-type]

    def residual_is_strided(self, atom: Node) -> bool:
        """`E == c` with the target only inside one `(±target + rest) % d`, 0 < |d| <= STRIDE_LIMIT."""
        if atom.op is not _EQ or atom.args[0].type is not _INT:
            return False
        terms, _ = linear(atom.args[0])
        dependent = [a for a in terms if _uses(a, self.target)]
        if _uses(atom.args[1], self.target) or len(dependent) != 1:
            return False
        m = dependent[0]
        if m.op is not _MOD or not m.args[1].is_const:
            return False
        d = abs(int(m.args[1].attr))  # type: ignore[arg-type]
        inner, _ = linear(m.args[0])  # the target must step by one: d consecutive values meet every residue
        steps = [(a, k) for a, k in inner.items() if _uses(a, self.target)]
        unit = len(steps) == 1 and steps[0][0].op is _VAR and abs(steps[0][1]) == 1
        return unit and 0 < d <= STRIDE_LIMIT

    def conjunct(self, atoms: list[Node]) -> Bounds:
        """(lo, hi, full_lo, full_hi) of one conjunct, in target positions, clipped to the length."""
        last = make(_SUB, size(_LENGTH[self.target]), const(1))
        lo: Node = const(0)
        hi: Node = last
        full_lo: Node = const(0)
        full_hi: Node = last
        has_core = True
        lowers: list[Node] = []
        uppers: list[Node] = []
        for atom in atoms:
            if not _uses(atom, self.target):  # a guard on the other variable (or on b, h)
                truth = self.analysis.truth(atom)
                hi = make(_WHERE, truth.may, hi, const(-1))
                full_hi = make(_WHERE, truth.must, full_hi, const(-1))
                continue
            bounds = self.bounds(atom)
            if bounds is None:
                if not self.residual_is_strided(atom):
                    raise NotAnalytic(f"no closed form for a constraint on {self.target}")
                has_core = False
                continue
            for b in bounds:
                (uppers if b.upper else lowers).append(b.point)
                if b.hull is not None:
                    lo, hi = (lo, make(_MIN, hi, b.hull)) if b.upper else (make(_MAX, lo, b.hull), hi)
                if b.core is None:
                    has_core = False
                elif b.upper:
                    full_hi = make(_MIN, full_hi, b.core)
                else:
                    full_lo = make(_MAX, full_lo, b.core)
        # The hull takes the widest bounds over the tile; a conjunct whose bounds cross at every point
        # of the tile (kv >= q - 4 and kv <= q - 16) is empty nonetheless.
        for lower in lowers:
            for upper in uppers:
                gap = self._gap(lower, upper)
                if gap is not None:
                    hi = make(_WHERE, compare_form(_GE, gap, const(0), self.ranges), hi, const(-1))
        if not has_core:
            full_lo, full_hi = const(0), const(-1)
        else:
            full_hi = make(_MIN, full_hi, hi)  # the core lies within the hull
        return lo, hi, full_lo, full_hi

    def _gap(self, lower: Node, upper: Node) -> Node | None:
        """The largest `upper - lower` over the tile, or None if unbounded."""
        key = (lower, upper)
        if key not in self._gaps:
            (upper_terms, upper_constant), (lower_terms, lower_constant) = linear(upper), linear(lower)
            gap = combine(upper_terms, lower_terms, -1)
            self._gaps[key] = self._linear_interval(gap, upper_constant - lower_constant).hi
        return self._gaps[key]

    def _linear_interval(self, terms: Terms, constant: int) -> Interval:
        """The interval of `sum(k * atom) + constant` over the tile, from its atoms' intervals, each end
        in the normal form's linear shape: what `canonicalize` makes of the ends `interval` finds for
        the sum's tree, made without building that tree (its `+`, `-` and `*` of the atoms' ends)."""
        return Interval(self._linear_end(terms, constant, False), self._linear_end(terms, constant, True))

    def _linear_end(self, terms: Terms, constant: int, upper: bool) -> Node | None:
        total: Terms = {}
        for atom, k in terms.items():
            atom_range = self.analysis.interval(atom)
            end = atom_range.hi if (k > 0) == upper else atom_range.lo
            if end is None:  # unbounded that way
                return None
            end_terms, end_constant = linear(end)
            total = combine(total, end_terms, k)
            constant += k * end_constant
        return linear_form(total, constant)


def _affine(x: Node, scale: int, offset: int = 0) -> Node:
    """`scale * x + offset` for an int `x`, built in the normal form's linear shape (what canonicalize
    would make of it), so that the bounds reach `canonicalize_all` close to their normal form."""
    terms, constant = linear(x)
    return linear_form({a: scale * k for a, k in terms.items()}, scale * constant + offset)


def derive(pattern: PatternIR, ranges: ValueRanges) -> tuple[list[Bounds], list[Bounds]]:
    """Per conjunct, the (lo, hi, full_lo, full_hi) expressions of `kv` over a query tile, and of `q`
    over a key tile; raises NotAnalytic when the mask has no closed form. Both axes solve the same
    conjuncts, whose atoms are parts of the mask: the mask is checked for loads once for all of them.
    `ranges` are the pattern's value ranges."""
    if pattern.mask is not None and any(n.op is _LOAD for n in pattern.mask.walk()):
        raise NotAnalytic("the mask loads an input")
    conjuncts = dnf(pattern.mask)
    kv, q = _Solver(pattern, "kv", ranges), _Solver(pattern, "q", ranges)
    raw = [kv.conjunct(atoms) for atoms in conjuncts] + [q.conjunct(atoms) for atoms in conjuncts]
    # One normal-form rewrite for all the bounds: they are built of the same canonical parts.
    forms = iter(canonicalize_all(tuple(x for bounds in raw for x in bounds)))
    ranges: list[Bounds] = [(next(forms), next(forms), next(forms), next(forms)) for _ in raw]
    return ranges[: len(conjuncts)], ranges[len(conjuncts) :]


@dataclass(frozen=True)
class DeriveRanges:
    name: ClassVar[str] = "derive-ranges"

    def run(self, module: ModuleIR) -> ModuleIR:
        entry = module.entry
        ranges = value_ranges(entry)  # shared by both axes, the check below and the other passes
        try:
            kv_ranges, q_ranges = derive(entry, ranges)
        except NotAnalytic:
            return module
        if not ranges.fits(*(x for r in kv_ranges + q_ranges for x in r)):
            return module  # a bound like `kv_last + c` could leave int64 (`value_ranges.py`): metadata
        result = Ranges(tuple(AxisRange(*r) for r in kv_ranges), tuple(AxisRange(*r) for r in q_ranges))
        return module.with_entry(replace(entry, ranges=result))
