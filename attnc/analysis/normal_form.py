"""The normal form of expressions (`canonicalize`): constant folding, algebraic and boolean
simplification, and a normal form for integer comparisons that the other analyses match. The
`canonicalize` pass applies it to a pattern; the tile analyses, derivatives and plans apply it to what
they build.

The normal form is a fixed point of the rules below. Every int comparison reads `E op c`: op one of
`le ge eq ne`, c a constant, and E a linear combination of atoms in a fixed order (`q`, `kv`, `b`, `h`,
sizes, params, then other sub-expressions), with coprime coefficients and a positive leading one —
so `kv <= q` becomes `ge(sub(q, kv), 0)` and `q - kv < 256` becomes `le(sub(q, kv), 255)`. `abs`,
`min` and `max` inside such comparisons are distributed into `and`/`or` of comparisons, so that
windows like `abs(q - kv) <= w` expose their two affine bounds. Negations are pushed down to the
comparisons (negation normal form); `and`/`or` are flattened, deduplicated, absorbed, and bounds on the
same linear expression are merged (a contradiction folds to false). Identical sub-expressions are one
node (the IR is hash-consed), which is common sub-expression elimination.

Float arithmetic is only folded and rewritten where exact (`x * 1.0`, `-(-x)`), never reassociated, so
the kernel computes what the user wrote. Every rule is checked against the dense oracle in the tests.
"""

from __future__ import annotations

import hashlib
import math
import operator
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from attnc.analysis.value_ranges import ValueRanges
from attnc.errors import InternalError
from attnc.ir import fold
from attnc.ir.nodes import (
    INDEX_VARS,
    SIZES,
    TILE_VARS,
    Node,
    Op,
    PatternIR,
    Type,
    const,
    existing,
    make,
    walk_all,
)
from attnc.ir.rewrite import rewrite_all

# Members read on hot paths, as module constants: a read of `Op.X` or `Type.X` costs Python 3.10 and
# 3.11 a call of `EnumType.__getattr__`'s hook (`ir/nodes.py`).
_ABS = Op.ABS
_AND = Op.AND
_BOOL = Type.BOOL
_DIV = Op.DIV
_EQ = Op.EQ
_FLOAT = Type.FLOAT
_FLOORDIV = Op.FLOORDIV
_GT = Op.GT
_LT = Op.LT
_MAX = Op.MAX
_MIN = Op.MIN
_MOD = Op.MOD
_NE = Op.NE
_NOT = Op.NOT
_OR = Op.OR

_MAX_ROUNDS = 64
# The members the rules' hot paths read, as module constants: a read of `Op.ADD` costs Python 3.10 and
# 3.11 a call of `EnumType.__getattr__`'s hook (`ir/nodes.py`).
_ADD, _SUB, _NEG, _MUL = Op.ADD, Op.SUB, Op.NEG, Op.MUL
_CONST, _VAR, _SIZE, _REF, _PARAM = Op.CONST, Op.VAR, Op.SIZE, Op.REF, Op.PARAM
_WHERE, _LE, _GE = Op.WHERE, Op.LE, Op.GE
_DISTRIBUTED = frozenset((Op.MIN, Op.MAX, Op.ABS))
_INT = Type.INT
_LINEAR_OPS = frozenset((Op.ADD, Op.SUB, Op.NEG, Op.MUL))
_BOUND_OPS = frozenset((Op.LE, Op.GE, Op.EQ))
_DISTRIBUTE_LIMIT = 400  # nodes in a comparison beyond which min/max are not distributed


def canonicalize(root: Node, pattern: PatternIR | None = None) -> Node:
    """Rewrite an expression to the fixed point of the rules. A rule's result is kept only where its int
    values stay inside int64 whenever the node's did (`value_ranges`; `pattern` gives the inputs'
    dtypes, a load of an unknown one may be any int64): `q - kv <= c` is not made of `q <= kv + c`
    where `kv + c` could overflow, and `q - kv < -2**63` keeps its `<`.

    Inside `shared_tables` (a compilation), calls share what they learn: which nodes are already normal
    forms (given to no rule again) and the normal form of each root, so the analyses, which canonicalise
    many expressions with canonical parts in common, pay for each part once."""
    return canonicalize_all((root,), pattern)[0]


