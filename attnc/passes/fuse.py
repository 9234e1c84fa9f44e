"""`fuse`: the mask and the score as the kernel's loop body computes them.

A kernel program owns one query tile and loops over key tiles; each iteration evaluates the score
function and, on PARTIAL tiles only, the mask, over a `[BLOCK_M, BLOCK_N]` grid. This pass rewrites both
expressions into the form that body runs, and adds the derivatives the backward kernels need: the
entry's `KernelValues` (`ir/results.py`):

    kernel mask = ..., score = ..., dscore = ...
        mask     the mask (none when every key is allowed)
        score    the score function of `s` (none when the score is `s`)
        dscore   d score / d s, for the backward kernels (none when it is 1: no score function, or
                 `s + bias`)
    kernel grad K: load = ..., value = ...
                 for the K-th load of a float input in the score whose derivative is not identically
                 zero (`analysis/derivative.py`): the load, and d score / d load (`ScoreGradient`)

Three rewrites, each keeping every value the same:

- **Comparisons by axis.** An int comparison `E op c` whose atoms depend on `q` and on `kv` becomes
  `L op R + c` with the atoms over `kv` in R (`q - kv <= 1023` becomes `q <= kv + 1023`, and
  `doc[b, q] - doc[b, kv] == 0` becomes `doc[b, q] == doc[b, kv]`): each side is computed at the size
  of one axis of the grid, only the comparison at the size of the grid, and no difference of two input
  values can overflow int32. Not made where the moved form could leave int64 (`q - kv <= c` with c
  near 2**63: `kv + c` would wrap), see `value_ranges.py`.
- **Bounds placed by axis.** What a comparison of a row value with a key value can do once per query
  tile is done there, so that each element makes one int32 comparison per bound and each key column
  as little as possible (issue 18 item 2): a comparison the value ranges decide is a constant
  (`kv // 64 >= 0`); the constant of `L op R + c` moves to the row side (`q - 1023 <= kv`); a row
  bound on a quotient of the key is a bound on the key (`a <= kv // 64` is `64 * a <= kv`); bounds of
  one key value from one side under one `and` / `or` merge (`kv <= p - 1 or kv <= q` is
  `kv <= max(p - 1, q)`, NATTEN's border-shifted windows); a test of the row alone or'ed with a
  window moves into the window's row bounds (`where(is_global[b, q], -1, q - w) <= kv`); `(L - R) % m == 0`
  compares residues (`L % m == R % m`); and a row side outside int32 compared with a key side inside
  it is clamped to one past the key side's range at either end, which changes no result and makes
  both sides int32 (`q - window` for a runtime window).
- **Cheap division.** `a // d` and `a % d` where `a >= 0` and `d > 0` for every launch
  (`value_ranges.py`) become `udiv` / `umod`: truncating division, no sign fix-up.
- **Hoisting.** Every largest sub-expression that depends on neither `kv` nor `s` (on `q`, `b`, `h`,
  the sizes, and inputs read at those) is the same for every key tile of a program: it becomes a let
  `row_N`, computed once per query tile before the loop, and the kernel values refer to it.

The pattern's own `mask` and `score` stay as they are: the tile analyses and the oracle read those.

**Requires:** a canonicalized, bound entry pattern without lets. **Ensures:** the entry's `kernel`, as
above; lets `row_N` (hoisted values, used only by them), each used at least once. A kernel computes
only the lets its own values use (the forward kernel never computes a derivative's).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.analysis.derivative import derivative
from attnc.analysis.normal_form import build_linear, linear, split_comparison, value_ranges
from attnc.analysis.value_ranges import ValueRanges
from attnc.ir.nodes import BOUND_MARK, ModuleIR, Node, Op, PatternIR, Type, const, make
from attnc.ir.results import KernelValues, ScoreGradient
from attnc.ir.rewrite import rewrite

HOIST_PREFIX = "row_"
_LEAVES = (Op.CONST, Op.VAR, Op.SIZE, Op.PARAM, Op.SCORE, Op.REF)


def _uses_kv(node: Node) -> bool:
    return "kv" in node.free


def _loop_invariant(node: Node) -> bool:
    """Whether the value is the same for every key tile of a query tile: it reads neither kv nor s
    (nor a reduction's variable: it is computed inside that reduction's loop)."""
    free = node.free
    return "kv" not in free and "s" not in free and not any(n[0] == BOUND_MARK for n in free)


def kernel_form(root: Node, pattern: PatternIR) -> Node:
    """Comparisons split by axis, decided by value ranges, their constants and their row sides
    narrowed to int32 on the row side, and division made cheap where proven safe (values
    unchanged)."""
    ranges = value_ranges(pattern)

    def rule(node: Node) -> Node | None:
        op = node.op
        if op in (Op.AND, Op.OR):
            folded = _junction_of_constants(node)
            if folded is not None and folded.op not in (Op.AND, Op.OR):
                return folded
            junction = folded or node
            merged = _merged_bounds(junction, ranges) or junction
            if merged.op is Op.OR:
                merged = _row_tests_into_bounds(merged, ranges)
            return None if merged is node else merged
        if op not in _COMPARE:
            return _cheap_division(node, ranges)
        if node.args[0].type is not Type.INT:
            return None
        result = node
        split = split_comparison(node, _uses_kv)
        if split is not None and (ranges.fits(split) or not ranges.fits(node)):
            result = split  # not where `kv + c` could leave int64 (`sliding_window(window=2**63 - 1)`)
        else:
            result = _residues_compared(node, ranges) or node
        decided = _decided(result, ranges)
        if decided is not None:
            return const(decided)
        result = _constant_to_row(result, ranges)
        result = _constant_to_row(_quotient_bound(result, ranges), ranges)
        result = _narrowed(result, ranges)
        return None if result is node else result

    return rewrite(root, rule)


_COMPARE = frozenset((Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE))
_MIRROR = {Op.EQ: Op.EQ, Op.NE: Op.NE, Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE}
_INT32 = (-(1 << 31), (1 << 31) - 1)


def _cheap_division(node: Node, ranges: ValueRanges) -> Node | None:
    """`a // d` and `a % d` as truncating `udiv` / `umod` where `a >= 0` and `d > 0`."""
    cheap = {Op.FLOORDIV: Op.UDIV, Op.MOD: Op.UMOD}
    if node.op in cheap and ranges.nonnegative(node.args[0]) and ranges.positive(node.args[1]):
        return replace(node, op=cheap[node.op])
    return None


def _decided(node: Node, ranges: ValueRanges) -> bool | None:
    """The value of an int comparison that the operands' value ranges decide for every launch
    (`kv // 64 >= 0`: a column of comparisons that are all true), else None."""
    if node.op not in _COMPARE or node.args[0].type is not Type.INT:
        return None
    (alo, ahi), (blo, bhi) = ranges.of(node.args[0]), ranges.of(node.args[1])
    op = node.op
    if op in (Op.GT, Op.GE):
        (alo, ahi), (blo, bhi), op = (blo, bhi), (alo, ahi), _MIRROR[op]
    if op is Op.LE and (ahi <= blo or alo > bhi):
        return ahi <= blo
    if op is Op.LT and (ahi < blo or alo >= bhi):
        return ahi < blo
    if op in (Op.EQ, Op.NE) and (ahi < blo or bhi < alo):
        return op is Op.NE
    return None


def _junction_of_constants(node: Node) -> Node | None:
    """`and` / `or` without the constant operands `_decided` left (`x and true` is `x`)."""
    if not any(a.is_const for a in node.args):
        return None
    absorbing = node.op is Op.OR  # `or` with a true operand is true; `and` with a false one, false
    if any(a.is_const and bool(a.attr) is absorbing for a in node.args):
        return const(absorbing)
    rest = [a for a in node.args if not a.is_const]
    if not rest:
        return const(not absorbing)
    return rest[0] if len(rest) == 1 else make(node.op, *rest)


def _merged_bounds(node: Node, ranges: ValueRanges) -> Node | None:
    """An `and` / `or` whose operands bound the same key value from the same side by row values, with
    those bounds merged into one on the row side: `a <= x or c <= x` is `min(a, c) <= x`, `x <= b and
    x <= d` is `x <= min(b, d)` (a NATTEN window shifted at the border, `j >= start or j >= n - k`,
    becomes one comparison per element instead of two and a column test); None where none merge."""
    groups: dict[tuple[Node, bool], list[int]] = {}
    for i, a in enumerate(node.args):
        side = _row_side(a) if _int_bound(a) else None
        if side is not None:
            lower = (a.op is Op.LE) == (side == 0)  # `bound <= key`, or `key >= bound`
            groups.setdefault((a.args[1 - side], lower), []).append(i)
    merges = {indices[0]: key for key, indices in groups.items() if len(indices) > 1}
    if not merges:
        return None
    is_or = node.op is Op.OR
    args: list[Node] = []
    for i, a in enumerate(node.args):
        key = merges.get(i)
        if key is None:
            if not any(i in groups[k] for k in merges.values()):
                args.append(a)
            continue
        value, lower = key
        bounds = [_bound_of(node.args[j]) for j in groups[key]]
        # Of lower bounds, `or` needs the least and `and` the greatest; of upper bounds the reverse.
        pick = Op.MIN if is_or == lower else Op.MAX
        bound = bounds[0]
        for other in bounds[1:]:
            bound = make(pick, bound, other)
        merged = make(Op.LE, bound, value) if lower else make(Op.GE, bound, value)
        args.append(_narrowed(merged, ranges))
    return args[0] if len(args) == 1 else make(node.op, *args)


def _row_tests_into_bounds(node: Node, ranges: ValueRanges) -> Node:
    """`(a <= x and x <= b) or r`, a window of key values x or'ed with tests `r` of the row alone, as
    `where(r, lo, a) <= x and x <= where(r, hi, b)` where [lo, hi] is x's value range: in a row where r
    holds, every bound is met. The tests fold into the row bounds once per query tile, and each element
    makes only its bound comparisons, not an `or` with them (the Longformer global token's row: 287
    integer instructions per PARTIAL tile, sm_90, 229 with this). The other operands of the `or` stay
    as they are: a test of the key alone (its column of global tokens) costs less as an `or` per
    element than moved into the key values, where the window's two bounds need a select each per
    column (261 against 229)."""
    windows = [a for a in node.args if _window(a)]
    if len(windows) != 1:
        return node
    window = windows[0]
    tests = [a for a in node.args if a is not window and a.type is Type.BOOL and _loop_invariant(a)]
    if not tests:
        return node
    test = tests[0] if len(tests) == 1 else make(Op.OR, *tests)
    comparisons = window.args if window.op is Op.AND else (window,)
    rebuilt = []
    for comparison in comparisons:
        side = _row_side(comparison)
        assert side is not None
        row, key = comparison.args[side], comparison.args[1 - side]
        lower = (comparison.op is Op.LE) == (side == 0)  # `row <= key`, or `key >= row`
        lo, hi = ranges.of(key)
        if lo < _INT32[0] or hi > _INT32[1]:
            # (An int64 input's range is a contract the caller may break, ±2**62: no bound is taken
            # from it. Positions and int32 values are bounded for every launch.)
            return node
        row = make(Op.WHERE, test, const(lo if lower else hi), row)
        rebuilt.append(_narrowed(make(comparison.op, *((row, key) if side == 0 else (key, row))), ranges))
    widened = rebuilt[0] if len(rebuilt) == 1 else make(Op.AND, *rebuilt)
    rest = [a for a in node.args if a is not window and a not in tests]
    return widened if not rest else make(Op.OR, widened, *rest)


def _window(node: Node) -> bool:
    """A bound of a key value by a row value, or an `and` of such bounds."""
    parts = node.args if node.op is Op.AND else (node,)
    return all(_int_bound(p) and _row_side(p) is not None for p in parts)


def _int_bound(node: Node) -> bool:
    """An int `<=` / `>=`: only ints merge into min / max (a float bound may be NaN, which `min`
    propagates and `<=` does not) or move into a key's values (value ranges bound ints)."""
    return node.op in (Op.LE, Op.GE) and node.args[0].type is Type.INT


