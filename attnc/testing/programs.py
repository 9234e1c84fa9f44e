"""Hypothesis strategies for random, well-typed `.attn` programs and the shapes to run them at.

`programs()` draws a whole file: `fn` declarations, a helper pattern, and the pattern under test with
parameters (bound to drawn values, some left at their defaults; ints and floats runtime or `static`,
bools sometimes written `static` too), `input` tensors of every dtype whose
dims are expressions of the sizes, `let`s, a mask and a score. Expressions are built by type (int,
float, bool) from the whole language: index variables and sizes, literals, `+ - * / // %` (floor
division and modulo also with negative and zero operands), unary minus, chained comparisons,
`and or not`, the bitwise `& | ^ << >>` (shift counts also negative or past 63, which clamp), every
built-in function (`sin cos tan erf` among them), bounded reductions (`sum any all max min`, unrolled
or loops, also empty, over constant or parameter bounds), `-inf` as the value of a masked-out score, calls of
the file's `fn`s and of stdlib and local patterns with positional and keyword arguments, and loads of
the inputs (0-d ones too, `t[]`) at data-dependent indices (reads outside a shape are part of the
language: they give 0 / false).

Two constraints keep a program's *numbers* meaningful, so that a mismatch is a bug and not noise: a
score is finite wherever it is evaluated (`exp` only of bounded values, `log` and `sqrt` only of
values >= 1, division only by constants or `abs(x) + 1`, `tan` only of values in [-1.5, 1.5], `-inf`
only as a whole score, `where(cond, score, -inf)`; a left shift only of a position, size or literal by
at most 4, so that no int leaves int64), and floats are compared only in the mask
itself. The kernel evaluates a mask's floats in float64, exactly as the oracle (so a mask may divide
by zero and compare infinities), but a score's in float32: a comparison there, or in a `let` or `fn`
a score may use, could be flipped by rounding, which is not a bug.

Choices are ordered simplest first, so that Hypothesis shrinks a failing program towards a short one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hypothesis import strategies as st

INT, FLOAT, BOOL = "int", "float", "bool"
DTYPES = ("int32", "bool", "float32", "int64", "float16", "bfloat16")
SIZES = ("Q_LEN", "KV_LEN", "NUM_HEADS", "BATCH")
COMPARISONS = ("<", "<=", "==", "!=", ">", ">=")
# Dims of an input (expressions of the sizes) and the index each dim is most naturally read at.
DIMS = {
    "KV_LEN": "kv",
    "Q_LEN": "q",
    "NUM_HEADS": "h",
    "BATCH": "b",
    "KV_LEN + 3": "kv + 1",
    "Q_LEN + KV_LEN": "q - kv + KV_LEN",
    "5": "(q - kv) % 5",
    "2 * NUM_HEADS": "2 * h + 1",
}
# Stdlib patterns and how to call them (each `{}` an int argument, drawn small).
STDLIB_CALLS = (
    "causal",
    "full",
    "causal_bottom_right",
    "sliding_window({})",
    "sliding_window(window={})",
    "local({}, {})",
    "local(left={}, right={})",
    "sinks({})",
    "prefix_lm(prefix={})",
    "dilated({}, {})",
    "neighborhood_1d(kernel={})",
    "neighborhood_1d({}, dilation={}, is_causal=true)",
)
# Bounds on forms of (q, kv) that the tile analysis and the range derivation recognise.
FORMS = (
    "q - kv", "kv - q", "kv", "q", "abs(q - kv)", "(q - kv) % {}", "q // {} - kv // {}", "(kv - q) // {}",
    "max(q, kv)", "q + kv", "2 * q - kv",
)  # fmt: skip


_NAME = re.compile(r"\b([A-Za-z_]\w*)\b(?!\s*[(\[])")
_NOT_VARIABLES = re.compile(r"true|false|in|ri\d+")


def _reads_a_variable(text: str) -> bool:
    """Whether an int expression's text reads a position, size, parameter, let or input, so that the
    front end cannot evaluate it (a reduction's variable does not count: short reductions of literals
    are unrolled into constants)."""
    return any(not _NOT_VARIABLES.fullmatch(m.group(1)) for m in _NAME.finditer(text)) or "[" in text


def lit(value: int | float) -> str:
    """A literal, parenthesised when negative."""
    text = repr(value) if isinstance(value, float) else str(value)
    return f"({text})" if value < 0 else text


@dataclass(frozen=True)
class Fn:
    name: str
    params: tuple[tuple[str, str, str | None], ...]  # name, type, default (text) or None
    result: str


@dataclass(frozen=True)
class Input:
    name: str
    dtype: str
    dims: tuple[str, ...]

    @property
    def type(self) -> str:
        return BOOL if self.dtype == "bool" else INT if self.dtype.startswith("int") else FLOAT


@dataclass
class Scope:
    """The names an expression may use, by type."""

    names: dict[str, list[str]] = field(default_factory=lambda: {INT: [], FLOAT: [], BOOL: []})
    inputs: list[Input] = field(default_factory=list)
    fns: list[Fn] = field(default_factory=list)
    # Local patterns: name, int params, and whether an argument must be fixed (literals and parameters):
    # a parameter that bounds a reduction cannot be given a position (`ir/reduce.py`'s `unroll_all`).
    patterns: list[tuple[str, tuple[str, ...], bool]] = field(default_factory=list)
    score: bool = False  # inside `score`: `s` is in scope
    grid: bool = True  # the index variables and sizes are in scope
    float_compare: bool = False  # floats may be compared (only in a mask)
    reductions: int = 0  # reduction variables drawn so far: the next is `ri<n>`, a new name


@dataclass(frozen=True)
class Program:
    """A drawn `.attn` file, the pattern to compile from it and the parameter values to bind."""

    source: str
    pattern: str
    params: dict[str, int | float | bool]


class _Draw:
    """Expression drawing for one program (the strategies below are thin wrappers)."""

    def __init__(self, draw: st.DrawFn, scope: Scope) -> None:
        self.draw = draw
        self.scope = scope

    def one(self, options):
        return self.draw(st.sampled_from(options))

    def small(self, low: int = -3, high: int = 6) -> int:
        return self.draw(st.integers(low, high))

    # ---- ints ---------------------------------------------------------------------------------------

    def int_leaf(self) -> str:
        names = list(self.scope.names[INT])
        if self.scope.grid:
            names = ["q", "kv", *names, "h", "b", *SIZES]
        kind = self.draw(st.integers(0, 3))
        if kind == 0 or not names:
            return lit(self.small(-4, 9))
        return self.one(names)

    def int_(self, depth: int) -> str:
        if depth <= 0 or self.draw(st.integers(0, 3)) == 0:
            return self.int_leaf()
        sub = depth - 1
        kind = self.one(
            ("add", "sub", "mul", "floordiv", "mod", "neg", "abs", "min", "max", "clamp", "where", "load",
             "fn", "vardiv", "round", "product", "bits", "reduce")
        )  # fmt: skip
        if kind == "add":
            return f"({self.int_(sub)} + {self.int_(sub)})"
        if kind == "sub":
            return f"({self.int_(sub)} - {self.int_(sub)})"
        if kind == "mul":
            return f"({lit(self.small())} * {self.int_(sub)})"
        if kind in ("floordiv", "mod"):
            op = "//" if kind == "floordiv" else "%"
            return f"({self.int_(sub)} {op} {lit(self.small(-4, 5))})"
        if kind == "vardiv":  # a divisor that varies, and may be 0 (x // 0 is 0, x % 0 is x)
            return f"({self.int_(sub)} {self.one(('//', '%'))} {self.int_(sub)})"
        if kind == "product":  # at most one level of variable products keeps values small
            return f"({self.int_leaf()} * {self.int_leaf()})"
        if kind == "bits":
            return self.bits(sub)
        if kind == "reduce":
            return self.reduction(INT, sub)
        if kind == "neg":
            return f"(-{self.int_(sub)})"
        if kind == "abs":
            return f"abs({self.int_(sub)})"
        if kind in ("min", "max"):
            args = [self.int_(sub) for _ in range(self.draw(st.integers(2, 3)))]
            return f"{kind}({', '.join(args)})"
        if kind == "clamp":
            return f"clamp({self.int_(sub)}, {self.int_(sub)}, {self.int_(sub)})"
        if kind == "where":
            return f"where({self.bool_(sub)}, {self.int_(sub)}, {self.int_(sub)})"
        if kind == "round":  # floor / ceil of an exact float quotient
            return f"{self.one(('floor', 'ceil'))}({self.int_(sub)} / {self.one(('2', '3', '(-2)', '0.5'))})"
        if kind == "load":
            return self.load(INT, sub) or self.int_leaf()
        return self.call(INT, sub) or self.int_leaf()

    def bits(self, depth: int) -> str:
        """A bitwise operation: `& | ^` of any ints, `>>` by any count (a negative one shifts by 0, one
        past 63 by 63), `<<` of a position, size or small literal by at most 4 (so no int leaves
        int64; a variable count is masked to [0, 3])."""
        op = self.one(("&", "|", "^", ">>", "<<"))
        if op == ">>":
            value, count = self.int_(depth), self.int_(depth)
            if not _reads_a_variable(count):  # a constant count outside [0, 63] is a located error
                count = f"clamp({count}, 0, 63)"
            return f"({value} >> {count})"
        if op != "<<":
            return f"({self.int_(depth)} {op} {self.int_(depth)})"
        value = self.one(("q", "kv", "h", "b", *SIZES)) if self.scope.grid else lit(self.small())
        count = self.one(("0", "1", "4", f"({self.int_(depth)} & 3)"))
        return f"({value} << {count})"

    # ---- floats -------------------------------------------------------------------------------------

    def float_leaf(self) -> str:
        names = list(self.scope.names[FLOAT])
        if self.scope.score:
            names = ["s", "s", *names]
        kind = self.draw(st.integers(0, 4))
        if kind == 4:  # a float input at its natural indices (`bias[h, kv]`), where there is one
            loaded = self.load(FLOAT, -1)
            if loaded is not None:
                return loaded
        if kind == 0 or not names:
            return lit(self.draw(st.sampled_from((0.5, 1.0, -1.5, 2.0, 0.25, -0.75, 3.0))))
        return self.one(names)

    def float_(self, depth: int) -> str:
        if depth <= 0 or self.draw(st.integers(0, 3)) == 0:
            return self.float_leaf()
        sub = depth - 1
        kind = self.one(
            ("add", "mul", "sub", "int", "scale", "div", "neg", "tanh", "sigmoid", "exp", "log", "sqrt",
             "abs", "min", "max", "clamp", "where", "load", "fn", "round", "trig", "reduce")
        )  # fmt: skip
        if kind == "add":
            return f"({self.float_(sub)} + {self.float_(sub)})"
        if kind == "sub":
            return f"({self.float_(sub)} - {self.float_(sub)})"
        if kind == "mul":
            return f"({self.float_(sub)} * {self.bounded(sub)})"
        if kind == "int":  # an int promoted, scaled down so that positions do not swamp the scores
            return f"({self.int_(sub)} * {self.one(('0.25', '(-0.1)', '0.05'))})"
        if kind == "scale":
            return f"({self.float_(sub)} * {lit(self.draw(st.sampled_from((0.5, -1.0, 2.0, 0.125))))})"
        if kind == "div":  # by a constant, or by something >= 1
            divisor = self.one(("2.0", "(-4.0)", "0.75", f"(abs({self.float_(sub)}) + 1.0)"))
            return f"({self.float_(sub)} / {divisor})"
        if kind == "neg":
            return f"(-{self.float_(sub)})"
        if kind in ("tanh", "sigmoid"):
            return f"{kind}({self.float_(sub)})"
        if kind == "reduce":
            return self.reduction(FLOAT, sub)
        if kind == "trig":
            fn = self.one(("sin", "cos", "erf", "tan"))
            if fn == "tan":  # of [-1.5, 1.5]: finite, and away from the poles at +-pi/2
                return f"tan({self.bounded(sub)} * 0.5)"
            return f"{fn}({self.float_(sub)})"
        if kind == "exp":
            return f"{self.one(('exp', 'exp2'))}({self.bounded(sub)})"
        if kind == "log":
            return f"{self.one(('log', 'log2'))}(abs({self.float_(sub)}) + 1.0)"
        if kind == "sqrt":
            return f"sqrt(abs({self.float_(sub)}) + 1.0)"
        if kind == "abs":
            return f"abs({self.float_(sub)})"
        if kind in ("min", "max"):
            return f"{kind}({self.float_(sub)}, {self.float_(sub)})"
        if kind == "clamp":
            low, high = self.one(("(-2.0)", "(-0.5)", "0.0")), self.one(("0.5", "2.0"))
            return f"clamp({self.float_(sub)}, {low}, {high})"
        if kind == "where":
            return f"where({self.bool_(sub)}, {self.float_(sub)}, {self.float_(sub)})"
        if kind == "round":
            return f"({self.one(('floor', 'ceil'))}({self.int_(sub)} / 4) * 0.5)"
        if kind == "load":
            return self.load(FLOAT, sub) or self.float_leaf()
        return self.call(FLOAT, sub) or self.float_leaf()

    def bounded(self, depth: int) -> str:
        """A float in [-3, 3] (what `exp` and factors of a product may take)."""
        kind = self.draw(st.integers(0, 3))
        if kind == 0:
            return lit(self.draw(st.sampled_from((0.5, -1.0, 1.5))))
        if kind == 1:
            return f"tanh({self.float_(depth)})"
        if kind == 2:
            return f"(sigmoid({self.float_(depth)}) * 2.0)"
        return f"clamp({self.float_(depth)}, -3.0, 3.0)"

    # ---- bools --------------------------------------------------------------------------------------

    def bool_leaf(self) -> str:
        names = self.scope.names[BOOL]
        kind = self.draw(st.integers(0, 4))
        if kind == 0:
            return self.one(("true", "false"))
        if kind == 1 and names:
            return self.one(names)
        if kind == 2 and self.scope.grid:
            return self.pattern_ref()
        if kind == 3 and self.scope.grid:
            return self.form()
        return self.compare(0)

    def bool_(self, depth: int) -> str:
        if depth <= 0 or self.draw(st.integers(0, 3)) == 0:
            return self.bool_leaf()
        sub = depth - 1
        kind = self.one(
            ("and", "or", "not", "compare", "chain", "booleq", "where", "load", "fn", "floats", "reduce")
        )
        if kind in ("and", "or"):
            args = [self.bool_(sub) for _ in range(self.draw(st.integers(2, 3)))]
            return f"({f' {kind} '.join(args)})"
        if kind == "not":
            return f"(not {self.bool_(sub)})"
        if kind == "compare":
            return self.compare(sub)
        if kind == "chain":
            a, b, c = self.int_(sub), self.int_(sub), self.int_(sub)
            return f"({a} {self.one(('<', '<='))} {b} {self.one(('<', '<=', '=='))} {c})"
        if kind == "booleq":
            return f"({self.bool_(sub)} {self.one(('==', '!='))} {self.bool_(sub)})"
        if kind == "where":
            return f"where({self.bool_(sub)}, {self.bool_(sub)}, {self.bool_(sub)})"
        if kind == "load":
            return self.load(BOOL, sub) or self.bool_leaf()
        if kind == "fn":
            return self.call(BOOL, sub) or self.bool_leaf()
        if kind == "reduce":
            return self.reduction(BOOL, sub)
        if not self.scope.float_compare:
            return self.compare(sub)
        return f"({self.float_(sub)} {self.one(COMPARISONS)} {self.float_(sub)})"

    def reduction(self, type_: str, depth: int) -> str:
        """A bounded reduction: `any` / `all` of bools, `sum` / `max` / `min` of numbers, over a range
        with constant bounds (unrolled when short, a loop past `UNROLL_LIMIT` terms) or a parameter
        bound (a loop when the parameter is runtime; the range may be empty). A float max / min is of a
        range never empty (its empty value is an infinity, which a score must not become), and an
        int sum's terms are clamped to [-50, 50], so that no int leaves int64 however long the range."""
        var = f"ri{self.scope.reductions}"
        self.scope.reductions += 1
        kind = self.one(("any", "all") if type_ == BOOL else ("sum", "max", "min"))
        # A parameter clamped: a runtime one may be given any value up to 2**30 at a call, which would be
        # that many steps of the kernel's loop.
        params = [
            f"clamp({n}, -4, 24)"
            for n in self.scope.names[INT]
            if n == "w" or (n[0] == "p" and n[1:].isdigit())
        ]
        lo = self.one(("0", "1", "(-2)"))
        hi = self.one(("3", "0", "20", *params))
        if type_ == FLOAT and kind != "sum":  # never empty: lo + 1 .. lo + |hi| + 2
            hi = f"{lo} + abs({hi}) + 1"
        self.scope.names[INT].append(var)
        try:
            term = None
            if self.draw(st.integers(0, 2)) == 0:  # over an input's axis: `t[h, ri0]`
                term = self.load_along(type_, var)
            term = term or self.value(type_, depth)
        finally:
            self.scope.names[INT].remove(var)
        if type_ == INT and kind == "sum":
            term = f"clamp({term}, -50, 50)"
        return f"{kind}({var} in {lo}..{hi}: {term})"

    def compare(self, depth: int) -> str:
        return f"({self.int_(depth)} {self.one(COMPARISONS)} {self.int_(depth)})"

    def form(self) -> str:
        form = self.one(FORMS).replace("{}", str(self.small(1, 5)))
        return f"({form} {self.one(COMPARISONS)} {lit(self.small(-2, 12))})"

    def pattern_ref(self) -> str:
        local = self.scope.patterns
        if local and self.draw(st.booleans()):
            name, params, fixed = self.one(local)
            if not params:
                return name

            def argument() -> str:
                return lit(self.small()) if fixed else self.int_(1)

            if self.draw(st.booleans()):
                return f"{name}({', '.join(argument() for _ in params)})"
            return f"{name}({', '.join(f'{p}={argument()}' for p in params)})"
        call = self.one(STDLIB_CALLS)
        while "{}" in call:
            call = call.replace("{}", str(self.small(1, 9)), 1)
        return call

    # ---- loads and calls ----------------------------------------------------------------------------

    def load(self, type_: str, depth: int) -> str | None:
        inputs = [i for i in self.scope.inputs if i.type == type_]
        if not inputs or not self.scope.grid:
            return None
        chosen = self.one(inputs)
        indices = []
        for dim in chosen.dims:
            kind = self.draw(st.integers(0, 4)) if depth >= 0 else 4  # depth < 0: natural indices only
            if kind == 0:
                indices.append(self.int_(depth))  # anywhere, also outside the shape
            elif kind <= 2 and any(i.type == INT for i in self.scope.inputs):
                indices.append(self.load(INT, -1) or DIMS[dim])  # data-dependent, as t[doc[kv]]
            else:
                indices.append(DIMS[dim])
        return f"{chosen.name}[{', '.join(indices)}]"

    def load_along(self, type_: str, var: str) -> str | None:
        """A load of an input at its natural indices but the last, which is `var` (a reduction's
        variable): a sum over a table's row, `t[h, ri0]`."""
        inputs = [i for i in self.scope.inputs if i.type == type_ and i.dims]
        if not inputs or not self.scope.grid:
            return None
        chosen = self.one(inputs)
        indices = [DIMS[dim] for dim in chosen.dims[:-1]] + [var]
        return f"{chosen.name}[{', '.join(indices)}]"

    def call(self, type_: str, depth: int) -> str | None:
        fns = [f for f in self.scope.fns if f.result == type_]
        if not fns:
            return None
        fn = self.one(fns)
        args: list[str] = []
        keyword = False  # once an argument goes by keyword (or one is skipped), the rest do too
        for name, ptype, default in fn.params:
            if default is not None and self.draw(st.booleans()):
                keyword = True  # left at its default
                continue
            value = self.value(ptype, depth)
            keyword = keyword or self.draw(st.integers(0, 3)) == 0
            args.append(f"{name}={value}" if keyword else value)
        return f"{fn.name}({', '.join(args)})"

    def value(self, type_: str, depth: int) -> str:
        if type_ == INT:
            return self.int_(depth)
        if type_ == FLOAT:
            return self.float_(depth)
        return self.bool_(depth)