def canonicalize_all(roots: tuple[Node, ...], pattern: PatternIR | None = None) -> tuple[Node, ...]:
    """`canonicalize` of each root, in one rewrite over all of them: what a caller with several
    expressions built of common parts (the bounds of a tile range) pays once, not once per root."""
    with shared_tables() as tables:
        return _canonicalize(roots, _context(tables, pattern))


def _context(tables: _Tables, pattern: PatternIR | None) -> _Context:
    # The inputs' dtypes: all that the rules read of the pattern (`ValueRanges(pattern)`).
    key = tuple(sorted({d.name: d.dtype for d in pattern.inputs}.items())) if pattern else ()
    context = tables.contexts.get(key)
    if context is None:
        context = tables.contexts[key] = _Context(ValueRanges(pattern))
    return context


def value_ranges(pattern: PatternIR) -> ValueRanges:
    """`ValueRanges(pattern)` (its lets unknown): inside `shared_tables` (a compilation), the one the
    normal form uses for patterns with these input dtypes, so that the analyses of a compilation bound
    each node once."""
    tables = _open.tables
    if tables is None:
        return ValueRanges(pattern)
    return _context(tables, pattern).ranges


def _canonicalize(roots: tuple[Node, ...], context: _Context) -> tuple[Node, ...]:
    # Roots already known in normal form, or whose normal form is known, need no rewrite.
    results: list[Node | None] = []
    pending: list[int] = []
    for i, root in enumerate(roots):
        if root in context.normal:
            results.append(root)
        elif root is root.canonical and root in context.forms:  # a located root keeps its locations
            results.append(context.forms[root])
        else:
            results.append(None)
            pending.append(i)
    if not pending:
        return tuple(results)  # type: ignore[arg-type]
    starts = [roots[i] for i in pending]
    current = list(starts)
    memo: dict[Node, Node] = {}

    fixed = _open.tables.fixed  # type: ignore[union-attr]
    # The nodes the rules left as they were, in an earlier round: the rules are functions of the node
    # (its operands are part of it), so they would leave it again. A round after the first then gives
    # the rules only what the last one made: rule results and what rules built inside them.
    checked: set[Node] = set()

    def rule(node: Node) -> Node | None:
        if not node.args or node in context.normal or node in fixed or node in checked:  # (a leaf: none)
            return None
        result = _apply_rules(node, context.ranges)
        if result is None:
            checked.add(node)
        return result

    settled = context.settled
    for _ in range(_MAX_ROUNDS):
        inner, walked = _inner_linear(current, settled)
        new = rewrite_all(current, rule, memo, leave=inner, keep=settled.__contains__)
        for node in inner:  # left alone this round only: its users may change
            memo.pop(node, None)
        if all(map(operator.eq, new, current)):
            # A node the memo maps to itself was left by the rules with its operands unchanged, so it
            # is a normal form as a root too (a node left under linear users, `_inner_linear`, is left
            # under the same users there).
            context.normal.update(node for node, rewritten in memo.items() if node is rewritten)
            context.normal.update(new)
            # The nodes of `new` (equal to `current`), operands first, settled ones left out: the last
            # round's walk, not walked again.
            for node in walked:
                if node in context.normal and all(a in settled for a in node.args):
                    settled.add(node)
            for start, form in zip(starts, new, strict=True):
                if start is start.canonical:
                    context.forms[start] = form
            for i, form in zip(pending, new, strict=True):
                results[i] = form
            return tuple(results)  # type: ignore[arg-type]
        current = new
    raise InternalError(f"canonicalize did not reach a fixed point in {_MAX_ROUNDS} rounds")


class _Tables:
    """What the rules compute about nodes, once per distinct node: for one `canonicalize` call, or for
    every call inside `shared_tables`. A rule looks at operands that other nodes share (`linear` forms,
    negations), and without these tables a DAG whose tree is exponential (`let a1 = a0 + a0`, ...)
    would cost as much as its tree."""

    def __init__(self) -> None:
        self.linear: dict[Node, tuple[Terms, int]] = {}
        self.negate: dict[Node, Node] = {}
        # Results of the rules that are fixed points of every rule of their op (the canonical linear
        # form of a linear combination, a comparison `E op c`): given to no rule again, whether or
        # not the rest of the expression is normal yet.
        self.fixed: set[Node] = set()
        self.contexts: dict[object, _Context] = {}