def _bound_of(comparison: Node) -> Node:
    """The row side of a comparison that `_row_side` finds one in."""
    side = _row_side(comparison)
    assert side is not None
    return comparison.args[side]


def _residues_compared(node: Node, ranges: ValueRanges) -> Node | None:
    """`(L - R) % m == 0` (and `!=`) as `L % m == R % m`, with the atoms over `kv` in R: each residue
    at the size of one axis, only the comparison at the size of the grid. Exact for every `m` (floor
    modulo: equal residues are a multiple of m apart; `x % 0` is `x`)."""
    if node.op not in (Op.EQ, Op.NE):
        return None
    mod, zero = node.args
    if zero.op in (Op.MOD, Op.UMOD):
        mod, zero = zero, mod
    if mod.op not in (Op.MOD, Op.UMOD) or zero != const(0):
        return None
    terms, constant = linear(mod.args[0])
    left = {a: k for a, k in terms.items() if not _uses_kv(a)}
    right = {a: -k for a, k in terms.items() if _uses_kv(a)}
    if not left or not right:
        return None
    m = mod.args[1]
    sides = []
    for side_terms, c in ((left, constant), (right, 0)):
        value = build_linear(side_terms, c)
        residue = make(Op.MOD, value, m)
        sides.append(_cheap_division(residue, ranges) or residue)
    result = make(node.op, *sides)
    return result if ranges.fits(result) else None


