"""Read the textual IR written by `ir.printer` back into nodes (the round-trip of the golden tests)."""

from __future__ import annotations

import math
import re
from typing import Any

from attnc.errors import InternalError
from attnc.ir.nodes import (
    INDEX_VARS,
    INPUT_DTYPES,
    OPS,
    SIZES,
    TILE_VARS,
    FnIR,
    InputDecl,
    ModuleIR,
    Node,
    Op,
    ParamDecl,
    PatternIR,
    Type,
    const,
)
from attnc.ir.results import (
    RANGE_AXES,
    AxisRange,
    KernelValues,
    Ranges,
    ScoreGradient,
    Sparsity,
    TileClasses,
)

_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?(?:inf|nan|\d+\.\d*(?:e[-+]?\d+)?|\d+e[-+]?\d+|\d+))(?![\w.])"
    r"|(?P<ssa>%\d+)|(?P<ref>\$\w+)|(?P<param>!\w+)|(?P<sym>@[\w.:]+)|(?P<name>[A-Za-z_][\w.]*)|(?P<punct>->|[()\[\]{},:=]))"
)


_SYMBOL_OPS = (Op.LOAD, Op.CALL, Op.PATTERN, Op.RANGE_MIN, Op.RANGE_MAX, Op.BOUND, Op.REDUCE)


class IRParseError(InternalError):
    """IR text that the printer could not have written: `reason`, at IR line `line` (1-based) if known."""

    def __init__(self, reason: str, line: int | None = None, text: str | None = None) -> None:
        self.reason, self.line = reason, line
        where = "" if line is None else f"IR line {line}: "
        super().__init__(where + reason + ("" if text is None else f": {text!r}"))


class _Line:
    """Tokens of one line, consumed left to right."""

    def __init__(self, text: str, number: int) -> None:
        self.text, self.number = text, number
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        stripped = text.rstrip()
        while pos < len(stripped):
            match = _TOKEN.match(stripped, pos)
            if match is None or match.end() == pos:
                raise self.error(f"unexpected text at column {pos + 1}")
            kind = match.lastgroup
            assert kind is not None
            self.tokens.append((kind, match.group(kind)))
            pos = match.end()
        self.pos = 0

    def error(self, reason: str) -> IRParseError:
        return IRParseError(reason, self.number, self.text)

    def peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def take(self, kind: str | None = None, value: str | None = None) -> str:
        if self.pos >= len(self.tokens):
            raise self.error("unexpected end of line")
        got_kind, got = self.tokens[self.pos]
        if (kind is not None and got_kind != kind) or (value is not None and got != value):
            raise self.error(f"expected {value or kind}, got {got!r}")
        self.pos += 1
        return got

    def done(self) -> bool:
        return self.pos >= len(self.tokens)


def _parse_const(text: str) -> int | float | bool:
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text.lstrip("-") == "nan":
        return math.nan
    return float(text)


class _Scope:
    """What `$name`, `%N` and `@symbol` mean inside one fn or pattern."""

    def __init__(self, module: _ModuleParser, refs: dict[str, Type]) -> None:
        self.module = module
        self.refs = dict(refs)
        self.values: dict[str, Node] = {}
        self.inputs: dict[str, Type] = {}
        self.params: dict[str, Type] = {}  # the runtime parameters of a bound pattern (`!name`)

    def operand(self, line: _Line) -> Node:
        kind = line.tokens[line.pos][0] if not line.done() else None
        text = line.take()
        if kind == "ssa":
            if text not in self.values:
                raise line.error(f"{text} used before it is defined")
            return self.values[text]
        if kind == "ref":
            name = text[1:]
            if name not in self.refs:
                raise line.error(f"unknown name {text}")
            return Node(Op.REF, self.refs[name], (), name)
        if kind == "param":
            name = text[1:]
            if name not in self.params:
                raise line.error(f"{text} is not a runtime parameter of the pattern")
            return Node(Op.PARAM, self.params[name], (), name)
        if kind == "num" or text in ("true", "false"):
            return const(_parse_const(text))
        if text in INDEX_VARS or text in TILE_VARS:
            return Node(Op.VAR, Type.INT, (), text)
        if text in SIZES:
            return Node(Op.SIZE, Type.INT, (), text)
        if text == "s":
            return Node(Op.SCORE, Type.FLOAT)
        raise line.error(f"bad operand {text!r}")

    def definition(self, line: _Line) -> None:
        target = line.take("ssa")
        line.take(value="=")
        op = Op(line.take("name"))
        symbol = line.take("sym")[1:] if op in _SYMBOL_OPS else None
        line.take(value="(")
        args: list[Node] = []
        while line.peek() != ")":
            args.append(self.operand(line))
            if line.peek() == ",":
                line.take()
        line.take(value=")")
        line.take(value=":")
        type_ = Type(line.take("name"))
        if OPS[op].rule is None and op not in _SYMBOL_OPS:
            raise line.error(f"{op} is written inline, not defined")
        self.values[target] = Node(op, type_, tuple(args), symbol)


