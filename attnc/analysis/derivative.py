"""Symbolic derivatives of float expressions, for the backward kernels.

`derivative(root, wrt)` is d root / d wrt, where `wrt` is a float leaf of the expression: the score
`s`, or one load of a float `input` (a bias table entry, a slope, a temperature). Each load node is
its own variable: `t[h] * t[h]` holds one node `t[h]`, whose derivative is `2 t[h]`; the backward
kernel adds each load's share into the gradient at the position that load reads.

The rules are the usual ones, with PyTorch's choices where a function has no derivative, so that the
kernels agree with autograd through the oracle:

    |x|'          sign(x), and 0 at 0
    min / max     the derivative of the smaller / larger operand; half of each at a tie
    where(c,a,b)  where(c, a', b'): the condition is piecewise constant
    int values    0 (`tofloat`, `floor`, `ceil` and every int operation, bitwise ones included:
                  their operands are int)
    sin cos tan   cos, -sin, 1 + tan^2;  erf: 2 / sqrt(pi) e^(-x^2)
    sum(i ..: t)  sum(i ..: t');  max / min(i ..: t): t' of the selected term (`dmax` / `dmin`)

`None` stands for a derivative that is identically zero: the expression does not depend on `wrt`.
The result is built from the IR's own ops (so the kernels' emitter lowers it like any expression) and
simplified by `canonicalize`.
"""

from __future__ import annotations

from attnc.analysis.normal_form import canonicalize
from attnc.ir import reduce as reductions
from attnc.ir.nodes import Node, Op, PatternIR, Type, const, make

_ONE, _HALF, _TWO = const(1.0), const(0.5), const(2.0)
_LN2 = const(0.6931471805599453)
_TWO_OVER_SQRT_PI = const(1.1283791670955126)


def derivative(root: Node, wrt: Node, pattern: PatternIR | None = None) -> Node | None:
    """d root / d wrt (None: identically zero), canonicalized. `pattern` (the one `root` belongs to)
    gives `canonicalize` its inputs' dtypes, so that no rewrite of the result can overflow where the
    pattern's own values do not (the derivative keeps the score's comparisons: `where(c, a', b')`)."""
    if root.type is not Type.FLOAT or wrt.type is not Type.FLOAT:
        raise ValueError("derivatives are of float expressions by float leaves")
    memo: dict[Node, Node | None] = {}
    for node in root.walk():  # children before parents
        memo[node] = _rule(node, wrt, memo)
    result = memo[root]
    return None if result is None else canonicalize(result, pattern)


def _rule(n: Node, wrt: Node, d: dict[Node, Node | None]) -> Node | None:
    if n == wrt:
        return _ONE
    leaves = (Op.CONST, Op.SCORE, Op.LOAD, Op.VAR, Op.SIZE, Op.PARAM, Op.TOFLOAT)
    if n.type is not Type.FLOAT or n.op in leaves:
        return None  # an int or bool value, a constant (a runtime parameter is one), or another leaf
    args = n.args
    da = [d.get(a) for a in args]
    op = n.op
    if op is Op.ADD:
        return _add(da[0], da[1])
    if op is Op.SUB:
        return _add(da[0], _neg(da[1]))
    if op is Op.NEG:
        return _neg(da[0])
    if op is Op.MUL:
        return _add(_mul(da[0], args[1]), _mul(args[0], da[1]))
    if op is Op.DIV:  # a' / b - a b' / b^2
        a, b = args
        first = None if da[0] is None else make(Op.DIV, da[0], b)
        second = None if da[1] is None else make(Op.DIV, make(Op.MUL, a, da[1]), make(Op.MUL, b, b))
        return _add(first, _neg(second))
    if op in (Op.MIN, Op.MAX):
        return _min_max(n, da[0], da[1])
    if op is Op.WHERE:
        if da[1] is None and da[2] is None:
            return None
        return make(Op.WHERE, args[0], da[1] or const(0.0), da[2] or const(0.0))
    if op is Op.REDUCE:
        return _reduction(n, d.get(args[2]))
    if op is Op.ABS:
        x = args[0]
        sign = make(
            Op.WHERE,
            make(Op.GT, x, const(0.0)),
            _ONE,
            make(Op.WHERE, make(Op.LT, x, const(0.0)), const(-1.0), const(0.0)),
        )
        return _mul(da[0], sign)
    if da[0] is None:
        return None
    x = args[0]
    if op is Op.EXP:
        outer = n
    elif op is Op.EXP2:
        outer = make(Op.MUL, n, _LN2)
    elif op is Op.LOG:
        outer = make(Op.DIV, _ONE, x)
    elif op is Op.LOG2:
        outer = make(Op.DIV, _ONE, make(Op.MUL, x, _LN2))
    elif op is Op.SQRT:
        outer = make(Op.DIV, _HALF, n)
    elif op is Op.TANH:
        outer = make(Op.SUB, _ONE, make(Op.MUL, n, n))
    elif op is Op.SIGMOID:
        outer = make(Op.MUL, n, make(Op.SUB, _ONE, n))
    elif op is Op.SIN:
        outer = make(Op.COS, x)
    elif op is Op.COS:
        outer = make(Op.NEG, make(Op.SIN, x))
    elif op is Op.TAN:  # 1 + tan^2, from the value itself
        outer = make(Op.ADD, _ONE, make(Op.MUL, n, n))
    elif op is Op.ERF:  # 2 / sqrt(pi) e^(-x^2)
        outer = make(Op.MUL, _TWO_OVER_SQRT_PI, make(Op.EXP, make(Op.NEG, make(Op.MUL, x, x))))
    else:
        raise AssertionError(f"no derivative rule for {op}")
    return _mul(da[0], outer)


def _min_max(n: Node, da: Node | None, db: Node | None) -> Node | None:
    """The operand that wins contributes its derivative; at a tie each contributes half (PyTorch)."""
    if da is None and db is None:
        return None
    a, b = n.args
    zero = const(0.0)
    wins = make(Op.LT if n.op is Op.MIN else Op.GT, a, b)
    loses = make(Op.GT if n.op is Op.MIN else Op.LT, a, b)
    da_, db_ = da or zero, db or zero
    tie = make(Op.MUL, _HALF, make(Op.ADD, da_, db_))
    return make(Op.WHERE, wins, da_, make(Op.WHERE, loses, db_, tie))


def _reduction(n: Node, dterm: Node | None) -> Node | None:
    """A sum's derivative is the sum of its terms' derivatives; a max's (min's) is the derivative of
    the term it selects, ties splitting as between two operands at each step (`dmax`, `dmin`), which
    is what the max of the terms written out left to right gives."""
    if dterm is None:
        return None
    kind, name = reductions.parts(n)
    lo, hi, term = n.args[:3]
    if kind == "sum":
        return reductions.reduction("sum", name, lo, hi, dterm)
    if kind in ("max", "min"):
        return reductions.reduction("d" + kind, name, lo, hi, term, dterm)
    raise AssertionError(f"no derivative rule for a {kind} reduction")


def _add(a: Node | None, b: Node | None) -> Node | None:
    if a is None:
        return b
    if b is None:
        return a
    return make(Op.ADD, a, b)


def _neg(a: Node | None) -> Node | None:
    return None if a is None else make(Op.NEG, a)


def _mul(a: Node | None, b: Node | None) -> Node | None:
    """a * b, where a None factor is zero and a 1.0 factor is left out."""
    if a is None or b is None:
        return None
    if a == _ONE:
        return b
    if b == _ONE:
        return a
    return make(Op.MUL, a, b)