def _row_side(node: Node) -> int | None:
    """Which operand (0 or 1) of a comparison is the same for every key (a row, or a scalar), where
    the other one reads `kv`; None otherwise."""
    for i in (0, 1):
        if _loop_invariant(node.args[i]) and _uses_kv(node.args[1 - i]):
            return i
    return None


def _constant_to_row(node: Node, ranges: ValueRanges) -> Node:
    """`L op R + c` as `L - c op R` where L is the row side: the constant is added once per query
    tile (hoisted with L), not once per key column."""
    side = _row_side(node)
    if side is None:
        return node
    terms, constant = linear(node.args[1 - side])
    if not constant:
        return node
    row_terms, row_constant = linear(node.args[side])
    row = build_linear(row_terms, row_constant - constant)
    key = build_linear(terms, 0)
    args = (row, key) if side == 0 else (key, row)
    moved = make(node.op, *args)
    return moved if ranges.fits(moved) else node


def _quotient_bound(node: Node, ranges: ValueRanges) -> Node:
    """A row bound on a quotient of the key, `a <= x // c` or `a >= x // c` (c > 0 a constant), as a
    bound on the key itself, `c * a <= x` or `c * a + c - 1 >= x` (floor division: exact for every
    sign): the multiply is done once per query tile, and no key column divides."""
    side = _row_side(node)
    if side is None or node.op not in (Op.LE, Op.GE):
        return node
    row, key = node.args[side], node.args[1 - side]
    if key.op not in (Op.FLOORDIV, Op.UDIV) or not key.args[1].is_const or int(key.args[1].attr) <= 0:  # type: ignore[arg-type]
        return node
    c = int(key.args[1].attr)  # type: ignore[arg-type]
    lower = (node.op is Op.LE) == (side == 0)
    terms, constant = linear(row)
    bound = build_linear({a: c * k for a, k in terms.items()}, c * constant + (0 if lower else c - 1))
    moved = make(Op.LE, bound, key.args[0]) if lower else make(Op.GE, bound, key.args[0])
    return moved if ranges.fits(moved) else node


