"""IR expressions to Triton statements: one variable per interior node, in dependency order.

Types in the kernel:

- ints are int32 where the value ranges of every launch fit (`analysis/value_ranges.py`), else int64;
  operands are widened before an op that needs it, so no intermediate value overflows int64 (see
  below);
- floats that feed the mask are float64, as the oracle computes them: a mask decided in float32 could
  differ from the oracle's on pairs near a boundary, and one differing pair changes a whole row of the
  output. Floats of the score are float32 (the score is float32 in the softmax anyway);
- a runtime int parameter is its int32 kernel argument (`PARAM_RANGE`); a runtime float parameter
  arrives as the int64 bit pattern of its float64 value (a Python float argument would be rounded to
  float32) and is bitcast back, exact;
- bools are int1; `input` loads are guarded (a position outside the input reads 0 / false), except
  along an axis declared `BATCH` or `KV_LEN` and read at `b` or `kv` where those lie inside it
  (`covered_sizes`): the launcher refuses an input that does not cover them;
- `floor` / `ceil` saturate at the ends of int64, as the oracle does (`value_ranges.FLOAT_TO_INT`).

The passes guarantee that every int value of the expressions emitted here lies inside int64 for every
launch (`bind-params` checks the program, and no rewrite leaves int64), so int64 arithmetic is exact.

Floor `//` and `%` keep Python's meaning for every sign: by a power of two they are an arithmetic shift
and a bit mask (exact for negative operands too), `udiv` / `umod` (operands proven non-negative by
`fuse`) are Triton's truncating `//` / `%`, and anything else calls `_floordiv` / `_floormod`, which
are exact whether the backend's `//` truncates or floors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from attnc.analysis.value_ranges import ValueRanges, fits_int32
from attnc.codegen import gather
from attnc.ir import reduce as reductions
from attnc.ir.nodes import Node, Op, PatternIR, Type

INT1, INT32, INT64 = "tl.int1", "tl.int32", "tl.int64"
FP32, FP64 = "tl.float32", "tl.float64"

_BINARY = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/"}
_COMPARE = {Op.EQ: "==", Op.NE: "!=", Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">="}
_UNARY_CALL = {
    Op.ABS: "tl.abs",
    Op.EXP: "tl.exp",
    Op.EXP2: "tl.exp2",
    Op.LOG: "tl.log",
    Op.LOG2: "tl.log2",
    Op.SQRT: "tl.sqrt",
    Op.SIGMOID: "tl.sigmoid",
    Op.TANH: "_tanh",
    Op.SIN: "tl.sin",
    Op.COS: "tl.cos",
    Op.ERF: "tl.erf",
}
_BITWISE = {Op.BITAND: "&", Op.BITOR: "|", Op.BITXOR: "^"}


BLOCK_MARK = "\x01"
"""Starts each further line of a multi-line `Assign` (a reduction's loop), once per level of
indentation past the statement's own: `expand_blocks` indents those lines where the statement lies."""


def expand_blocks(source: str) -> str:
    """The rendered source with the further lines of multi-line statements indented: each line that
    starts (after spaces) with k `BLOCK_MARK`s goes k - 1 levels past the last line without one."""
    if BLOCK_MARK not in source:
        return source
    out: list[str] = []
    base = ""
    for line in source.split("\n"):
        stripped = line.lstrip(" ")
        if stripped.startswith(BLOCK_MARK):
            text = stripped.lstrip(BLOCK_MARK)
            depth = len(stripped) - len(text) - 1
            out.append(base + "    " * depth + text)
        else:
            base = line[: len(line) - len(stripped)]
            out.append(line)
    return "\n".join(out)


@dataclass(frozen=True)
class Assign:
    """One generated statement: `target = value`."""

    target: str
    value: str


def input_arg(name: str) -> str:
    """The kernel argument prefix of an input: `in_doc` (`in_doc_ptr`, `in_doc_dim0`, ...)."""
    return f"in_{name}"


# A bool input's packed bits (`spec.InputArg.bits`): bits per int32 word, and its log2.
WORD_BITS, WORD_SHIFT = 32, 5


def bit_args(arg: str, rank: int) -> tuple[str, str, tuple[str, ...]]:
    """The kernel arguments of the packed bits of the input whose prefix is `arg` and whose rank is
    `rank`: the words' pointer, their count along the last axis, their strides."""
    return f"{arg}_bits", f"{arg}_bitwords", tuple(f"{arg}_bitstride{i}" for i in range(rank))


# The sizes an input's axis may be declared with that the kernels read it unguarded along, and at which
# position: `b` lies in [0, BATCH) in every kernel, `kv` in [0, KV_LEN) in the tiles whose key axis
# says so (`gather.TileAxis.inside`: the forward's PARTIAL tiles below the one the rows may cut).
COVERED_SIZES = {"BATCH": "b", "KV_LEN": "kv"}


def covered_sizes(dims: tuple[Node, ...]) -> tuple[str | None, ...]:
    """Per axis of an input declared with `dims`: the size it must cover at every launch ("BATCH",
    "KV_LEN"), checked by the launcher (`runtime/launch.py`'s `_input_args`), so that the kernels
    may read it there without a bound test; None for an axis of any other size (always guarded)."""
    return tuple(
        str(dim.attr) if dim.op is Op.SIZE and str(dim.attr) in COVERED_SIZES else None for dim in dims
    )


def param_arg(index: int) -> str:
    """The kernel argument of the runtime parameter at `index` among the pattern's `params`: named by
    position, so no user text reaches the kernel (`spec.ParamArg`)."""
    return f"param_{index}"


def float64_nodes(roots: list[Node], lets: Mapping[str, Node]) -> frozenset[Node]:
    """The float nodes the roots compute, following lets: these are computed in float64."""
    found: set[Node] = set()
    stack = list(roots)
    seen: set[Node] = set()
    while stack:
        root = stack.pop()
        for n in root.walk(skip=seen.__contains__):
            seen.add(n)
            if n.type is Type.FLOAT:
                found.add(n)
            if n.op is Op.REF and str(n.attr) in lets:
                stack.append(lets[str(n.attr)])
    return frozenset(found)


def foldable_scale(score: Node, varies: Callable[[Node], bool]) -> bool:
    """Whether the score reads `s` only as `s / c` or `s * c` (either order) by a float32 factor `c` the
    same for the whole tile (`varies`: whether a value varies over it): a soft cap's `s / cap`. Its
    kernel then multiplies the product by the scale and `1 / c` at once (`Emitter.fold_scale`)."""
    found = False
    for n in score.walk():
        for i, a in enumerate(n.args):
            if a.op is not Op.SCORE:
                continue
            other = n.args[1 - i] if len(n.args) == 2 else None
            if (n.op is Op.DIV and i != 0) or n.op not in (Op.MUL, Op.DIV) or other is None:
                return False
            if other.type is not Type.FLOAT or other.op is Op.SCORE or varies(other):
                return False
            found = True
    return found and score.op is not Op.SCORE


@dataclass
class Emitter:
    """Emits statements for expressions of one pattern. `leaves` names the index variables, tile
    bounds, sizes and `s` in the kernel; `known` the nodes an enclosing scope already computed (a loop
    body sees the prologue's values); `value_ranges` the pattern's value ranges, if other emitters of
    the kernel share them (else its own). Every node is emitted once per emitter."""

    pattern: PatternIR
    leaves: Mapping[str, str]
    float64: frozenset[Node] = frozenset()
    known: Mapping[Node, str] = field(default_factory=dict)
    prefix: str = "t"
    lines: list[Assign] = field(default_factory=list)
    helpers: set[str] = field(default_factory=set)
    value_ranges: ValueRanges | None = None
    # How q and kv run over a tile of a loop body, where its loads of few values per tile may be
    # loaded as scalars (`gather.TileAxis`); none elsewhere.
    tiles: Mapping[str, gather.TileAxis] = field(default_factory=dict)
    # The scale's name where `s` is the unscaled product and the score's uses of it, `s / c` and
    # `s * c` (`foldable_scale`), take the scale into their factor; None: `s` is scaled.
    fold_scale: str | None = None
    # The bool inputs it reads as packed bits (`_load_bits`): their kernel arguments must be passed.
    bits: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.lets = dict(self.pattern.lets)
        self.ranges = (
            self.value_ranges if self.value_ranges is not None else ValueRanges(self.pattern, self.lets)
        )
        self.names: dict[Node, str] = dict(self.known)
        self._dtypes: dict[Node, str] = {}
        self.params = {p.name: param_arg(i) for i, p in enumerate(self.pattern.params)}

    # ---- types -----------------------------------------------------------------------------------

    def dtype(self, n: Node) -> str:
        if n not in self._dtypes:
            self._dtypes[n] = self._dtype(n)
        return self._dtypes[n]

    def _dtype(self, n: Node) -> str:
        if n.type is Type.BOOL:
            return INT1
        if n.type is Type.FLOAT:
            return FP64 if n in self.float64 else FP32
        op = n.op
        if op in (Op.VAR, Op.SIZE, Op.PARAM):
            return INT32
        if op is Op.REF:
            return self.dtype(self.lets[str(n.attr)])
        if op is Op.LOAD:
            decl = self.pattern.input(str(n.attr))
            return INT64 if decl is not None and decl.dtype == "int64" else INT32
        if op in (Op.FLOOR, Op.CEIL):
            return INT64
        if op in (Op.MIN, Op.MAX):  # by its own range: a clamp narrows (see `_emit`)
            return INT32 if fits_int32(self.ranges.of(n)) else INT64
        wide = not fits_int32(self.ranges.of(n))
        wide = wide or any(self.dtype(a) == INT64 for a in n.args if a.type is Type.INT)
        return INT64 if wide else INT32

    # ---- values ----------------------------------------------------------------------------------

    def value(self, node: Node) -> str:
        """The text of the node's value, emitting what it needs."""
        known = self.names.get(node)
        if known is not None:  # most operands are: no walk
            return known
        if node.op is Op.REDUCE:
            self.names[node] = self._reduction(node)
            return self.names[node]
        # What is emitted already is not walked again; a reduction's term is emitted in its loop.
        names = self.names
        if all(a in names for a in node.args):  # a leaf, or operands emitted already: no walk
            names[node] = self._emit(node)
            return names[node]
        for n in node.walk(skip=lambda m: m in names or m.op is Op.REDUCE):
            for a in n.args:
                if a.op is Op.REDUCE and a not in names:
                    names[a] = self._reduction(a)
            names[n] = self._emit(n)
        return names[node]

    @staticmethod
    def cast_text(text: str, dtype: str, to: str) -> str:
        """A value's text (of type `dtype`) as type `to`."""
        return text if dtype == to else f"tl.cast({text}, {to})"

    def cast(self, node: Node, dtype: str) -> str:
        """The node's value as `dtype` (constants are written in it directly)."""
        if node.op is Op.CONST and node.type is not Type.BOOL:
            return _literal(node.attr, dtype)  # type: ignore[arg-type]
        return self.cast_text(self.value(node), self.dtype(node), dtype)

    def _const_dtype(self, node: Node) -> str:
        return INT32 if fits_int32((int(node.attr), int(node.attr))) else INT64  # type: ignore[arg-type]

    def _assign(self, value: str) -> str:
        name = f"{self.prefix}{len(self.lines)}"
        self.lines.append(Assign(name, value))
        return name

    def _emit(self, n: Node) -> str:
        op, dtype = n.op, self.dtype(n)
        if op is Op.CONST:
            if n.type is Type.BOOL:  # canonicalize folds constant bools away; a lone one is a row test
                return self._assign(f"{self.leaves['q']} {'>=' if n.attr else '<'} 0")
            return _literal(n.attr, dtype)  # type: ignore[arg-type]
        if op in (Op.VAR, Op.SIZE):
            return self.leaves[str(n.attr)]
        if op is Op.SCORE:
            return self.leaves["s"]
        if op is Op.PARAM:
            arg = self.params[str(n.attr)]
            if n.type is Type.INT:
                return arg
            # Triton's interpreter types a small bit pattern int32 whatever the def's annotation (tl.int64,
            # `signature.py`): widened first, the bitcast is exact.
            exact = f"{arg}.to({INT64}).to({FP64}, bitcast=True)"
            return self._assign(exact if dtype == FP64 else f"{exact}.to({dtype})")
        if op is Op.REF:
            return str(n.attr)
        if op is Op.LOAD:
            return self._load(n, dtype)
        args = n.args
        if self.fold_scale is not None and op in (Op.MUL, Op.DIV) and Op.SCORE in (args[0].op, args[1].op):
            return self._assign(self._scaled(n))
        if op in _BINARY:
            a, b = (self.cast(x, dtype) for x in args)
            if op is Op.DIV and dtype == FP32 and self.varies(args[0]) and not self.varies(args[1]):
                # By a scalar (a soft cap): under FAST_MATH a multiply by its reciprocal, computed once.
                self.helpers.add("div_scalar")
                return self._assign(f"_div_scalar({a}, {b}, FAST_MATH)")
            return self._assign(f"{a} {_BINARY[op]} {b}")
        if op in (Op.FLOORDIV, Op.UDIV, Op.MOD, Op.UMOD):
            return self._division(n, dtype)
        if op in _BITWISE:  # two's complement in any width that holds the operands and the result
            a, b = (self.cast(x, dtype) for x in args)
            return self._assign(f"{a} {_BITWISE[op]} {b}")
        if op in (Op.SHL, Op.SHR):
            return self._shift(n, dtype)
        if op is Op.TAN:
            x = self.cast(args[0], dtype)
            return self._assign(f"tl.sin({x}) / tl.cos({x})")
        if op is Op.NEG:
            return self._assign(f"-{self.cast(args[0], dtype)}")
        if op in (Op.MIN, Op.MAX):
            fn = "tl.minimum" if op is Op.MIN else "tl.maximum"
            if n.type is not Type.INT:
                # NaN if either is (`ir/fold.py`, the oracle's torch.minimum); Triton's default
                # returns the other operand.
                a, b = (self.cast(x, dtype) for x in args)
                return self._assign(f"{fn}({a}, {b}, propagate_nan=tl.PropagateNan.ALL)")
            # In the operands' width, then narrowed where the result fits int32 (a clamp of an int64
            # row value into the range of the keys it is compared with: `fuse`'s `_narrowed`).
            wide = _common(*(self._const_dtype(a) if a.is_const else self.dtype(a) for a in args))
            value = f"{fn}({self.cast(args[0], wide)}, {self.cast(args[1], wide)})"
            return self._assign(value if wide == dtype else f"tl.cast({value}, {dtype})")
        if op in _UNARY_CALL:
            if op is Op.TANH:
                self.helpers.add("tanh")
                # float32 values may take the hardware approximation where the kernel allows it
                # (FAST_MATH: 16-bit inputs on NVIDIA); float64 ones (masks) never do.
                fast = "FAST_MATH" if dtype == FP32 else "False"
                return self._assign(f"_tanh({self.cast(args[0], dtype)}, {fast})")
            return self._assign(f"{_UNARY_CALL[op]}({self.cast(args[0], dtype)})")
        if op is Op.TOFLOAT:
            return self._assign(f"tl.cast({self.value(args[0])}, {dtype})")
        if op in (Op.FLOOR, Op.CEIL):
            # Saturating, as the oracle (`value_ranges.FLOAT_TO_INT`): a bare cast of a float outside
            # int64 is undefined, and differs between backends.
            fn = "tl.floor" if op is Op.FLOOR else "tl.ceil"
            x = self._assign(f"{fn}({self.value(args[0])})")
            inside = self._assign(f"({x} > -9223372036854775808.0) & ({x} < 9223372036854775808.0)")
            exact = self._assign(f"tl.cast(tl.where({inside}, {x}, 0.0), {INT64})")
            top, bottom = (
                f"tl.full([], {(1 << 63) - 1}, {INT64})",
                f"tl.full([], {1 - (1 << 63)}, {INT64})",
            )
            edge = self._assign(
                f"tl.where({x} > 0, {top}, tl.where({x} < 0, {bottom}, tl.full([], 0, {INT64})))"
            )
            return self._assign(f"tl.where({inside}, {exact}, {edge})")
        if op in _COMPARE:
            common = _common(self.dtype(args[0]), self.dtype(args[1]))
            a, b = (self.cast(x, common) for x in args)
            return self._assign(f"{a} {_COMPARE[op]} {b}")
        if op in (Op.AND, Op.OR):
            joiner = " & " if op is Op.AND else " | "
            # A scalar operand (of neither q nor kv) may be an int32 0 / 1 in Triton's interpreter,
            # which `&` / `|` with a bool tile refuse: `!= 0` makes it a bool.
            parts = (f"({self.value(a)}){'' if self.varies(a) else ' != 0'}" for a in args)
            return self._assign(joiner.join(f"({p})" for p in parts))
        if op is Op.NOT:  # not `~`: Triton's interpreter may hold a scalar bool as an int32 0 / 1
            return self._assign(f"({self.value(args[0])}) == 0")
        if op is Op.WHERE:
            cond = self.value(args[0])
            return self._assign(f"tl.where({cond}, {self.cast(args[1], dtype)}, {self.cast(args[2], dtype)})")
        raise AssertionError(f"no Triton lowering for {op}")

    def _reduction(self, n: Node) -> str:
        """A reduction (`ir/reduce.py`) as a loop accumulating into a variable of the shape its term
        has (a scalar, a row, a column or a tile: a loop-carried value keeps one shape and type). The
        loop's statements are one `Assign` whose value goes on over further lines, each starting with
        `BLOCK_MARK`s, one per level of indentation past the statement's (`expand_blocks`)."""
        kind, _ = reductions.parts(n)
        lo, hi, term = n.args[0], n.args[1], n.args[2]
        index = self.dtype(reductions.variable(n))
        bounds = [self.cast(b, index) for b in (lo, hi)]
        own = len(self.lines)
        acc = self._assign("0")  # the accumulator's name; its initial value is set below
        carried = INT32 if kind in ("any", "all") else self.dtype(n)
        leaves = [leaf for leaf in ("q", "kv", "s") if self._reads(term, leaf)]
        shape = "".join(f" + tl.zeros_like({self.leaves[leaf]}).to({carried})" for leaf in leaves)
        empty = reductions.empty(kind, n.type)
        initial = _literal(int(empty) if kind in ("any", "all") else empty, carried)  # type: ignore[arg-type]
        if carried != FP64:  # a float64 literal is a `tl.full` already
            initial = f"tl.full([], {initial}, {carried})"
        lines = [f"{initial}{shape}"]
        # The loop body: its own statements (names prefixed, so that they cannot meet the outer ones),
        # its variable known; nothing it computes is known after it.
        saved = self.lines, self.names, self.prefix
        variable = f"{saved[2]}{own}_i"
        self.lines, self.names, self.prefix = [], dict(saved[1]), f"{saved[2]}{own}_"
        self.names[reductions.variable(n)] = variable
        try:
            if kind in ("any", "all"):
                value = f"tl.cast({self.value(term)}, {INT32})"
            else:
                value = self.cast(term, carried)
            dvalue = self.cast(n.args[3], carried) if kind in ("dmax", "dmin") else None
            # A nested reduction's loop goes one level deeper.
            body = [f"{a.target} = {a.value}".replace("\n", "\n" + BLOCK_MARK) for a in self.lines]
        finally:
            self.lines, self.names, self.prefix = saved
        first = f"{variable} == {bounds[0]}"
        # A float max / min is NaN if a term is (as `Op.MIN` / `Op.MAX`, below).
        nan = ", propagate_nan=tl.PropagateNan.ALL" if carried in (FP32, FP64) else ""
        if kind == "sum":
            update = [f"{acc} = {acc} + {value}"]
        elif kind in ("any", "all", "max", "min"):
            fn = "tl.maximum" if kind in ("any", "max") else "tl.minimum"
            update = [f"{acc} = tl.where({first}, {value}, {fn}({acc}, {value}{nan}))"]
            if kind in ("any", "all"):
                update = [f"{acc} = {fn}({acc}, {value})"]
        else:  # the derivative of the term the max / min selects: `analysis/derivative.py`
            extreme = f"{acc}_v"
            lines.append(f"{extreme} = {initial}{shape}")
            wins, loses = (">", "<") if kind == "dmax" else ("<", ">")
            fn = "tl.maximum" if kind == "dmax" else "tl.minimum"
            update = [
                f"{acc} = tl.where({first}, {dvalue}, tl.where({extreme} {wins} {value}, {acc}, "
                f"tl.where({extreme} {loses} {value}, {dvalue}, 0.5 * ({acc} + {dvalue}))))",
                f"{extreme} = tl.where({first}, {value}, {fn}({extreme}, {value}{nan}))",
            ]
        lines.append(f"for {variable} in range({bounds[0]}, {bounds[1]}):")
        lines += [BLOCK_MARK + line for line in [*body, *update]]
        self.lines[own] = Assign(acc, f"\n{BLOCK_MARK}".join(lines))
        if kind in ("any", "all"):
            return self._assign(f"{acc} != 0")
        return acc

    def _reads(self, n: Node, leaf: str) -> bool:
        """Whether the value reads `leaf` (q, kv or s), following lets."""
        if leaf in n.free:
            return True
        return any(
            m.op is Op.REF and str(m.attr) in self.lets and self._reads(self.lets[str(m.attr)], leaf)
            for m in n.walk()
        )

    def _scaled(self, n: Node) -> str:
        """`s / c` or `s * c` (either order) of the unscaled `s`, the scale taken into the factor under
        FAST_MATH (one multiply per score; a rounding apart) and applied first otherwise (the values of
        the unfolded form, for float32 inputs)."""
        s, scale = self.leaves["s"], self.fold_scale
        c = n.args[1] if n.args[0].op is Op.SCORE else n.args[0]
        factor = self.cast(c, FP32)
        if n.op is Op.DIV:
            self.helpers.add("div_scalar")
            exact = f"_div_scalar({s} * {scale}, {factor}, FAST_MATH)"
            return f"({s} * ({scale} / {factor})) if FAST_MATH else {exact}"
        return f"({s} * ({scale} * {factor})) if FAST_MATH else (({s} * {scale}) * {factor})"

    def varies(self, n: Node) -> bool:
        """Whether the value reads `q`, `kv` or `s` (following lets): a row, column or tile, not a
        scalar."""
        if n.free & {"q", "kv", "s"}:
            return True
        for m in n.walk():
            if m.op is Op.REF and str(m.attr) in self.lets and self.varies(self.lets[str(m.attr)]):
                return True
        return False

    def _shift(self, n: Node, dtype: str) -> str:
        """`<<` / `>>` with the count clamped to [0, 63] (`fold.SHIFT_LIMIT`); a shift by the width
        or more is undefined in the hardware, so in an int32 result the count is clamped to 31 instead,
        which is the same value: the value ranges chose int32 because the result fits it, so a left
        shift by 32 or more can only be of 0, and `x >> 31` of an int32 is already 0 or -1."""
        a, count = n.args
        limit = 31 if dtype == INT32 else 63
        x = self.cast(a, dtype)
        if count.is_const:
            c = str(min(max(int(count.attr), 0), limit))  # type: ignore[arg-type]
        else:
            c = self._assign(f"tl.minimum(tl.maximum({self.cast(count, dtype)}, 0), {limit})")
        return self._assign(f"{x} {'<<' if n.op is Op.SHL else '>>'} {c}")

    def _division(self, n: Node, dtype: str) -> str:
        a, b = n.args
        floor = n.op in (Op.FLOORDIV, Op.UDIV)
        x = self.cast(a, dtype)
        if b.is_const and int(b.attr) > 0 and int(b.attr) & (int(b.attr) - 1) == 0:  # type: ignore[arg-type]
            shift = int(b.attr).bit_length() - 1  # type: ignore[arg-type]
            if floor:
                return x if shift == 0 else self._assign(f"{x} >> {shift}")
            residue = f"{x} & {int(b.attr) - 1}"  # type: ignore[arg-type]
            axis = self._tile_axis(a)
            if axis is not None and axis.offsets is not None:
                # Where the tile's first position is a multiple of the divisor (aligned tiles of a
                # multiple of its size), the residue is the offsets': the same in every tile, computed
                # once, not once per key column in each (the 2-D neighbourhood's `kv % width`).
                offsets = self.cast_text(axis.offsets, INT32, dtype)
                residue = (
                    f"({offsets} & {int(b.attr) - 1}) if (({axis.aligned}) & ({axis.size} % {b.attr} == 0)) "
                    f"else ({residue})"
                )
            return self._assign(residue)
        y = self.cast(b, dtype)
        if n.op in (Op.UDIV, Op.UMOD):
            return self._assign(f"{x} {'//' if floor else '%'} {y}")
        helper = "floordiv" if floor else "floormod"
        self.helpers.add(helper)
        # The helpers divide magnitudes, and in int32 the magnitude of -2**31 (an int32 input's least
        # value) wraps to -2**31: a division that may see it is made in int64 (`value_ranges` keeps
        # -2**63, whose magnitude int64 lacks, out of every division).
        least = min(self.ranges.of(a)[0], self.ranges.of(b)[0])
        wide = INT64 if dtype == INT32 and least <= -(1 << 31) else dtype
        x, y = self.cast(a, wide), self.cast(b, wide)
        if b.is_const:  # the helpers take tensors: a constant divisor becomes a typed scalar
            y = f"tl.full([], {int(b.attr)}, {wide})"  # type: ignore[arg-type]
        if a.is_const:
            x = f"tl.full([], {int(a.attr)}, {wide})"  # type: ignore[arg-type]
        value = f"_{helper}({x}, {y})"
        return self._assign(value if wide == dtype else f"tl.cast({value}, {dtype})")

    def _load(self, n: Node, dtype: str) -> str:
        decl = self.pattern.input(str(n.attr))
        assert decl is not None
        indices = [self.value(i) for i in n.args]
        inside = self._inside(n)
        column = self._bit_column(n)
        if column is not None:
            return self._load_bits(n, indices, inside, column)
        varying = self._few_values(n)
        if varying:
            return self._load_by_scalars(n, indices, inside, varying, dtype)
        return self._assign(self._loaded(str(n.attr), indices, inside, dtype, self._split(n)))

    def _tile_axis(self, index: Node) -> gather.TileAxis | None:
        """The tile axis whose position the value is (lets expanded), if any."""
        value = gather.expand_lets(index, self.lets)
        return self.tiles.get(str(value.attr)) if value.op is Op.VAR else None

    def _split(self, n: Node) -> list[tuple[str, str] | None]:
        """Per index of the load: (the tile's first position, the positions' offsets from it) where the
        index is the position of a tile axis whose positions are consecutive (`gather.TileAxis`), else
        None. The address is then the scalar first position's offset plus the offsets' (the same for
        every tile of the loop), not one 64-bit product per key column: with the `or` of a key test,
        Longformer's PARTIAL forward makes 229 integer instructions per tile instead of 288 (sm_90)."""
        split: list[tuple[str, str] | None] = []
        for index in n.args:
            axis = self._tile_axis(index)
            split.append(None if axis is None or axis.offsets is None else (axis.first, axis.offsets))
        return split

    def _inside(self, n: Node) -> list[str | None]:
        """Per index of the load: the constexpr condition under which it lies inside its axis, so that
        it needs no bound test ("True": always), or None. An index is inside where it is the position
        (lets expanded) that runs over the size the axis is declared with and must cover
        (`covered_sizes`): `b` always, `kv` under its tile axis' `inside`.

        A load of a tile of pointers whose other tests are all of scalars (`bias[h, kv]` in a FULL
        tile) keeps the test of a varying index: Triton's interpreter refuses a scalar mask on a tile
        of pointers ("mask has unsupported dtype")."""
        decl = self.pattern.input(str(n.attr))
        assert decl is not None
        conditions: list[str | None] = []
        for index, size in zip(n.args, covered_sizes(decl.dims), strict=True):
            var = COVERED_SIZES.get(size or "")
            value = gather.expand_lets(index, self.lets) if var is not None else None
            if value is None or value.op is not Op.VAR or value.attr != var:
                conditions.append(None)
            elif var == "b":
                conditions.append("True")
            else:
                axis = self.tiles.get(var)
                conditions.append(None if axis is None else axis.inside)
        varies = [self.varies(index) for index in n.args]
        tested = [v for v, condition in zip(varies, conditions, strict=True) if condition != "True"]
        if tested and not any(tested) and any(varies):
            conditions[varies.index(True)] = None
        return conditions

    def _loaded(
        self,
        name: str,
        indices: list[str],
        inside: list[str | None],
        dtype: str,
        split: list[tuple[str, str] | None] | None = None,
    ) -> str:
        """The value of input `name` at the indices (texts), guarded: a position outside it reads 0.
        The bound test of index i holds unless `inside[i]` (a constexpr condition, `_inside`); index i
        is addressed as `split[i]`'s first position plus its offsets where that is given (`_split`)."""
        decl = self.pattern.input(name)
        assert decl is not None
        arg = input_arg(decl.name)
        guards = _index_guards(arg, indices, inside)
        terms = []
        for axis, (i, parts) in enumerate(zip(indices, split or [None] * len(indices), strict=True)):
            stride = f"{arg}_stride{axis}"
            if parts is None:
                terms.append(f"tl.cast({i}, {INT64}) * {stride}")
            else:
                first, offsets = parts
                terms.append(f"tl.cast({first}, {INT64}) * {stride} + tl.cast({offsets}, {INT64}) * {stride}")
        offset = " + ".join(terms)
        # `!= 0` makes the mask int1 even where the interpreter holds scalar bools as int32 0 / 1.
        mask = f", mask=({' & '.join(guards)}) != 0, other=0" if guards else ""
        loaded = f"tl.load({arg}_ptr + {offset or '0'}{mask})"
        if decl.dtype == "bool":  # passed as uint8
            return f"{loaded} != 0"
        if decl.type is Type.FLOAT:
            return f"tl.cast({loaded}, {dtype})"
        return loaded

    def _bit_column(self, n: Node) -> gather.TileAxis | None:
        """The tile axis of a bool input's load that reads one value per key column: its last index
        is the position of a tile axis whose positions are consecutive (`kv` in the forward's and dQ's
        tiles), its others the same over the tile (`flag[b, kv]`); None for any other load."""
        decl = self.pattern.input(str(n.attr))
        if decl is None or decl.dtype != "bool" or not n.args:
            return None
        *lead, last = n.args
        axis = self._tile_axis(last)
        if axis is None or axis.offsets is None or any(self.varies(i) for i in lead):
            return None
        return axis

    def _load_bits(self, n: Node, indices: list[str], inside: list[str | None], axis: gather.TileAxis) -> str:
        """A bool input's key column (`_bit_column`) read from its bits packed 32 to an int32 word
        (`spec.InputArg.bits`): over an aligned tile of a multiple of 32 positions, the tile's
        BLOCK_N / 32 words are the same for every thread (one scalar load each) and each column's
        value is one test of its bit, where the bytes would cost a load per pair of columns, a 64-bit
        address each and the bytes' unpacking (Longformer's global tokens: 204 integer instructions
        per PARTIAL tile against 184, sm_90). Other tiles read the bytes. One statement over several
        lines (`BLOCK_MARK`)."""
        decl = self.pattern.input(str(n.attr))
        assert decl is not None
        self.bits.add(decl.name)
        arg = input_arg(decl.name)
        words, count, strides = bit_args(arg, len(n.args))
        own = len(self.lines)
        condition = f"({axis.aligned}) & ({axis.size} % {WORD_BITS} == 0)"
        if axis.consecutive is not None:
            condition = f"{condition} & ({axis.consecutive})"
        choice = self._assign(condition)
        word, index = f"{choice}_w", f"{choice}_k"
        at = f"(({axis.first}) >> {WORD_SHIFT}) + {index}"
        guards = _index_guards(arg, indices[:-1], inside[:-1])
        # A word past the last is read as 0 (no bit), unless the tile's positions lie inside the input.
        if (past := _guard(f"({at} < {count})", inside[-1])) is not None:
            guards.append(past)
        terms = [
            f"tl.cast({i}, {INT64}) * {stride}" for i, stride in zip(indices[:-1], strides[:-1], strict=True)
        ]
        # (The words' addresses from the tile's first: the same register, a constant offset each.)
        terms.append(
            f"tl.cast(({axis.first}) >> {WORD_SHIFT}, {INT64}) * {strides[-1]} + {index} * {strides[-1]}"
        )
        mask = f", mask=({' & '.join(guards)}) != 0, other=0" if guards else ""
        load = f"tl.load({words} + {' + '.join(terms)}{mask})"
        offsets = axis.offsets
        lines = [
            self.lines[own].value,
            f"if {choice}:",
            f"{BLOCK_MARK}{word} = tl.zeros_like({offsets})",
            f"{BLOCK_MARK}for {index} in tl.static_range({axis.size} // {WORD_BITS}):",
            f"{BLOCK_MARK * 2}{word} = tl.where(({offsets} >> {WORD_SHIFT}) == {index}, {load}, {word})",
            f"{BLOCK_MARK}{choice}_v = ({word} & (1 << ({offsets} & {WORD_BITS - 1}))) != 0",
            "else:",
            f"{BLOCK_MARK}{choice}_v = {self._loaded(decl.name, indices, inside, INT1, self._split(n))}",
        ]
        self.lines[own] = Assign(choice, f"\n{BLOCK_MARK}".join(lines))
        return f"{choice}_v"

    def _few_values(self, n: Node) -> list[tuple[int, str, Node, str, str | None]]:
        """The load's indices that vary over the tile, as (operand, position variable, value with the
        lets expanded, constexpr condition, constexpr condition of one value), where each takes at most
        `gather.MOST_VALUES` values over a tile under its condition and one under the other, if any
        (`gather.tile_condition`); empty where the load must be gathered per element (or varies
        nowhere)."""
        varying = [(k, index) for k, index in enumerate(n.args) if self.varies(index)]
        if not varying or len(varying) > gather.MOST_INDICES:
            return []
        found = []
        for k, index in varying:
            value = gather.expand_lets(index, self.lets)
            positions = value.free & {"q", "kv"}
            if len(positions) != 1 or not value.free <= positions | {"b", "h"}:
                return []
            (var,) = positions
            axis = self.tiles.get(var)
            condition = None if axis is None else gather.tile_condition(value, var, axis)
            if condition is None:
                return []
            assert axis is not None
            found.append((k, var, value, condition, gather.tile_condition(value, var, axis, most=1)))
        return found

    def _load_by_scalars(
        self,
        n: Node,
        indices: list[str],
        inside: list[str | None],
        varying: list[tuple[int, str, Node, str, str | None]],
        dtype: str,
    ) -> str:
        """The load as scalar loads at each combination of its varying indices' values over the tile
        (index i takes lo_i or lo_i + 1, lo_i its value at the tile's first position), chosen per row
        and per key column: no per-element gather, whose layout Triton converts to the scores' through
        shared memory (`gather.py`). Under a constexpr condition on the tile sizes; the per-element
        gather otherwise. Where an index takes one value over the tile (its constexpr condition of one
        value), it is its lo_i, with no select and no load at lo_i + 1: the block map's `kv // 128` over
        aligned tiles of 128 keys or fewer. One statement over several lines (`BLOCK_MARK`). `inside`:
        as for `_loaded` (a varying index, whose lo_i + 1 may lie past the input, is never a bare
        position: guarded)."""
        own = len(self.lines)
        choice = self._assign(" & ".join(condition for *_, condition, _ in varying))
        # The indices at the tile's first positions: their expressions with q / kv at those positions.
        firsts = Emitter(
            self.pattern,
            {**self.leaves, **{var: self.tiles[var].first for _, var, _, _, _ in varying}},
            self.float64,
            prefix=f"{choice}_i",  # not `{choice}_0`: the name of a scalar load (`select`)
            value_ranges=self.ranges,
        )
        lows = [firsts.value(value) for _, _, value, _, _ in varying]
        self.helpers |= firsts.helpers
        body = [f"{a.target} = {a.value}" for a in firsts.lines]

        value = f"{choice}_v"

        def select(level: int, offsets: tuple[int, ...], depth: str) -> str:
            """The value where the indices before `level` are their lows plus `offsets`, its lines
            indented by `depth` (`BLOCK_MARK`s)."""
            if level == len(varying):  # one scalar load
                at = list(indices)
                for (k, *_), low, offset in zip(varying, lows, offsets, strict=True):
                    at[k] = f"({low} + 1)" if offset else low
                target = f"{choice}_{''.join(map(str, offsets))}"
                body.append(f"{depth}{target} = {self._loaded(str(n.attr), at, inside, dtype)}")
                return target
            k, *_, one = varying[level]
            target = f"{choice}_{''.join(map(str, offsets))}s" if level else value
            first = select(level + 1, (*offsets, 0), depth)
            if one is not None:  # the low alone where the index takes one value
                # (At the index's shape, as in the other branch: the select of one value folds away.)
                body.append(f"{depth}if {one}:")
                same = f"tl.where({indices[k]} == {lows[level]}, {first}, {first})"
                body.append(f"{depth}{BLOCK_MARK}{target} = {same}")
                body.append(f"{depth}else:")
                depth += BLOCK_MARK
            second = select(level + 1, (*offsets, 1), depth)
            body.append(f"{depth}{target} = tl.where({indices[k]} == {lows[level]}, {first}, {second})")
            return target

        select(0, (), "")
        fallback = f"{value} = {self._loaded(str(n.attr), indices, inside, dtype)}"
        lines = [self.lines[own].value, f"if {choice}:"]
        lines += [BLOCK_MARK + line.replace("\n", "\n" + BLOCK_MARK) for line in body]
        lines += ["else:", BLOCK_MARK + fallback]
        self.lines[own] = Assign(choice, f"\n{BLOCK_MARK}".join(lines))
        return value


def _index_guards(arg: str, indices: list[str], inside: list[str | None]) -> list[str]:
    """The bound tests of a load's indices (texts) into the dims of the input whose prefix is `arg`,
    but those known to hold (`_guard`)."""
    tests = [f"({i} >= 0) & ({i} < {arg}_dim{axis})" for axis, i in enumerate(indices)]
    return [g for test, within in zip(tests, inside, strict=True) if (g := _guard(test, within)) is not None]


def _guard(test: str, inside: str | None) -> str | None:
    """The bound test of a load's index, unless its constexpr condition of lying inside (`inside`:
    "True", always; None, never) holds: Triton folds the test away where it does."""
    if inside is None:
        return test
    return None if inside == "True" else f"(({test}) | ({inside}))"


def _common(a: str, b: str) -> str:
    if a == b:
        return a
    if INT1 in (a, b):
        raise AssertionError(f"comparison of {a} with {b}")
    return INT64 if INT64 in (a, b) else FP64 if FP64 in (a, b) else a


def _literal(value: int | float, dtype: str) -> str:
    if dtype in (FP32, FP64):
        value = float(value)
        text = repr(value) if math.isfinite(value) else f'float("{value}")'
        # A Python float in Triton code is a float32 constant: float64 ones are made explicitly.
        return f"tl.full([], {text}, {FP64})" if dtype == FP64 else text
    if int(value) == -(1 << 63):  # the literal 2**63 under the minus is out of range for Triton
        return f"({1 - (1 << 63)} - 1)"
    return str(int(value))