# ---- declarations -----------------------------------------------------------------------------------


def _param_value(draw: st.DrawFn, type_: str) -> int | float | bool:
    """A parameter's value (or default): small ints, inside a runtime int's [-2**30, 2**30]."""
    if type_ == INT:
        return draw(st.integers(-2, 12))
    if type_ == FLOAT:
        return draw(st.sampled_from((0.5, -1.25, 2.0, 0.0)))
    return draw(st.booleans())


def _literal(value: int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if value >= 0 else f"-{-value}"


# A reduction whose range reads `w`: `any(ri0 in 0..clamp(w, -4, 24): ...)`.
_BOUNDED_BY_W = re.compile(r"\bin [^:]*\bw\b[^:]*:")


def _static(draw: st.DrawFn) -> str:
    """`static ` before a pattern parameter, one time in three (runtime, the default, shrinks first)."""
    return "static " if draw(st.integers(0, 2)) == 2 else ""


@st.composite
def _fn(draw: st.DrawFn, index: int, earlier: list[Fn]) -> tuple[str, Fn]:
    count = draw(st.integers(1, 3))
    params = []
    for i in range(count):
        type_ = draw(st.sampled_from((INT, FLOAT, BOOL)))
        default = _literal(_param_value(draw, type_)) if i == count - 1 and draw(st.booleans()) else None
        params.append((f"x{i}", type_, default))
    scope = Scope(fns=list(earlier), grid=draw(st.integers(0, 3)) != 0)
    for name, type_, _ in params:
        scope.names[type_].append(name)
    result = draw(st.sampled_from((BOOL, INT, FLOAT)))
    body = _Draw(draw, scope).value(result, 2)
    header = ", ".join(f"{n}: {t}" + (f" = {d}" if d is not None else "") for n, t, d in params)
    fn = Fn(f"f{index}", tuple(params), result)
    return f"fn {fn.name}({header}) = {body}", fn


@st.composite
def _input(draw: st.DrawFn, index: int) -> Input:
    rank = draw(st.integers(1, 3))
    # A 0-d input (read as t[]) one time in twelve: a scalar is read at no index, and the indexed reads
    # are what exercise positions.
    if rank == 1 and draw(st.integers(0, 3)) == 3:
        rank = 0
    dims = tuple(draw(st.sampled_from(tuple(DIMS))) for _ in range(rank))
    return Input(f"t{index}", draw(st.sampled_from(DTYPES)), dims)


@st.composite
def programs(draw: st.DrawFn, max_depth: int = 3) -> Program:
    """A random well-typed `.attn` program (see the module docstring)."""
    lines: list[str] = []
    fns: list[Fn] = []
    for i in range(draw(st.integers(0, 2))):
        text, fn = draw(_fn(i, fns))
        lines.append(text)
        fns.append(fn)
    helpers: list[tuple[str, tuple[str, ...], bool]] = []
    if draw(st.integers(0, 2)) == 2:  # a helper pattern (none shrinks first)
        params = ("w",) if draw(st.booleans()) else ()
        scope = Scope(fns=list(fns), names={INT: list(params), FLOAT: [], BOOL: []})
        mask = _Draw(draw, scope).bool_(2)
        header = f"({_static(draw)}w: int)" if params else ""
        lines.append(f"pattern aux{header} {{\n    mask = {mask}\n}}")
        helpers.append(("aux", params, bool(_BOUNDED_BY_W.search(mask))))

    scope = Scope(fns=list(fns), patterns=helpers)
    params: dict[str, int | float | bool] = {}
    header = []
    for i in range(draw(st.integers(0, 3))):
        type_ = draw(st.sampled_from((INT, FLOAT, BOOL)))
        name = f"p{i}"
        static = _static(draw)
        default = _param_value(draw, type_) if draw(st.booleans()) else None
        header.append(f"{static}{name}: {type_}" + (f" = {_literal(default)}" if default is not None else ""))
        if default is None or draw(st.booleans()):
            params[name] = _param_value(draw, type_)
        scope.names[type_].append(name)
    body = []
    for i in range(draw(st.integers(0, 3))):
        decl = draw(_input(i))
        scope.inputs.append(decl)
        body.append(f"input {decl.name}: {decl.dtype}[{', '.join(decl.dims)}]")
    exprs = _Draw(draw, scope)
    for i in range(draw(st.integers(0, 2))):
        type_ = draw(st.sampled_from((INT, BOOL, FLOAT)))
        body.append(f"let v{i} = {exprs.value(type_, max_depth - 1)}")
        scope.names[type_].append(f"v{i}")
    statements = []
    if draw(st.integers(0, 4)) != 0:
        scope.float_compare = True
        statements.append(f"mask = {exprs.bool_(max_depth)}")
        scope.float_compare = False
    if draw(st.booleans()):
        scope.score = True
        score = exprs.float_(max_depth)
        if draw(st.integers(0, 3)) == 3:  # keys dropped by the score: -inf, never used in arithmetic
            score = f"where({exprs.bool_(1)}, {score}, -inf)"
        statements.append(f"score = {score}")
        scope.score = False
    if draw(st.booleans()):
        statements.reverse()
    body += statements
    params_text = f"({', '.join(header)})" if header else ""
    lines.append(f"pattern main{params_text} {{\n" + "".join(f"    {s}\n" for s in body) + "}")
    return Program("\n\n".join(lines) + "\n", "main", params)


# ---- front-end stress: DAG-heavy programs, odd names, imports ----------------------------------------

# Names that are Python keywords or builtins, keywords of the Python API (`attnc.reserved`), locals of
# the kernel templates, and a very long one: legal or not in each role, they must never get past the
# front end unreported, nor reach generated code unescaped.
ODD_NAMES = (
    "x", "def", "class", "lambda", "None", "True", "return", "yield", "__import__", "__init__", "self",
    "scale", "return_lse", "batch", "num_heads", "q_len", "kv_len", "block", "device", "precision",
    "out_dtype", "inputs", "k", "v", "q", "kv", "s", "inf", "exp", "causal", "q_idx", "kv_idx", "tl",
    "triton", "LOG2E", "acc", "m_i", "BLOCK_M", "Out", "x_grad", "in_x_ptr", "t0", "_", "_0", "a" * 300,
)  # fmt: skip
# The roles a name can take; `{n}` is the name.
NAME_ROLES = (
    "fn {n}(a: int) = a + 1\npattern main {{ mask = {n}(q) > kv }}",
    "fn f({n}: int) = {n} + 1\npattern main {{ mask = f(q) > kv }}",
    "pattern {n} {{ mask = kv <= q }}",
    "pattern main({n}: int = 3) {{ mask = kv <= q + {n} }}",
    "pattern main {{\n    let {n} = q - kv\n    mask = {n} >= 0\n}}",
    "pattern main {{\n    input {n}: int32[KV_LEN]\n    mask = {n}[kv] <= q\n}}",
    "pattern main {{\n    input {n}: float32[KV_LEN]\n    score = s + {n}[kv]\n}}",
    "pattern main {{ mask = f({n}=1) }}\nfn f({n}: int) = kv <= q + {n}",
)


@st.composite
def odd_name_sources(draw: st.DrawFn) -> str:
    """A small program with an odd name in one role."""
    return draw(st.sampled_from(NAME_ROLES)).format(n=draw(st.sampled_from(ODD_NAMES)))


@st.composite
def dag_heavy_sources(draw: st.DrawFn) -> str:
    """Programs whose expression trees are exponentially larger than their DAGs or their text (lets or
    fns each using the previous twice), long flat chains, and nesting at the front end's limits."""
    kind = draw(st.integers(0, 5))
    n = draw(st.integers(1, 24))
    op = draw(st.sampled_from(("+", "*", "-", "%")))
    if kind == 0:
        lets = "".join(f"    let a{i + 1} = a{i} {op} a{i} % 1000003\n" for i in range(n))
        return f"pattern main {{\n    let a0 = q - kv\n{lets}    mask = a{n} >= 0\n}}\n"
    if kind == 1:
        fns = "".join(f"fn f{i + 1}(x: int) = f{i}(x) {op} f{i}(x + 1)\n" for i in range(n))
        return f"fn f0(x: int) = x % 3\n{fns}pattern main {{ mask = f{n}(q) > kv }}\n"
    if kind == 2:
        patterns = "".join(f"pattern p{i + 1} {{ mask = p{i} or (p{i} and kv < {i}) }}\n" for i in range(n))
        return f"pattern p0 {{ mask = kv <= q }}\n{patterns}"
    if kind == 3:
        terms = draw(st.integers(1, 3000))
        chain = "".join(f" {draw(st.sampled_from(('+', '-')))} {i % 7}" for i in range(terms))
        return f"pattern main {{ mask = kv <= q{chain} }}\n"
    if kind == 4:
        depth = draw(st.integers(390, 410))
        return f"pattern main {{ mask = kv <= {'(' * depth}q{')' * depth} }}\n"
    score = "s"
    for i in range(n):
        score = f"tanh({score} {op} {i}.5)" if op != "%" else f"abs({score} - {i}.5)"
    return f"pattern main {{ score = {score} }}\n"


# The files the import fuzzer's directory holds (see `attnc.testing.fuzz.import_fixtures`), and paths
# naming them and other things an import may name.
IMPORT_TARGETS = (
    "lib.attn", "sub/lib.attn", "stdlib.attn", "main.attn", "bad.attn", "fifo.attn", "loop1.attn",
    "dangling.attn", "dir.attn", "zero.attn", "environ.attn", "odd.attn", "big.attn", "latin1.attn",
    "sp ace.attn", "é.attn", "x\x1b[31m.attn", "missing.attn", "lib", "", "/dev/zero", "/dev/urandom",
    "/proc/self/environ", "/etc/passwd", "../lib.attn", "./lib.attn", "sub/../lib.attn", "sub",
    ".attn", "/", "a" * 300 + ".attn",
)  # fmt: skip


@st.composite
def import_sources(draw: st.DrawFn) -> str:
    """A program importing some of `IMPORT_TARGETS` and using what `lib.attn` defines."""
    targets = draw(st.lists(st.sampled_from(IMPORT_TARGETS), min_size=1, max_size=3))
    imports = "".join(f'import "{t}"\n' for t in targets)
    body = draw(
        st.sampled_from(
            ("pattern main { mask = lib_p and helper(q) > kv }", "pattern main { mask = causal }")
        )
    )
    return imports + body + "\n"


# ---- shapes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Sizes of one call: q [batch, heads, q_len, dim], k [batch, kv_heads, kv_len, dim], v likewise
    with dim_v."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    dim: int
    dim_v: int
    dtype: str

    def as_list(self) -> list[int | str]:
        return [
            self.batch, self.heads, self.kv_heads, self.q_len, self.kv_len, self.dim, self.dim_v, self.dtype
        ]  # fmt: skip


HEAD_DIMS = (16, 24, 32, 20, 64, 40)


@st.composite
def shapes(draw: st.DrawFn, max_len: int = 80) -> Shape:
    """Sizes small enough for Triton's interpreter: lengths that are rarely tile multiples,
    Q_LEN != KV_LEN, GQA groups, head dims that are not powers of two, every dtype."""
    heads = draw(st.sampled_from((1, 2, 4, 3)))
    group = draw(st.sampled_from([g for g in (1, 2, 3, 4) if heads % g == 0]))
    q_len = draw(st.integers(1, max_len))
    kv_len = q_len if draw(st.booleans()) else draw(st.integers(1, max_len))
    dim = draw(st.sampled_from(HEAD_DIMS))
    dim_v = dim if draw(st.booleans()) else draw(st.sampled_from(HEAD_DIMS))
    dtype = draw(st.sampled_from(("float32", "float16", "bfloat16")))
    return Shape(draw(st.integers(1, 2)), heads, heads // group, q_len, kv_len, dim, dim_v, dtype)