def _narrowed(node: Node, ranges: ValueRanges) -> Node:
    """A comparison of a row side outside int32 with a key side inside it, with the row side clamped
    to one past the key side's range at either end: every comparison with a key gives the same result,
    and both sides are int32 (one int32 instruction per element instead of two int64 ones)."""
    side = _row_side(node)
    if side is None:
        return node
    row, key = node.args[side], node.args[1 - side]
    lo, hi = ranges.of(key)
    if ranges.of(row)[0] >= _INT32[0] and ranges.of(row)[1] <= _INT32[1]:
        return node
    if lo - 1 < _INT32[0] or hi + 1 > _INT32[1]:
        return node
    clamped = make(Op.MAX, make(Op.MIN, row, const(hi + 1)), const(lo - 1))
    args = (clamped, key) if side == 0 else (key, clamped)
    return make(node.op, *args)


def hoist(roots: dict[Hashable, Node], taken: set[str]) -> tuple[dict[str, Node], dict[Hashable, Node]]:
    """The largest loop-invariant interior sub-expressions of the roots as lets, and the roots
    referring to them: (lets by name, in dependency order; the rewritten roots by key). A node is
    hoisted when it is loop invariant and is a root or has a user that is not."""
    invariant: dict[Node, bool] = {}
    variant_user: dict[Node, bool] = {}
    for root in roots.values():
        variant_user[root] = True
        for n in root.walk():
            invariant.setdefault(n, _loop_invariant(n))
            for a in n.args:
                variant_user[a] = variant_user.get(a, False) or not invariant[n]
    lets: dict[str, Node] = {}
    memo: dict[Node, Node] = {}
    for root in roots.values():
        for n in root.walk(skip=memo.__contains__):
            rebuilt = n.with_args(tuple(memo[a] for a in n.args))
            if invariant[n] and n.op not in _LEAVES and variant_user.get(n, False):
                name = _fresh(len(lets), taken)
                lets[name] = rebuilt
                rebuilt = Node(Op.REF, n.type, (), name)
            memo[n] = rebuilt
    return lets, {key: memo[root] for key, root in roots.items()}


