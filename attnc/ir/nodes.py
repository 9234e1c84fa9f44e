"""IR nodes and their typing rules.

An expression is a DAG of frozen `Node`s (op, type, args, attr). Nodes are hash-consed: building a node
structurally equal to a live one returns that one (see `Node`), so equal sub-expressions are one value,
compared and hashed in O(1): common sub-expression elimination is a property of the representation,
the printer shows each once, and every pass that memoises per node is linear in the DAG, however large
the tree it stands for. Every op is documented once, in `OPS`, together with the rule that types it;
the verifier and the builders share that rule.
"""

from __future__ import annotations

import math
import sys
import threading
import weakref
from _weakref import _remove_dead_weakref  # what `weakref.WeakValueDictionary` removes with
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from operator import is_
from typing import TYPE_CHECKING, Any

from attnc.errors import Loc, ProgramTooLargeError

if TYPE_CHECKING:  # the typed analysis results hold nodes; they are only annotations here
    from attnc.ir.results import KernelValues, Ranges, Sparsity, TileClasses


class Type(str, Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"

    __hash__ = str.__hash__  # an Enum's own hash is a Python call; every table keyed by a type pays it
    __format__ = str.__format__  # an Enum's own format is two Python calls; the printer writes many

    def __str__(self) -> str:
        return self._value_  # the value, without the `value` property's descriptor call


class Op(str, Enum):
    CONST = "const"
    VAR = "var"
    SIZE = "size"
    PARAM = "param"
    SCORE = "score"
    REF = "ref"
    LOAD = "load"
    CALL = "call"
    PATTERN = "pattern"
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    FLOORDIV = "floordiv"
    MOD = "mod"
    UDIV = "udiv"
    UMOD = "umod"
    NEG = "neg"
    ABS = "abs"
    MIN = "min"
    MAX = "max"
    TOFLOAT = "tofloat"
    EXP = "exp"
    EXP2 = "exp2"
    LOG = "log"
    LOG2 = "log2"
    SQRT = "sqrt"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    SIN = "sin"
    COS = "cos"
    TAN = "tan"
    ERF = "erf"
    BITAND = "bitand"
    BITOR = "bitor"
    BITXOR = "bitxor"
    SHL = "shl"
    SHR = "shr"
    FLOOR = "floor"
    CEIL = "ceil"
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    AND = "and"
    OR = "or"
    NOT = "not"
    WHERE = "where"
    RANGE_MIN = "range_min"
    RANGE_MAX = "range_max"
    BOUND = "bound"
    REDUCE = "reduce"

    __hash__ = str.__hash__  # an Enum's own hash is a Python call; every table keyed by an op pays it
    __format__ = str.__format__  # an Enum's own format is two Python calls; the printer writes many

    def __str__(self) -> str:
        return self._value_  # the value, without the `value` property's descriptor call


# Members read for every node built or typed, as module constants (so are those of the analyses' hot
# loops): Python 3.10 and 3.11 read an enum's member (`Op.CONST`) through the slow hook that
# `EnumType.__getattr__` installs, some 0.1 us a read, and a build made some 10,000 such reads.
_INT, _FLOAT, _BOOL = Type.INT, Type.FLOAT, Type.BOOL
_NUMBERS = frozenset((Type.INT, Type.FLOAT))
_CONST = Op.CONST
_BOUND, _REDUCE = Op.BOUND, Op.REDUCE


MAX_NESTING = 400
"""How deeply a source expression may nest; the front end reports deeper ones as syntax errors."""


@contextmanager
def deep_recursion(limit: int = 20_000) -> Iterator[None]:
    """Room for the recursive algorithms over expressions nested up to MAX_NESTING deep (and the
    deeper trees inlining builds from them)."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


INDEX_VARS = ("b", "h", "q", "kv")
TILE_VARS = ("q_first", "q_last", "kv_first", "kv_last")
"""The bounds (inclusive) of a tile box; only the tile analyses' results (`ir/results.py`) use them."""
SIZES = ("BATCH", "NUM_HEADS", "Q_LEN", "KV_LEN")
INPUT_DTYPES = {
    "bool": Type.BOOL,
    "int32": Type.INT,
    "int64": Type.INT,
    "float16": Type.FLOAT,
    "bfloat16": Type.FLOAT,
    "float32": Type.FLOAT,
}


NODE_BUDGET = 100_000
"""How many nodes one pass may build (`node_budget`): fifty times what the largest stdlib or example
pattern builds in its whole compilation (about 2,000), and reached within seconds."""


class _Budget:
    """Nodes left to build in the innermost `node_budget`, and where to point when they run out."""

    def __init__(self, limit: int, loc: Loc | None, what: str) -> None:
        self.left = limit
        self.limit = limit
        self.loc = loc
        self.what = what


class _Budgets(threading.local):
    """The active budgets of this thread, innermost last (threads compiling at once each have theirs)."""

    def __init__(self) -> None:
        self.active: list[_Budget] = []


_budgets = _Budgets()


@contextmanager
def node_budget(loc: Loc | None, what: str, limit: int | None = None) -> Iterator[None]:
    """Raise `ProgramTooLargeError` at `loc` if more than `limit` (`NODE_BUDGET`) nodes are built inside
    the block.

    Every pass is linear in the DAG, so a pattern only exhausts this if some analysis must genuinely
    expand it (a normal form of an expression whose size is exponential in the source): the budget turns
    that into a located error instead of a compile that never ends."""
    budget = _Budget(NODE_BUDGET if limit is None else limit, loc, what)
    _budgets.active.append(budget)
    try:
        yield
    finally:
        _budgets.active.remove(budget)


def _exhausted(budget: _Budget) -> None:
    budget.left = budget.limit  # let the error's own formatting build nodes, should it need to
    raise ProgramTooLargeError(
        f"{budget.what} is too large to compile: it would build more than {budget.limit:,} IR nodes "
        "(a normal form that grows exponentially with the expression); simplify the expression",
        budget.loc,
    )


def _spend() -> None:
    active = _budgets.active
    if active:
        budget = active[-1]
        budget.left -= 1
        if budget.left < 0:
            _exhausted(budget)


def _attr_key(op: Op, type_: Type, attr: object) -> tuple[object, object]:
    """(attr as stored, what identity sees of it). Python's 1 == 1.0 == True would let constants of
    different types meet in containers keyed by attr alone, so float constants stay floats; and floats
    are told apart by their exact bits: `0.0 == -0.0` and `nan != nan` under `==` would merge the two
    zeros and keep NaN constants apart."""
    if op is Op.CONST and type_ is Type.FLOAT and not isinstance(attr, float):
        attr = float(attr)  # type: ignore[arg-type]
    return attr, attr.hex() if isinstance(attr, float) else attr


class _Ref(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to an interned node that knows the node's key in `_TABLE`: what
    `weakref.KeyedRef` is, without its constructor's two Python-level calls (one per node made)."""

    __slots__ = ("key",)


_TABLE: dict[tuple[object, ...], _Ref] = {}
"""The interned nodes, by (op, type, attr key, operands), held weakly: those still in use somewhere. A
key holds the operands, which the node holds anyway; its entry leaves when the node dies (`_forget`).
Read without `_LOCK` (a dict lookup is atomic, and a dead reference reads as a miss); entries are
added under it."""


def _forget(ref: _Ref) -> None:
    # A node died: drop its entry, unless the key names a live node again (removed only if dead,
    # atomically: this runs in whichever thread freed the node, perhaps while it holds `_LOCK`).
    _remove_dead_weakref(_TABLE, ref.key)


_LOCK = threading.Lock()


def _new(cls: type[Node], op: Op, type_: Type, args: tuple[Node, ...], attr: object, key_attr: object) -> Any:
    """A node with these fields, set directly (what the frozen dataclass's `__init__` would set)."""
    node = object.__new__(cls)
    fields = node.__dict__
    fields["op"] = op
    fields["type"] = type_
    fields["args"] = args
    fields["attr"] = attr
    fields["loc"] = None
    fields["attr_key"] = key_attr
    return node


class _Interned(type):
    """Builds `Node`s through the hash-consing table (see `Node`)."""

    def __call__(
        cls,
        op: Op,
        type: Type,
        args: tuple[Node, ...] = (),
        attr: int | float | bool | str | None = None,
        loc: Loc | None = None,
    ) -> Any:
        type_ = type
        if args.__class__ is not tuple:
            args = tuple(args)
        if isinstance(attr, float) or (type_ is _FLOAT and op is _CONST):
            attr, key_attr = _attr_key(op, type_, attr)
        else:
            key_attr = attr  # what `_attr_key` gives for anything but a float
        located = loc is not None
        for a in args:
            if a.__class__ is not Node:
                located = True
                break
        canonical = tuple([a.canonical for a in args]) if located else args
        key = (op, type_, key_attr, canonical)
        ref = _TABLE.get(key)
        twin = None if ref is None else ref()
        if twin is None:
            with _LOCK:
                ref = _TABLE.get(key)
                twin = None if ref is None else ref()
                if twin is None:
                    _spend()
                    twin = _new(Node, op, type_, canonical, attr, key_attr)
                    ref = _Ref(twin, _forget)
                    ref.key = key
                    _TABLE[key] = ref
        if not located:
            return twin
        # A located node (or one over located operands): a twin of the interned node that keeps the
        # source locations for diagnostics, equal to it and hashing like it. Not interned itself, so
        # a location never leaks into another program that builds the same expression.
        _spend()
        node = _new(LocatedNode, op, type_, args, attr, key_attr)
        node.__dict__["loc"] = loc
        node.__dict__["_twin"] = twin
        return node


_EXPANDED: Any = object()
"""Marks, in `Node.walk`'s stack, that the node below it has had its operands pushed."""

_REPR_LIMIT = 2000
"""Characters of a node's repr: the full text of a DAG can be exponentially longer than the DAG."""


@dataclass(frozen=True, eq=False, repr=False)
class Node(metaclass=_Interned):
    """One IR value. `attr` holds a constant, a variable/size/let/param name, or a callee/input symbol.

    Nodes are hash-consed: `Node(...)` (and `make`, `replace`, `with_args`) returns the one live node
    with that op, type, attr and operands, interned by the identities of its operands, so structurally
    equal expressions are the same object, and equality and hashing are object identity's (O(1), and
    done by Python's sets and dicts without calling back into Python). The table holds nodes weakly:
    a process compiling many patterns keeps only the nodes still in use.

    The source location is not part of a node's identity. A node built with a `loc` (the front end's)
    is a located twin of the interned one (a `LocatedNode`): it carries its own location, compares
    equal to and hashes like its interned twin (`canonical`), and is not shared, so diagnostics point
    at the user's own source even where another live program built the same expression elsewhere.
    """

    op: Op
    type: Type
    args: tuple[Node, ...] = ()
    attr: int | float | bool | str | None = None
    loc: Loc | None = field(default=None, repr=False)
    # What identity sees of `attr` (see `_attr_key`).
    attr_key: object = field(init=False, repr=False, default=None)

    def __repr__(self) -> str:
        # As a dataclass writes it, each distinct operand spelt once per call and cut at _REPR_LIMIT.
        texts: dict[Node, str] = {}
        for n in self.walk():
            args = "".join(f"{texts[a]}, " for a in n.args)
            args = f"({args[:-2]},)" if len(n.args) == 1 else f"({args[:-2]})"
            text = f"Node(op={n.op!r}, type={n.type!r}, args={args}, attr={n.attr!r})"
            texts[n] = text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."
        return texts[self]

    def __reduce__(self) -> tuple[object, ...]:
        # Unpickling rebuilds through the table, so a loaded node is the live node it equals.
        return (Node, (self.op, self.type, self.args, self.attr, self.loc))

    def __copy__(self) -> Node:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Node:
        return self  # immutable

    @property
    def canonical(self) -> Node:
        """The interned node equal to this one (itself unless it carries source locations)."""
        return self

    def with_args(self, args: tuple[Node, ...]) -> Node:
        if len(args) == len(self.args) and all(map(is_, args, self.args)):
            return self
        return Node(self.op, self.type, args, self.attr, self.loc)

    def walk(self, skip: Callable[[Node], bool] | None = None) -> Iterator[Node]:
        """Every node of the expression, each distinct one once, children before parents; a node for
        which `skip` holds is left out with everything under it (an evaluator's already-known values).
        `walk_all` of this one root."""
        return walk_all((self,), skip)

    @property
    def free(self) -> frozenset[str]:
        """The index variables the value reads (`q`, `kv`, ...), and `s` if it reads the score; computed
        once per interned node and kept on it, so asking it of every node of a DAG is linear."""
        twin = self.canonical
        found = twin.__dict__.get("_free")
        if found is None:
            for n in twin.walk(skip=lambda m: "_free" in m.__dict__):
                if n.op is Op.VAR:
                    names = frozenset((str(n.attr),))
                elif n.op is Op.SCORE:
                    names = frozenset("s")
                elif n.op is _BOUND:  # its bounds read no index variable; the mark keeps it in its loop
                    names = frozenset((BOUND_MARK + str(n.attr),))
                elif n.op is _REDUCE:  # a reduction binds its variable
                    bound = BOUND_MARK + str(n.attr).partition(":")[2]
                    names = frozenset().union(*(a.__dict__["_free"] for a in n.args)) - {bound}
                else:
                    names = frozenset().union(*(a.__dict__["_free"] for a in n.args))
                object.__setattr__(n, "_free", names)
            found = twin.__dict__["_free"]
        return found  # type: ignore[no-any-return]

    @property
    def is_const(self) -> bool:
        return self.op is _CONST


class LocatedNode(Node):
    """A located twin (see `Node`): equal to its interned twin and hashing like it. An interned node
    keeps object identity as its equality and hash, which Python's containers compare and hash
    without calling back into Python; only a located twin pays for a method of its own."""

    def __hash__(self) -> int:
        return object.__hash__(self.__dict__["_twin"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return self.__dict__["_twin"] is other.canonical

    @property
    def canonical(self) -> Node:
        return self.__dict__["_twin"]  # type: ignore[no-any-return]


def walk_all(roots: Iterable[Node], skip: Callable[[Node], bool] | None = None) -> Iterator[Node]:
    """`Node.walk` of several roots as one walk: every distinct node under any of them once, children
    before parents, the roots' nodes in the roots' order (what walking each root in turn yields, less
    what an earlier root yielded already); one generator and one `seen` set for all of them."""
    # A node joins `seen` when first popped: in a DAG nothing under it reaches it again, so its
    # operands are done before it is yielded. (An interned node hashes by identity, in C: asking
    # `in` and then adding costs less than reading the effect of `add` from the set's size.)
    seen: set[Node] = set()
    stack: list[Node] = []  # a node under `_EXPANDED` has had its operands pushed
    pop, push = stack.pop, stack.append
    for root in roots:
        push(root)
        while stack:
            node = pop()
            if node is _EXPANDED:
                yield pop()
                continue
            if node in seen:
                continue
            seen.add(node)
            if skip is not None and skip(node):
                continue
            args = node.args
            if not args:
                yield node
                continue
            push(node)
            push(_EXPANDED)
            if len(args) == 2:  # most interior ops: no reversed copy of the operands
                push(args[1])
                push(args[0])
            else:
                stack.extend(reversed(args))


def const(value: int | float | bool, loc: Loc | None = None) -> Node:
    if isinstance(value, bool):
        return Node(_CONST, _BOOL, (), value, loc)
    if isinstance(value, int):
        if loc is None:  # most are live already (0, 1, -1): looked up as `Node(...)` would, without its call
            ref = _TABLE.get((_CONST, _INT, value, ()))
            twin = None if ref is None else ref()
            if twin is not None:
                return twin
        return Node(_CONST, _INT, (), value, loc)
    return Node(_CONST, _FLOAT, (), float(value), loc)


# ---- the ops, documented once, each with its typing rule ---------------------------------------------

TypeRule = Callable[[tuple[Type, ...], object], Type | str]
"""Given the operand types and the attr, the result type, or a reason the operands are ill-typed."""


@dataclass(frozen=True)
class OpInfo:
    op: Op
    doc: str
    arity: int | None  # None: variadic (see the rule)
    rule: TypeRule | None  # None: the node's type is given by its declaration (leaves, refs, calls)


def _numeric_same(types: tuple[Type, ...], _attr: object) -> Type | str:
    if types[0] == types[1] and types[0] in _NUMBERS:
        return types[0]
    return f"operands must be both int or both float, got {types[0]} and {types[1]}"


def _float_binary(types: tuple[Type, ...], _attr: object) -> Type | str:
    return Type.FLOAT if types == (Type.FLOAT, Type.FLOAT) else f"operands must be float, got {types}"


def _int_binary(types: tuple[Type, ...], _attr: object) -> Type | str:
    return Type.INT if types == (Type.INT, Type.INT) else f"operands must be int, got {types}"


def _numeric_unary(types: tuple[Type, ...], _attr: object) -> Type | str:
    return types[0] if types[0] in _NUMBERS else f"operand must be a number, got {types[0]}"


def _float_unary(result: Type) -> TypeRule:
    def rule(types: tuple[Type, ...], _attr: object) -> Type | str:
        return result if types[0] is Type.FLOAT else f"operand must be float, got {types[0]}"

    return rule


def _ordered(types: tuple[Type, ...], _attr: object) -> Type | str:
    if types[0] == types[1] and types[0] in _NUMBERS:
        return _BOOL
    return f"operands must be both int or both float, got {types[0]} and {types[1]}"


def _equality(types: tuple[Type, ...], _attr: object) -> Type | str:
    return (
        Type.BOOL if types[0] == types[1] else f"operands must have one type, got {types[0]} and {types[1]}"
    )


def _logical(types: tuple[Type, ...], _attr: object) -> Type | str:
    if len(types) < 2:
        return "needs at least two operands"
    return _BOOL if all(t is _BOOL for t in types) else "operands must be bool"


def _not(types: tuple[Type, ...], _attr: object) -> Type | str:
    return _BOOL if types[0] is _BOOL else f"operand must be bool, got {types[0]}"


def _where(types: tuple[Type, ...], _attr: object) -> Type | str:
    if types[0] is not _BOOL:
        return f"condition must be bool, got {types[0]}"
    return types[1] if types[1] == types[2] else f"branches must have one type, got {types[1]} and {types[2]}"


BOUND_MARK = "~"
"""`Node.free` of a reduction's variable (`Op.BOUND` named i) holds `~i`: a value that reads it varies
inside its loop, so nothing may hoist it out (the passes that hoist ask `free` for `q`, `kv`, `s`)."""
REDUCTION_KINDS = ("sum", "any", "all", "max", "min", "dmax", "dmin")
"""The kinds of `Op.REDUCE`: the five of the language, and `dmax` / `dmin`, the derivatives of a max /
min reduction (`analysis/derivative.py`)."""


def _bound(types: tuple[Type, ...], _attr: object) -> Type | str:
    return Type.INT if types == (Type.INT, Type.INT) else f"bounds must be int, got {types}"


def _reduce(types: tuple[Type, ...], attr: object) -> Type | str:
    kind = str(attr).partition(":")[0]
    if kind not in REDUCTION_KINDS:
        return f"unknown reduction {kind!r}"
    if types[:2] != (Type.INT, Type.INT):
        return f"bounds must be int, got {types[:2]}"
    body = types[2:]
    if kind in ("dmax", "dmin"):
        return Type.FLOAT if body == (Type.FLOAT, Type.FLOAT) else f"terms must be float, got {body}"
    if len(body) != 1:
        return f"takes 3 operands, got {len(types)}"
    if kind in ("any", "all"):
        return Type.BOOL if body[0] is Type.BOOL else f"terms must be bool, got {body[0]}"
    return body[0] if body[0] in (Type.INT, Type.FLOAT) else f"terms must be numbers, got {body[0]}"


def _tofloat(types: tuple[Type, ...], _attr: object) -> Type | str:
    return Type.FLOAT if types[0] is Type.INT else f"operand must be int, got {types[0]}"


OPS: dict[Op, OpInfo] = {
    info.op: info
    for info in [
        OpInfo(Op.CONST, "a literal; attr is the Python int, float or bool", 0, None),
        OpInfo(Op.VAR, "an index variable: attr one of b, h, q, kv (int)", 0, None),
        OpInfo(Op.SIZE, "a size: attr one of BATCH, NUM_HEADS, Q_LEN, KV_LEN (int)", 0, None),
        OpInfo(
            Op.PARAM,
            "a runtime parameter: attr its name; int (a kernel argument in [-2**30, 2**30]) or float "
            "(any float64); its value comes with each launch (`oracle.Env.params`)",
            0,
            None,
        ),
        OpInfo(Op.SCORE, "the incoming score s = (q . k) * scale (float); only inside score", 0, None),
        OpInfo(
            Op.REF, "a named value: a pattern parameter, a fn argument or a let; attr is the name", 0, None
        ),
        OpInfo(
            Op.LOAD, "element of input tensor attr at int indices; out of range reads 0 / false", None, None
        ),
        OpInfo(Op.CALL, "call of fn attr with every argument, in declaration order", None, None),
        OpInfo(Op.PATTERN, "the mask of pattern attr with every parameter, in declaration order", None, None),
        OpInfo(Op.ADD, "a + b", 2, _numeric_same),
        OpInfo(Op.SUB, "a - b", 2, _numeric_same),
        OpInfo(Op.MUL, "a * b", 2, _numeric_same),
        OpInfo(Op.DIV, "a / b, true division of floats", 2, _float_binary),
        OpInfo(Op.FLOORDIV, "a // b, floor division of ints as in Python; a // 0 is 0", 2, _int_binary),
        OpInfo(Op.MOD, "a % b, floor modulo of ints as in Python (sign of b); a % 0 is a", 2, _int_binary),
        OpInfo(
            Op.UDIV,
            "a // b where `fuse` proved a >= 0 and b > 0: truncating division, equal to floor division",
            2,
            _int_binary,
        ),
        OpInfo(
            Op.UMOD, "a % b where `fuse` proved a >= 0 and b > 0: the truncating remainder", 2, _int_binary
        ),
        OpInfo(Op.NEG, "-a", 1, _numeric_unary),
        OpInfo(Op.ABS, "|a|", 1, _numeric_unary),
        OpInfo(Op.MIN, "the smaller of a and b", 2, _numeric_same),
        OpInfo(Op.MAX, "the larger of a and b", 2, _numeric_same),
        OpInfo(Op.TOFLOAT, "an int as a float (the promotion of int to float)", 1, _tofloat),
        OpInfo(Op.EXP, "e ** a", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.EXP2, "2 ** a", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.LOG, "natural logarithm", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.LOG2, "base-2 logarithm", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.SQRT, "square root", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.TANH, "hyperbolic tangent", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.SIGMOID, "1 / (1 + e ** -a)", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.SIN, "sine (radians)", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.COS, "cosine (radians)", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.TAN, "tangent (radians)", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.ERF, "the error function erf(a)", 1, _float_unary(Type.FLOAT)),
        OpInfo(Op.BITAND, "a & b, bitwise and of ints (two's complement, as Python's)", 2, _int_binary),
        OpInfo(Op.BITOR, "a | b, bitwise or of ints (two's complement, as Python's)", 2, _int_binary),
        OpInfo(Op.BITXOR, "a ^ b, bitwise exclusive or of ints (two's complement)", 2, _int_binary),
        OpInfo(
            Op.SHL,
            "a << b: a * 2 ** b, the count b clamped to [0, 63] (so a negative count shifts by 0)",
            2,
            _int_binary,
        ),
        OpInfo(
            Op.SHR,
            "a >> b: floor(a / 2 ** b) (arithmetic shift), the count b clamped to [0, 63]",
            2,
            _int_binary,
        ),
        OpInfo(Op.FLOOR, "largest int <= a", 1, _float_unary(Type.INT)),
        OpInfo(Op.CEIL, "smallest int >= a", 1, _float_unary(Type.INT)),
        OpInfo(Op.EQ, "a == b (numbers of one type, or bools)", 2, _equality),
        OpInfo(Op.NE, "a != b (numbers of one type, or bools)", 2, _equality),
        OpInfo(Op.LT, "a < b", 2, _ordered),
        OpInfo(Op.LE, "a <= b", 2, _ordered),
        OpInfo(Op.GT, "a > b", 2, _ordered),
        OpInfo(Op.GE, "a >= b", 2, _ordered),
        OpInfo(Op.AND, "conjunction of two or more bools", None, _logical),
        OpInfo(Op.OR, "disjunction of two or more bools", None, _logical),
        OpInfo(Op.NOT, "negation of a bool", 1, _not),
        OpInfo(Op.WHERE, "b if cond else c; branches of one type", 3, _where),
        OpInfo(
            Op.RANGE_MIN,
            "a lower bound of input attr over the index box (lo0, hi0, lo1, hi1, ...), inclusive, "
            "out-of-range positions reading 0 / false; exact where one index spans tile-aligned ranges",
            None,
            None,
        ),
        OpInfo(Op.RANGE_MAX, "an upper bound of input attr over the index box, as range_min", None, None),
        OpInfo(
            Op.BOUND,
            "the variable of a reduction (int): attr its name, unique in the program (`i_LINE_COL`), "
            "operands the reduction's bounds (lo, hi): it takes lo, ..., hi - 1",
            2,
            _bound,
        ),
        OpInfo(
            Op.REDUCE,
            "a bounded reduction (lo, hi, term): attr `KIND:NAME`, KIND one of sum, any, all, max, min, "
            "NAME its variable (the `bound` over lo, hi in term); the term's values for NAME = lo, ..., "
            "hi - 1 combined by + / or / and / max / min, in that order; empty (hi <= lo): 0, false, true, "
            "-inf / +inf (0 for ints). `dmax` / `dmin` (lo, hi, term, dterm): the dterm of the term a "
            "max / min selects, ties splitting evenly as between two (`analysis/derivative.py`)",
            None,
            _reduce,
        ),
    ]
}


def infer_type(op: Op, args: tuple[Node, ...], attr: object = None) -> Type | str:
    """The result type of an interior op over these operands, or the reason it is ill-typed."""
    info = OPS[op]
    assert info.rule is not None, f"{op} has no typing rule"
    if info.arity is not None and len(args) != info.arity:
        return f"takes {info.arity} operands, got {len(args)}"
    return info.rule(tuple([a.type for a in args]), attr)


def existing(op: Op, type_: Type, args: tuple[Node, ...], attr: int | str | None = None) -> Node | None:
    """The live interned node with these fields, or None if there is none: builds nothing (a node that
    does not exist is an operand of nothing). `attr` not a float."""
    ref = _TABLE.get((op, type_, attr, tuple([a.canonical for a in args])))
    return None if ref is None else ref()


_MADE: dict[tuple[Op, tuple[Type, ...]], Type] = {}
"""The type `make` found for an op over operands of these types (its rules read no attr then)."""


def make(op: Op, *args: Node, loc: Loc | None = None) -> Node:
    """Build an interior node, typing it by its rule; an ill-typed one is an internal error."""
    key = (op, tuple([a.type for a in args]))
    result = _MADE.get(key)
    if result is None:
        typed = infer_type(op, args)
        if not isinstance(typed, Type):
            from attnc.errors import InternalError

            raise InternalError(f"ill-typed {op}: {typed}")
        result = _MADE[key] = typed
    if loc is None:
        for a in args:
            if a.__class__ is not Node:
                break
        else:  # interned operands: the node is looked up as `Node(...)` would, without its call
            ref = _TABLE.get((op, result, None, args))
            twin = None if ref is None else ref()
            if twin is not None:
                return twin
    return Node(op, result, args, None, loc)


def var(name: str, loc: Loc | None = None) -> Node:
    return Node(Op.VAR, Type.INT, (), name, loc)


def size(name: str, loc: Loc | None = None) -> Node:
    return Node(Op.SIZE, Type.INT, (), name, loc)


def param(name: str, type_: Type, loc: Loc | None = None) -> Node:
    """A runtime parameter (`Op.PARAM`): an opaque symbol, like a size, whose value each launch gives."""
    return Node(Op.PARAM, type_, (), name, loc)


SCORE = Node(Op.SCORE, Type.FLOAT)


def format_const(value: int | float | bool) -> str:
    """A constant as the IR text writes it: `true`, `3`, `3.0`, `1e-05`, `inf`, `nan`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = repr(value)
    return text if any(c in text for c in ".en") else text + ".0"


# ---- declarations ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamDecl:
    """A pattern parameter or fn argument; `default` is a constant node or None. `static`: the
    kernel is specialised on the parameter's value (declared `static`, and every bool); otherwise a
    pattern parameter is a runtime value, a kernel argument (`Op.PARAM` after `bind-params`)."""

    name: str
    type: Type
    default: Node | None = None
    loc: Loc | None = field(default=None, compare=False, repr=False)
    static: bool = False


@dataclass(frozen=True)
class InputDecl:
    """A tensor passed at call time: element dtype and shape (int expressions of params and sizes)."""

    name: str
    dtype: str
    dims: tuple[Node, ...]
    loc: Loc | None = field(default=None, compare=False, repr=False)

    @property
    def type(self) -> Type:
        return INPUT_DTYPES[self.dtype]


@dataclass(frozen=True)
class FnIR:
    name: str
    params: tuple[ParamDecl, ...]
    body: Node
    loc: Loc | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class PatternIR:
    """A pattern: parameters (or, once bound, their values), inputs, lets, mask and score.

    `mask` None means every key; `score` None means `s`. `bindings` is set by `bind-params`: the values
    of the static parameters, on which the bound pattern is specialised; its `params` are then exactly
    the runtime parameters, read in the expressions as `Op.PARAM` leaves. The typed results of the
    passes (`ir/results.py`), None until their pass runs: `tiles` (`classify-tiles`, over the tile box
    variables `TILE_VARS`), `ranges` (`derive-ranges`; stays None for a mask without closed-form
    ranges), `sparsity` (`block-sparsify`: how the kernel finds its tiles) and `kernel` (`fuse`).
    """

    name: str
    params: tuple[ParamDecl, ...] = ()
    inputs: tuple[InputDecl, ...] = ()
    lets: tuple[tuple[str, Node], ...] = ()
    mask: Node | None = None
    score: Node | None = None
    bindings: tuple[tuple[str, int | float | bool], ...] | None = None
    loc: Loc | None = field(default=None, compare=False, repr=False)
    tiles: TileClasses | None = None
    ranges: Ranges | None = None
    sparsity: Sparsity | None = None
    kernel: KernelValues | None = None

    def input(self, name: str) -> InputDecl | None:
        return next((i for i in self.inputs if i.name == name), None)

    def roots(self) -> Iterator[Node]:
        """Every expression of the pattern: input dims, lets, mask, score, and the analyses' results."""
        for decl in self.inputs:
            yield from decl.dims
        for _, value in self.lets:
            yield value
        if self.mask is not None:
            yield self.mask
        if self.score is not None:
            yield self.score
        for result in (self.tiles, self.ranges, self.kernel):
            if result is not None:
                yield from result.roots()


@dataclass(frozen=True)
class ModuleIR:
    """What the pipeline compiles: the entry pattern (last) and the fns and patterns it refers to."""

    fns: tuple[FnIR, ...]
    patterns: tuple[PatternIR, ...]

    @property
    def entry(self) -> PatternIR:
        return self.patterns[-1]

    def fn(self, name: str) -> FnIR | None:
        return next((f for f in self.fns if f.name == name), None)

    def pattern(self, name: str) -> PatternIR | None:
        return next((p for p in self.patterns if p.name == name), None)

    def with_entry(self, entry: PatternIR) -> ModuleIR:
        return replace(self, patterns=(*self.patterns[:-1], entry))