class _Context:
    """What holds under one pattern's input dtypes: value ranges, the nodes known to be normal forms (as
    the root of a `canonicalize`), those whose every node is one (`settled`: in any expression the
    rules leave all of it as it is, so it is not walked again), and the normal forms of interned
    roots."""

    def __init__(self, ranges: ValueRanges) -> None:
        self.ranges = ranges
        self.normal: set[Node] = set()
        self.settled: set[Node] = set()
        self.forms: dict[Node, Node] = {}


class _Open(threading.local):
    """The tables open in this thread (threads compiling at once each have theirs)."""

    tables: _Tables | None = None


_open = _Open()


@contextmanager
def shared_tables() -> Iterator[_Tables]:
    """Share the normal form's tables among the `canonicalize` calls inside the block (the pass manager
    opens it around a compilation); the tables, and the nodes they hold, go when it closes."""
    if _open.tables is not None:
        yield _open.tables
        return
    _open.tables = _Tables()
    try:
        yield _open.tables
    finally:
        _open.tables = None


def _is_linear_step(node: Node) -> bool:
    return (
        node.type is _INT
        and node.op in _LINEAR_OPS
        and (node.op is not _MUL or any(a.op is _CONST for a in node.args))
    )


def _inner_linear(roots: list[Node], settled: set[Node]) -> tuple[set[Node], list[Node]]:
    """The int `+ - *c` nodes whose every user is one too: the linear form of the outermost one covers
    them, so normalising each of them as well would cost the square of a long sum's length. Settled
    nodes are not walked (no user of an unsettled node is settled); a root has a user outside. Also
    the nodes walked, in the walk's order (operands first)."""
    only_linear_users: dict[Node, bool] = dict.fromkeys(roots, False)
    steps: set[Node] = set()
    get = only_linear_users.get
    walked: list[Node] = []
    for node in walk_all(roots, skip=settled.__contains__):  # each node once, for all the roots
        walked.append(node)
        if not node.args:
            continue
        step = _is_linear_step(node)
        if step:
            steps.add(node)
        for a in node.args:
            only_linear_users[a] = get(a, True) and step
    return {n for n in steps if only_linear_users[n]}, walked


def compare_form(op: Op, a: Node, b: Node, ranges: ValueRanges) -> Node:
    """`a op b` of two ints, in the normal form's shape `E op c` where the rules would make it so
    (with the same guard on int64), for analyses that build many comparisons: the rewrite then finds
    them done."""
    node = make(op, a, b)
    result = _int_compare(node) if a.type is _INT else None
    if result is None or result == node or not (ranges.fits(result) or not ranges.fits(node)):
        return node
    return result


def _apply_rules(node: Node, ranges: ValueRanges) -> Node | None:
    for rule in _RULES.get(node.op, ()):
        result = rule(node)
        if result is not None and result != node and (ranges.fits(result) or not ranges.fits(node)):
            return result
    return None


# ---- constants ---------------------------------------------------------------------------------------


def fold_constant(node: Node) -> Node | None:
    """An op whose operands are all constants becomes its value; so does `where` on a constant."""
    args = node.args
    if node.op is _WHERE and args[0].op is _CONST:
        return args[1] if args[0].attr else args[2]
    for a in args:  # (a loop: most nodes have an operand that is not a constant, often the first)
        if a.op is not _CONST:
            return None
    if not args or not fold.foldable(node.op):
        return None
    value = fold.evaluate(node.op, [a.attr for a in node.args])  # type: ignore[misc]
    if value is None:
        return None
    if node.type is _FLOAT:
        value = float(value)
    elif node.type is _INT:
        value = int(value)
        if not -(2**63) <= value < 2**63:
            # Left unfolded: `bind-params` reports the user's own overflow, located (value_ranges.py),
            # and a derived expression that would need it is not made (or is not used).
            return None
    return const(value, node.loc)