def _once(line: _Line, keyword: str, seen: set[str]) -> None:
    """A located error at a second line of a kind a pattern has at most one of (the printer writes one):
    read on, it would silently replace the first."""
    if keyword in seen:
        raise line.error(f"a second '{keyword}' line in one pattern")
    seen.add(keyword)


class _Results:
    """The lines of the analyses' typed results in one pattern (`ir/results.py` shows them), gathered
    into the `PatternIR` fields they stand for."""

    KEYWORDS = ("tiles", "ranges", "range", "kernel", "sparsity")

    def __init__(self, scope: _Scope) -> None:
        self.scope = scope
        self.tiles: TileClasses | None = None
        self.conjuncts: int | None = None
        self.ranges: dict[str, list[AxisRange]] = {axis: [] for axis in RANGE_AXES}
        self.kernel: tuple[Node | None, ...] | None = None
        self.gradients: list[ScoreGradient] = []
        self.sparsity: Sparsity | None = None
        self.last: _Line | None = None
        self.seen: set[str] = set()  # the lines a pattern has at most one of, read so far

    def values(self, line: _Line, names: tuple[str, ...], optional: bool = False) -> list[Node | None]:
        """`name = operand` for each of the names, in order, comma-separated, ending the line; with
        `optional`, an operand may be `none` (an absent value)."""
        values: list[Node | None] = []
        for i, name in enumerate(names):
            if i:
                line.take(value=",")
            line.take(value=name)
            line.take(value="=")
            if optional and line.peek() == "none":
                line.take()
                values.append(None)
            else:
                values.append(self.scope.operand(line))
        if not line.done():
            raise line.error(f"unexpected {line.peek()!r}")
        return values

    def index(self, line: _Line, expected: int) -> None:
        """`K:` where K must be the next index of its kind."""
        if line.take("num") != str(expected):
            raise line.error(f"expected index {expected}")
        line.take(value=":")

    def line(self, line: _Line) -> None:
        self.last = line
        keyword = line.take("name")
        if keyword in ("tiles", "ranges", "sparsity") or (keyword == "kernel" and line.peek() != "grad"):
            _once(line, keyword, self.seen)
        if keyword == "tiles":
            self.tiles = TileClasses(*self.values(line, TileClasses.PARTS))
        elif keyword == "ranges":
            line.take(value="conjuncts")
            line.take(value="=")
            self.conjuncts = int(line.take("num"))
            if not line.done():
                raise line.error(f"unexpected {line.peek()!r}")
        elif keyword == "range":
            axis = line.take("name")
            if axis not in self.ranges or self.conjuncts is None:
                raise line.error(f"a range {axis!r} outside 'ranges'")
            self.index(line, len(self.ranges[axis]))
            self.ranges[axis].append(AxisRange(*self.values(line, AxisRange.PARTS)))
        elif keyword == "kernel":
            name = line.peek()
            if name == "grad":
                line.take()
                self.index(line, len(self.gradients))
                self.gradients.append(ScoreGradient(*self.values(line, ("load", "value"))))
            else:
                self.kernel = tuple(self.values(line, ("mask", "score", "dscore"), optional=True))
        else:
            kind = line.take("name")
            axes = []
            if line.peek() == "[":
                line.take()
                while line.peek() != "]":
                    axes.append(line.take("name"))
                    if line.peek() == ",":
                        line.take()
                line.take(value="]")
            if not line.done():
                raise line.error(f"unexpected {line.peek()!r}")
            self.sparsity = Sparsity(kind, tuple(axes))  # type: ignore[arg-type]  # verify checks the kind

    def fields(self) -> dict[str, Any]:
        """The `PatternIR` fields of the lines read."""
        ranges = None
        if self.conjuncts is not None:
            if any(len(r) != self.conjuncts for r in self.ranges.values()):
                assert self.last is not None
                raise self.last.error(f"'ranges' announces {self.conjuncts} conjuncts per axis")
            ranges = Ranges(tuple(self.ranges["kv"]), tuple(self.ranges["q"]))
        kernel = None
        if self.kernel is not None:
            kernel = KernelValues(*self.kernel, gradients=tuple(self.gradients))
        elif self.gradients:
            assert self.last is not None
            raise self.last.error("kernel gradients without the kernel's values")
        return {"tiles": self.tiles, "ranges": ranges, "sparsity": self.sparsity, "kernel": kernel}


