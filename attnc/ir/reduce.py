"""Bounded reductions (`Op.REDUCE`): their parts, their empty values, and unrolling.

`sum(i in lo..hi: term)` is a `reduce @sum:NAME(lo, hi, term)` whose term reads the variable as
`bound @NAME(lo, hi)` (`Op.BOUND`). NAME is unique in the program (the source's name and position,
`i_3_14`), so substituting one expression into another never captures a variable, and two reductions
of the same source text are one node. A reduction whose bounds are constants with at most
`UNROLL_LIMIT` terms is unrolled (`unroll`): the terms written out, combined left to right, which every
analysis and kernel then sees as ordinary expressions. Any other is a loop in the kernel.
"""

from __future__ import annotations

import math

from attnc.errors import AttnTypeError, Loc
from attnc.ir import fold
from attnc.ir.nodes import Node, Op, Type, const, infer_type, make
from attnc.ir.rewrite import rewrite

# Members read on hot paths, as module constants: a read of `Op.X` or `Type.X` costs Python 3.10 and
# 3.11 a call of `EnumType.__getattr__`'s hook (`ir/nodes.py`).
_BOUND = Op.BOUND
_CONST = Op.CONST
_INT = Type.INT
_REDUCE = Op.REDUCE

UNROLL_LIMIT = 16
"""The most terms a reduction with constant bounds is unrolled into; a longer one is a loop."""

COMBINE = {"sum": Op.ADD, "any": Op.OR, "all": Op.AND, "max": Op.MAX, "min": Op.MIN}
"""How a reduction's terms combine, left to right."""


def parts(node: Node) -> tuple[str, str]:
    """(kind, variable name) of a `reduce` node."""
    kind, _, name = str(node.attr).partition(":")
    return kind, name


def variable(node: Node) -> Node:
    """The `bound` leaf a `reduce` node's term reads its variable as."""
    return Node(_BOUND, _INT, node.args[:2], parts(node)[1])


def reduction(kind: str, name: str, lo: Node, hi: Node, *terms: Node, loc: Loc | None = None) -> Node:
    """A `reduce` node (typed by its rule)."""
    attr = f"{kind}:{name}"
    args = (lo, hi, *terms)
    result = infer_type(_REDUCE, args, attr)
    assert isinstance(result, Type), result
    return Node(_REDUCE, result, args, attr, loc)


def empty(kind: str, type_: Type) -> int | float | bool:
    """The value of an empty reduction: 0, false, true, -inf / +inf (0 for an int max / min)."""
    if kind == "any":
        return False
    if kind == "all":
        return True
    if type_ is _INT:
        return 0
    return {"sum": 0.0, "max": -math.inf, "min": math.inf, "dmax": 0.0, "dmin": 0.0}[kind]


def constant(node: Node) -> int | float | bool | None:
    """The value of an expression of constants (None: it reads something else)."""
    values: dict[Node, int | float | bool | None] = {}
    for n in node.walk():
        if n.op is _CONST:
            values[n] = n.attr  # type: ignore[assignment]
            continue
        args = [values[a] for a in n.args]
        ok = fold.foldable(n.op) and all(a is not None for a in args)
        values[n] = fold.evaluate(n.op, args) if ok else None  # type: ignore[arg-type]
    return values[node]


def unroll(node: Node) -> Node | None:
    """The reduction written out term by term, if its bounds are constants and it has at most
    `UNROLL_LIMIT` terms (an empty one is its empty value); else None. The terms combine left to
    right (`((t0 + t1) + t2)`), as the loop accumulates them."""
    if node.op is not _REDUCE:
        return None
    kind, _ = parts(node)
    if kind not in COMBINE:
        return None
    lo, hi = constant(node.args[0]), constant(node.args[1])
    if not isinstance(lo, int) or not isinstance(hi, int) or hi - lo > UNROLL_LIMIT:
        return None
    if hi <= lo:
        return const(empty(kind, node.type))
    bound, term = variable(node), node.args[2]
    terms = [rewrite(term, lambda n, i=i: const(i) if n == bound else None) for i in range(lo, hi)]
    if kind in ("any", "all"):
        return terms[0] if len(terms) == 1 else make(COMBINE[kind], *terms)
    result = terms[0]
    for t in terms[1:]:
        result = make(COMBINE[kind], result, t)
    return result


def unroll_all(root: Node) -> Node:
    """Every reduction of the expression with constant bounds and few terms unrolled (`unroll`), once
    its parameters are bound; a bound that reads more than constants and runtime parameters (a fn's
    argument given a position) is a located error."""
    found = [n for n in root.walk() if n.op is _REDUCE]
    if not found:
        return root
    for n in found:
        for bound in n.args[:2]:
            if any(m.op not in _FIXED and not (m.args and fold.foldable(m.op)) for m in bound.walk()):
                raise AttnTypeError(
                    "a reduction's bound must be an int of literals and parameters, and this one reads "
                    "a position, a size or an input (through a fn's argument)",
                    n.loc,
                )
    return rewrite(root, unroll)


_FIXED = (Op.CONST, Op.PARAM)