# ---- linear integer expressions ----------------------------------------------------------------------

Terms = dict[Node, int]


_TEXT_PREFIX = 256  # characters of the structural spelling that order atoms; a digest breaks ties


def _text(node: Node) -> tuple[str, str]:
    """A deterministic structural spelling, to order atoms: its first `_TEXT_PREFIX` characters (the
    whole spelling, for any atom that fits), then a digest of the structure. Computed once per node and
    kept on it: the full spelling of a DAG can be exponentially longer than the DAG."""
    twin = node.canonical
    cached = twin.__dict__.get("_order_text")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    # Children first, so each spelling is built from its operands' in O(1); spelt ones are not walked.
    for n in twin.walk(skip=lambda m: "_order_text" in m.__dict__):
        parts = [_text(a) for a in n.args]  # already computed: the walk visits operands first
        inner = ",".join(p[0] for p in parts)
        prefix = f"{n.op._value_}[{n.attr}]({inner})"[:_TEXT_PREFIX]
        digest = hashlib.blake2b(
            "\0".join([n.op._value_, n.type._value_, repr(n.attr_key), *(p[1] for p in parts)]).encode(),
            digest_size=16,
        ).hexdigest()
        object.__setattr__(n, "_order_text", (prefix, digest))
    return twin.__dict__["_order_text"]  # type: ignore[no-any-return]


_VAR_ORDER = (*INDEX_VARS[2:], *INDEX_VARS[:2], *TILE_VARS)  # q, kv, b, h, then the tile box
_VAR_RANK = {name: i for i, name in enumerate(_VAR_ORDER)}
_SIZE_RANK = {name: i for i, name in enumerate(SIZES)}


def atom_key(node: Node) -> tuple[int, int, str, str]:
    """The canonical order of atoms in a linear combination: q, kv, b, h, sizes, params, the rest."""
    op = node.op
    if op is _VAR:
        return (0, _VAR_RANK[node.attr], "", "")  # type: ignore[index]
    if op is _SIZE:
        return (1, _SIZE_RANK[node.attr], "", "")  # type: ignore[index]
    if op is _REF or op is _PARAM:  # an unbound or a runtime parameter (or a let)
        return (2, 0 if op is _REF else 1, str(node.attr), "")
    return (3, 0, *_text(node))


def linear(node: Node) -> tuple[Terms, int]:
    """An int expression as sum(coefficient * atom) + constant; non-linear parts are atoms. The terms
    may be shared (memoised while `shared_tables` are open): callers must not modify them."""
    tables = _open.tables
    if tables is None:
        return _linear(node)
    found = tables.linear.get(node)
    if found is None:
        found = tables.linear[node] = _linear(node)
    return found


def _linear_operands(node: Node) -> tuple[tuple[Node, int], ...]:
    """The operands of a `+ - *c` node with the factor each contributes by; () for an atom."""
    op = node.op
    if op not in _LINEAR_OPS:
        return ()
    if op is _ADD:
        return (node.args[0], 1), (node.args[1], 1)
    if op is _SUB:
        return (node.args[0], 1), (node.args[1], -1)
    if op is _NEG:
        return ((node.args[0], -1),)
    a, b = node.args
    if b.op is _CONST:
        a, b = b, a
    if a.op is _CONST:
        return ((b, int(a.attr)),)  # type: ignore[arg-type]
    return ()


def _linear(root: Node) -> tuple[Terms, int]:
    # Each node's total coefficient is the sum over its users of theirs times the factor it enters
    # them by: pushed from the root down in one pass over the DAG (users before operands), so shared
    # operands (`a + a`) cost once however many paths reach them.
    order: list[Node] = []  # operands before users
    operands_of: dict[Node, tuple[tuple[Node, int], ...]] = {}  # each node's, once: also `seen`
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node not in operands_of:
            operands = operands_of[node] = _linear_operands(node)
            stack.append((node, True))
            for a, _ in operands:
                if a not in operands_of:
                    stack.append((a, False))
    coefficient: dict[Node, int] = {root: 1}
    terms: Terms = {}
    constant = 0
    for node in reversed(order):
        k = coefficient.pop(node, 0)
        if not k:
            continue
        operands = operands_of[node]
        if operands:
            for a, factor in operands:
                coefficient[a] = coefficient.get(a, 0) + k * factor
        elif node.op is _CONST:
            constant += k * int(node.attr)  # type: ignore[arg-type]
        else:
            terms[node] = terms.get(node, 0) + k
    return {atom: k for atom, k in terms.items() if k}, constant