def _fresh(index: int, taken: set[str]) -> str:
    while f"{HOIST_PREFIX}{index}" in taken:
        index += 1
    taken.add(f"{HOIST_PREFIX}{index}")
    return f"{HOIST_PREFIX}{index}"


def score_gradients(pattern: PatternIR) -> tuple[Node | None, list[tuple[Node, Node]]]:
    """d score / d s (None when it is 1), and (load, d score / d load) for each load of a float input
    in the score whose derivative is not identically zero, in a fixed order."""
    score = pattern.score
    if score is None or score.op is Op.SCORE:
        return None, []
    scores = [n for n in score.walk() if n.op is Op.SCORE]
    dscore = derivative(score, scores[0], pattern) if scores else None
    dscore = const(0.0) if dscore is None else None if dscore == const(1.0) else dscore
    loads = []
    for n in score.walk():
        # A load inside a reduction's loop reads a new position on each step: it has no gradient
        # (an input requiring grad there is refused at the call); unrolled reductions have none.
        if n.op is Op.LOAD and n.type is Type.FLOAT and not any(v[0] == BOUND_MARK for v in n.free):
            grad = derivative(score, n, pattern)
            if grad is not None:
                loads.append((n, grad))
    return dscore, loads


def fuse(pattern: PatternIR) -> PatternIR:
    """The pattern with its kernel values and hoisted lets (see the module docstring)."""
    pattern = replace(pattern, lets=tuple((n, v) for n, v in pattern.lets if not n.startswith(HOIST_PREFIX)))
    roots: dict[Hashable, Node] = {}
    if pattern.mask is not None and pattern.mask != const(True):
        roots["mask"] = kernel_form(pattern.mask, pattern)
    if pattern.score is not None and pattern.score.op is not Op.SCORE:
        roots["score"] = kernel_form(pattern.score, pattern)
    dscore, loads = score_gradients(pattern)
    if dscore is not None:
        roots["dscore"] = kernel_form(dscore, pattern)
    for k, (load, grad) in enumerate(loads):
        roots["load", k] = kernel_form(load, pattern)
        roots["value", k] = kernel_form(grad, pattern)
    lets, fused = hoist(roots, {d.name for d in pattern.inputs})
    kernel = KernelValues(
        mask=fused.get("mask"),
        score=fused.get("score"),
        dscore=fused.get("dscore"),
        gradients=tuple(ScoreGradient(fused["load", k], fused["value", k]) for k in range(len(loads))),
    )
    return replace(pattern, lets=pattern.lets + tuple(lets.items()), kernel=kernel)


@dataclass(frozen=True)
class Fuse:
    name: ClassVar[str] = "fuse"

    def run(self, module: ModuleIR) -> ModuleIR:
        return module.with_entry(fuse(module.entry))
