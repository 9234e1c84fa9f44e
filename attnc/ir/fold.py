"""Exact evaluation of ops on Python constants: the one definition of each op's arithmetic.

Used by constant folding (`canonicalize`), by the front end for default values, and as the scalar
reference the dense oracle is tested against. Ints are unbounded Python ints here.
"""

from __future__ import annotations

import math

from attnc.ir.nodes import Op

Value = int | float | bool


def floordiv(a: int, b: int) -> int:
    """Floor division as in Python; division by zero gives 0 (never undefined behaviour)."""
    return 0 if b == 0 else a // b


def mod(a: int, b: int) -> int:
    """Floor modulo as in Python (the result has b's sign); modulo zero gives a."""
    return a if b == 0 else a % b


SHIFT_LIMIT = 63
"""A shift count is clamped to [0, SHIFT_LIMIT]: ints are int64, where a count beyond 63 changes
nothing more (`x >> 63` is already 0 or -1, and `x << 64` of any x but 0 leaves int64 anyway), and a
negative count shifts by 0. Every evaluator (this module, the oracle, the kernels) and the value
ranges follow this rule; the front end rejects a constant count outside it (`dsl/lower.py`)."""


def shift_count(n: int) -> int:
    """The count a shift by n uses (see `SHIFT_LIMIT`)."""
    return min(max(n, 0), SHIFT_LIMIT)


def _tan(x: float) -> float:
    return math.tan(x) if math.isfinite(x) else math.nan


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _safe(fn, x: float) -> float:
    try:
        return fn(x)
    except (ValueError, OverflowError):
        return math.nan


def _log(x: float) -> float:
    if x == 0:
        return -math.inf
    return math.log(x) if x > 0 else math.nan


def _log2(x: float) -> float:
    if x == 0:
        return -math.inf
    return math.log2(x) if x > 0 else math.nan


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _exp2(x: float) -> float:
    try:
        return 2.0**x
    except OverflowError:
        return math.inf


def _div(a: float, b: float) -> float:
    if b == 0:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


_UNARY = {
    Op.NEG: lambda a: -a,
    Op.ABS: abs,
    Op.TOFLOAT: float,
    Op.EXP: _exp,
    Op.EXP2: _exp2,
    Op.LOG: _log,
    Op.LOG2: _log2,
    Op.SQRT: lambda a: _safe(math.sqrt, a),
    Op.TANH: math.tanh,
    Op.SIGMOID: _sigmoid,
    Op.SIN: lambda a: _safe(math.sin, a),
    Op.COS: lambda a: _safe(math.cos, a),
    Op.TAN: _tan,
    Op.ERF: math.erf,
    Op.FLOOR: math.floor,
    Op.CEIL: math.ceil,
    Op.NOT: lambda a: not a,
}

_BINARY = {
    Op.ADD: lambda a, b: a + b,
    Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b,
    Op.DIV: _div,
    Op.FLOORDIV: floordiv,
    Op.MOD: mod,
    Op.UDIV: floordiv,
    Op.UMOD: mod,
    Op.MIN: min,
    Op.MAX: max,
    Op.BITAND: lambda a, b: a & b,
    Op.BITOR: lambda a, b: a | b,
    Op.BITXOR: lambda a, b: a ^ b,
    Op.SHL: lambda a, b: a << shift_count(b),
    Op.SHR: lambda a, b: a >> shift_count(b),
    Op.EQ: lambda a, b: a == b,
    Op.NE: lambda a, b: a != b,
    Op.LT: lambda a, b: a < b,
    Op.LE: lambda a, b: a <= b,
    Op.GT: lambda a, b: a > b,
    Op.GE: lambda a, b: a >= b,
}


def foldable(op: Op) -> bool:
    return op in _UNARY or op in _BINARY or op in (Op.AND, Op.OR, Op.WHERE)


def evaluate(op: Op, args: list[Value]) -> Value | None:
    """The value of op on constant operands, or None where it has no finite exact value (floor of inf)."""
    if op in _UNARY:
        (a,) = args
        if op in (Op.FLOOR, Op.CEIL) and not math.isfinite(a):
            return None
        return _UNARY[op](a)
    if op in _BINARY:
        a, b = args
        if op in (Op.MIN, Op.MAX) and any(isinstance(v, float) and math.isnan(v) for v in (a, b)):
            return math.nan
        return _BINARY[op](a, b)
    if op is Op.AND:
        return all(args)
    if op is Op.OR:
        return any(args)
    if op is Op.WHERE:
        return args[1] if args[0] else args[2]
    raise AssertionError(f"{op} is not foldable")