def combine(a: Terms, b: Terms, sign: int) -> Terms:
    """The terms of `a + sign * b` (`sign` any int factor), without the atoms whose coefficients cancel
    (a new dict: the operands, perhaps `linear`'s shared terms, are left as they are)."""
    result = dict(a)
    for atom, k in b.items():
        result[atom] = result.get(atom, 0) + sign * k
    return {atom: k for atom, k in result.items() if k}


def _ordered(terms: Terms) -> list[tuple[Node, int]]:
    if len(terms) < 2:  # (most atoms' and bounds' forms: nothing to sort)
        return list(terms.items())
    return sorted(terms.items(), key=_term_key)


def _term_key(item: tuple[Node, int]) -> tuple[int, int, str, str]:
    return atom_key(item[0])


def build_linear(terms: Terms, constant: int) -> Node:
    """The canonical tree of a linear combination: `q - kv + 3`, `2 * q - kv`."""
    return _build_ordered(_ordered(terms), constant)


def linear_form(terms: Terms, constant: int) -> Node:
    """`build_linear` of terms whose atoms are `linear`'s own (no `+ - *c` node among them, no zero
    coefficient), noted as a fixed point of the rules (`_fixed`): the rewrite gives it to no rule, as
    it would leave it. Its `linear` is what it was built from, and is noted as such too."""
    node = _fixed(build_linear(terms, constant))
    tables = _open.tables
    if tables is not None and node not in tables.linear:
        tables.linear[node] = (dict(terms), constant)
    return node


def _build_ordered(ordered: list[tuple[Node, int]], constant: int) -> Node:
    """`build_linear` of terms already in their canonical order (`_ordered`)."""
    result: Node | None = None
    for atom, k in ordered:
        if result is None:
            result = atom if k == 1 else make(_NEG, atom) if k == -1 else make(_MUL, const(k), atom)
            continue
        magnitude = atom if abs(k) == 1 else make(_MUL, const(abs(k)), atom)
        result = make(_ADD if k > 0 else _SUB, result, magnitude)
    if result is None:
        return const(constant)
    if constant:
        result = make(_ADD if constant > 0 else _SUB, result, const(abs(constant)))
    return result


COMPARISONS = (Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE)
_MIRROR = {Op.EQ: Op.EQ, Op.NE: Op.NE, Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE}


def split_comparison(node: Node, right: Callable[[Node], bool]) -> Node | None:
    """An int comparison rewritten as `L op R + c`, with the atoms for which `right` holds (moved with
    their signs flipped) in R and the others in L; None if that leaves either side without atoms.

    The inverse of the canonical form `E op c`, for evaluators that pay by the size of their operands:
    with `right` selecting the atoms over one axis of a grid, both sides are computed at the size of
    one axis and only the comparison at the size of the grid."""
    if node.op not in COMPARISONS or node.args[0].type is not _INT:
        return None
    terms_a, c_a = linear(node.args[0])
    terms_b, c_b = linear(node.args[1])
    terms = combine(terms_a, terms_b, -1)
    left = {a: k for a, k in terms.items() if not right(a)}
    moved = {a: -k for a, k in terms.items() if right(a)}
    if not left or not moved:
        return None
    op, constant = node.op, c_b - c_a
    if _ordered(left)[0][1] < 0:  # -L op -R is L op' R: no negation left on the leading term
        left = {a: -k for a, k in left.items()}
        moved = {a: -k for a, k in moved.items()}
        op, constant = _MIRROR[op], -constant
    return make(op, build_linear(left, 0), build_linear(moved, constant))


def _int_arith(node: Node) -> Node | None:
    # add/sub/mul/neg of ints: collect into the canonical linear form.
    if node.type is not _INT:
        return None
    return _fixed(build_linear(*linear(node)))