class _ModuleParser:
    def __init__(self, text: str) -> None:
        self.lines = [(i + 1, t) for i, t in enumerate(text.splitlines()) if t.strip()]
        self.pos = 0
        self.fns: list[FnIR] = []
        self.patterns: list[PatternIR] = []

    def next_line(self) -> _Line:
        number, text = self.lines[self.pos]
        self.pos += 1
        return _Line(text, number)

    def params(self, line: _Line, close: str) -> tuple[ParamDecl, ...]:
        params = []
        while line.peek() != close:
            name = line.take("name")
            static = name == "static" and line.peek() != ":"
            if static:
                name = line.take("name")
            line.take(value=":")
            type_ = Type(line.take("name"))
            default = None
            if line.peek() == "=":
                line.take()
                default = const(_parse_const(line.take()))
                if type_ is Type.FLOAT:
                    default = const(float(default.attr))  # type: ignore[arg-type]
            params.append(ParamDecl(name, type_, default, static=static or type_ is Type.BOOL))
            if line.peek() == ",":
                line.take()
        line.take(value=close)
        return tuple(params)

    def fn(self, line: _Line) -> FnIR:
        name = line.take("name")
        line.take(value="(")
        params = self.params(line, ")")
        line.take(value="->")
        line.take("name")
        line.take(value="{")
        scope = _Scope(self, {p.name: p.type for p in params})
        while True:
            body_line = self.next_line()
            if body_line.peek() == "return":
                body_line.take()
                body = scope.operand(body_line)
                break
            scope.definition(body_line)
        self.next_line().take(value="}")
        return FnIR(name, params, body)

    def pattern(self, line: _Line) -> PatternIR:
        name = line.take("name")
        params: tuple[ParamDecl, ...] = ()
        bindings = None
        if line.peek() == "[":
            line.take()
            bindings = []
            while line.peek() != "]":
                key = line.take("name")
                line.take(value="=")
                bindings.append((key, _parse_const(line.take())))
                if line.peek() == ",":
                    line.take()
            line.take(value="]")
            bindings = tuple(bindings)
            if line.peek() == "(":  # its runtime parameters
                line.take()
                params = self.params(line, ")")
        else:
            line.take(value="(")
            params = self.params(line, ")")
        line.take(value="{")
        scope = _Scope(self, {} if bindings is not None else {p.name: p.type for p in params})
        if bindings is not None:
            scope.params = {p.name: p.type for p in params}
        inputs: list[InputDecl] = []
        lets: list[tuple[str, Node]] = []
        mask = score = None
        results = _Results(scope)
        while True:
            body = self.next_line()
            word = body.peek()
            if word == "}":
                break
            if word == "input":
                body.take()
                input_name = body.take("name")
                body.take(value=":")
                dtype = body.take("name")
                if dtype not in INPUT_DTYPES:
                    raise body.error(f"unknown dtype {dtype}")
                body.take(value="[")
                dims = []
                while body.peek() != "]":
                    dims.append(scope.operand(body))
                    if body.peek() == ",":
                        body.take()
                inputs.append(InputDecl(input_name, dtype, tuple(dims)))
            elif word == "let":
                body.take()
                let_name = body.take("name")
                body.take(value="=")
                value = scope.operand(body)
                lets.append((let_name, value))
                scope.refs[let_name] = value.type
            elif word in _Results.KEYWORDS:
                results.line(body)
            elif word in ("mask", "score"):
                _once(body, word, results.seen)
                body.take()
                body.take(value="=")
                if word == "mask":
                    mask = scope.operand(body)
                else:
                    score = scope.operand(body)
            else:
                scope.definition(body)
        return PatternIR(
            name, params, tuple(inputs), tuple(lets), mask, score, bindings, None, **results.fields()
        )

    def module(self) -> ModuleIR:
        while self.pos < len(self.lines):
            line = self.next_line()
            keyword = line.take("name")
            if keyword == "fn":
                self.fns.append(self.fn(line))
            elif keyword == "pattern":
                self.patterns.append(self.pattern(line))
            else:
                raise line.error("expected 'fn' or 'pattern'")
        if not self.patterns:
            raise IRParseError("IR text has no pattern")
        return ModuleIR(tuple(self.fns), tuple(self.patterns))


def parse_module(text: str) -> ModuleIR:
    """Parse IR text (as printed by `print_module`) into a module."""
    parser = _ModuleParser(text)
    try:
        return parser.module()
    except (ValueError, IndexError) as err:
        # An op or type name the enums refuse, or text that ends inside a definition: located at the
        # line read last, as every other parse error is.
        number, line = parser.lines[parser.pos - 1] if parser.pos else (None, None)
        reason = "the text ends inside a definition" if isinstance(err, IndexError) else str(err)
        raise IRParseError(reason, number, line) from None