def _fixed(node: Node) -> Node:
    """Note a rule's result that every rule of its op leaves as it is, whatever its operands: the
    linear form `build_linear` makes (its `linear` is what it was built from, so building again gives
    the same node) and a comparison `E op c` made of one (its terms' gcd is 1 and its lead positive).
    The rewrite does not give it to the rules again to find that out."""
    tables = _open.tables
    # Only a `+ - *c` node or a comparison: a linear form of one term is that term itself, an atom
    # (`abs(...)`, `x // 3`), which may well be another rule's unfinished result.
    if tables is not None and node.op in _FIXED_OPS:
        tables.fixed.add(node)
    return node


_FIXED_OPS = frozenset((Op.ADD, Op.SUB, Op.MUL, Op.NEG, Op.LE, Op.GE, Op.EQ, Op.NE))


def _int_division(node: Node) -> Node | None:
    # x // 1 == x, x // -1 == -x, x % 1 == x % -1 == 0.
    x, d = node.args
    if d.is_const and d.attr in (1, -1):
        if node.op is _MOD:
            return const(0)
        return x if d.attr == 1 else make(_NEG, x)
    return None


def _float_identity(node: Node) -> Node | None:
    # Exact float identities only: x * 1.0, x / 1.0, x - 0.0, -(-x).
    if node.type is not _FLOAT:
        return None
    if node.op is _NEG:
        return node.args[0].args[0] if node.args[0].op is _NEG else None
    a, b = node.args
    if node.op is _MUL and a.is_const and a.attr == 1.0:
        return b
    if node.op in (_MUL, _DIV) and b.is_const and b.attr == 1.0:
        return a
    if node.op is _SUB and b.is_const and b.attr == 0.0:
        return a
    return None


def _min_max_same(node: Node) -> Node | None:
    # min(x, x) == max(x, x) == x.
    return node.args[0] if node.args[0] == node.args[1] else None


def _abs_abs(node: Node) -> Node | None:
    # abs(abs(x)) == abs(x); abs(-x) == abs(x).
    inner = node.args[0]
    if inner.op is _ABS:
        return inner
    if inner.op is _NEG:
        return make(_ABS, inner.args[0])
    return None


# ---- comparisons -------------------------------------------------------------------------------------

_FLIP = {Op.LE: Op.GE, Op.GE: Op.LE, Op.EQ: Op.EQ, Op.NE: Op.NE}


def _int_compare(node: Node) -> Node | None:
    # `a op b` on ints becomes `E op c` with E canonical (see the module docstring).
    a, b = node.args
    if a.type is not _INT:
        return None
    ta, ca = linear(a)
    tb, cb = linear(b)
    terms, c = combine(ta, tb, -1), cb - ca
    op = node.op
    if op is _LT:
        op, c = _LE, c - 1
    elif op is _GT:
        op, c = _GE, c + 1
    if not terms:
        return const(bool(fold.evaluate(op, [0, c])))
    ordered = _ordered(terms)  # sorted once: dividing by the gcd or negating keeps the order
    distributed = _distribute(terms, ordered, op, c)
    if distributed is not None:
        return distributed
    g = math.gcd(*terms.values())
    if op is _LE:
        c = c // g
    elif op is _GE:
        c = -((-c) // g)
    elif c % g:
        return const(op is _NE)
    else:
        c //= g
    sign = 1
    if ordered[0][1] < 0:  # no negation left on the leading term
        sign, c, op = -1, -c, _FLIP[op]
    form = _build_ordered([(t, sign * (k // g)) for t, k in ordered], 0)
    return _fixed(make(op, _fixed(form), const(c)))


def _larger_than(terms: Terms, limit: int) -> bool:
    """Whether the terms hold more than `limit` nodes, counting at most `limit + 1` of them: a
    comparison over a large shared DAG costs O(limit) here, not O(DAG) per comparison."""
    count = 0
    for term in terms:
        for _ in term.walk():
            count += 1
            if count > limit:
                return True
    return False


def _distribute(terms: Terms, ordered: list[tuple[Node, int]], op: Op, c: int) -> Node | None:
    """`k * min(x, y) + R <= c` is `k*x + R <= c or k*y + R <= c` (for k > 0); likewise max, abs, >=.
    `ordered`: the terms in their canonical order."""
    if op is not _LE and op is not _GE:
        return None
    for atom, k in ordered:
        if atom.op not in _DISTRIBUTED:
            continue
        if _larger_than(terms, _DISTRIBUTE_LIMIT):
            return None
        x, y = (atom.args[0], make(_NEG, atom.args[0])) if atom.op is _ABS else atom.args
        behaves_like_max = (atom.op in (_MAX, _ABS)) == (k > 0)
        rest = {t: v for t, v in terms.items() if t != atom}
        sides = [make(op, build_linear(combine(rest, {v: k}, 1), 0), const(c)) for v in (x, y)]
        # max(x, y) <= c needs both; min(x, y) <= c needs either. >= is the mirror image.
        conjunction = behaves_like_max == (op is _LE)
        return make(_AND if conjunction else _OR, *sides)
    return None


def _bool_equality(node: Node) -> Node | None:
    # x == true is x, x == false is not x, and their != mirrors.
    a, b = node.args
    if a.type is not _BOOL:
        return None
    if a.is_const:
        a, b = b, a
    if not b.is_const:
        return None
    keep = bool(b.attr) == (node.op is _EQ)
    return a if keep else make(_NOT, a)


# ---- booleans ----------------------------------------------------------------------------------------


def _negate(node: Node) -> Node:
    """not node, pushed one level down where that is exact (through and/or to their operands)."""
    tables = _open.tables
    if tables is None:
        return _negate_one(node, _negate)
    table = tables.negate

    def memoised(n: Node) -> Node:
        found = table.get(n)
        if found is None:
            found = table[n] = _negate_one(n, memoised)
        return found

    return memoised(node)


_FLIPPED = {Op.LE: Op.GT, Op.GE: Op.LT, Op.LT: Op.GE, Op.GT: Op.LE}
"""The negation of an int comparison."""


def _negate_one(node: Node, _negate: Callable[[Node], Node]) -> Node:
    if node.is_const:
        return const(not node.attr)
    if node.op is _NOT:
        return node.args[0]
    if node.op in (_AND, _OR):
        return make(_OR if node.op is _AND else _AND, *(_negate(a) for a in node.args))
    if node.op in (_EQ, _NE):
        return make(_NE if node.op is _EQ else _EQ, *node.args)
    if node.op in (_LE, _GE, _LT, _GT) and node.args[0].type is _INT:
        # Ints are totally ordered; floats are not (NaN), so float comparisons keep their `not`.
        return make(_FLIPPED[node.op], *node.args)
    return make(_NOT, node)


def _complement(node: Node) -> Node | None:
    """`_negate(node)` if that node exists already, else None (then it is no operand of anything):
    what `_junction` asks of each operand, answered without building negations it would not use."""
    op = node.op
    if op is _CONST:
        return const(not node.attr)
    if op is _NOT:
        return node.args[0]
    if op is _AND or op is _OR:
        parts = []
        for a in node.args:
            part = _complement(a)
            if part is None:
                return None
            parts.append(part)
        return existing(_OR if op is _AND else _AND, _BOOL, tuple(parts))
    if op is _EQ or op is _NE:
        return existing(_NE if op is _EQ else _EQ, _BOOL, node.args)
    if op in _FLIPPED and node.args[0].type is _INT:
        return existing(_FLIPPED[op], _BOOL, node.args)
    return existing(_NOT, _BOOL, (node,))


def _not(node: Node) -> Node | None:
    # Negation normal form: not pushed down to comparisons and loads.
    result = _negate(node.args[0])
    return None if result.op is _NOT and result.args[0] == node.args[0] else result


def _where(node: Node) -> Node | None:
    cond, a, b = node.args
    if a == b:  # where(c, a, a) == a
        return a
    if node.type is _BOOL:  # a bool where is (c and a) or (not c and b), which analyses can read
        return make(_OR, make(_AND, cond, a), make(_AND, make(_NOT, cond), b))
    return None


def _bound(node: Node) -> tuple[Node, Op, int] | None:
    """A canonical comparison `E op c` as (E, op, c)."""
    if node.op in _BOUND_OPS and node.args[0].type is _INT and node.args[1].op is _CONST:
        return node.args[0], node.op, int(node.args[1].attr)  # type: ignore[arg-type]
    return None


def _junction(node: Node) -> Node | None:
    # and/or: flatten, drop identities, absorb, deduplicate, complement, merge bounds.
    is_and = node.op is _AND
    operands: list[Node] = []
    for arg in node.args:
        operands.extend(arg.args if arg.op is node.op else [arg])
    kept: list[Node] = []
    for arg in operands:
        if arg.is_const:
            if bool(arg.attr) != is_and:  # false in and, true in or
                return const(not is_and)
            continue
        if arg not in kept:
            kept.append(arg)
    present = set(kept)
    for arg in kept:  # x and not x
        complement = _complement(arg)
        if complement is not None and complement in present:
            return const(not is_and)
    other = _OR if is_and else _AND
    kept = [a for a in kept if not (a.op is other and any(x in present for x in a.args))]  # absorption
    merged = _merge_bounds(kept, is_and)
    if isinstance(merged, bool):
        return const(merged)
    kept = merged
    if not kept:
        return const(is_and)
    if len(kept) == 1:
        return kept[0]
    return make(node.op, *kept)


def _merge_bounds(operands: list[Node], is_and: bool) -> list[Node] | bool:
    """Within and: the tightest bounds on each E, or False if they contradict. Within or: the loosest,
    or True if they cover every int."""
    lows: dict[Node, int] = {}
    highs: dict[Node, int] = {}
    equal: dict[Node, set[int]] = {}
    pick_low, pick_high = (max, min) if is_and else (min, max)
    for arg in operands:
        bound = _bound(arg)
        if bound is None:
            continue
        expr, op, c = bound
        if op is _EQ:
            equal.setdefault(expr, set()).add(c)
        elif op is _GE:
            lows[expr] = pick_low(lows[expr], c) if expr in lows else c
        else:
            highs[expr] = pick_high(highs[expr], c) if expr in highs else c
    if is_and:
        for expr, values in equal.items():
            if len(values) > 1:
                return False
            (v,) = values
            if lows.get(expr, v) > v or highs.get(expr, v) < v:
                return False
        for expr in lows.keys() & highs.keys():
            if lows[expr] > highs[expr]:
                return False
    else:
        for expr in lows.keys() & highs.keys():
            if lows[expr] <= highs[expr] + 1:
                return True
    result: list[Node] = []
    emitted: set[tuple[Node, Op, int]] = set()
    for arg in operands:
        bound = _bound(arg)
        if bound is None:
            result.append(arg)
            continue
        expr, op, c = bound
        if is_and and expr in equal and op is not _EQ:
            continue  # implied by the equality, which was checked against it above
        key = (expr, op, c if op is _EQ else 0)  # distinct equalities are distinct constraints
        if key in emitted:
            continue
        emitted.add(key)
        merged = c if op is _EQ else lows[expr] if op is _GE else highs[expr]
        result.append(arg if merged == c else make(op, expr, const(merged)))  # (most stay as they are)
    return result


Rule = Callable[[Node], Node | None]
_RULES: dict[Op, tuple[Rule, ...]] = {}
for _op in Op:
    _rules: list[Rule] = []
    if fold.foldable(_op):
        _rules.append(fold_constant)
    if _op in (_ADD, _SUB, _MUL, _NEG):
        _rules += [_int_arith, _float_identity]
    if _op is _DIV:
        _rules.append(_float_identity)
    if _op in (_FLOORDIV, _MOD):
        _rules.append(_int_division)
    if _op in (_MIN, _MAX):
        _rules.append(_min_max_same)
    if _op is _ABS:
        _rules.append(_abs_abs)
    if _op in (_LT, _LE, _GT, _GE, _EQ, _NE):
        _rules.append(_int_compare)
    if _op in (_EQ, _NE):
        _rules.append(_bool_equality)
    if _op is _NOT:
        _rules.append(_not)
    if _op is _WHERE:
        _rules.append(_where)
    if _op in (_AND, _OR):
        _rules.append(_junction)
    if _rules:
        _RULES[_op] = tuple(_rules)
