"""Read the textual IR written by `ir.printer` back into nodes (the round-trip of the golden tests)."""

from __future__ import annotations

import math
import re

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

_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?(?:inf|nan|\d+\.\d*(?:e[-+]?\d+)?|\d+e[-+]?\d+|\d+))(?![\w.])"
    r"|(?P<ssa>%\d+)|(?P<ref>\$\w+)|(?P<sym>@[\w.:]+)|(?P<name>[A-Za-z_][\w.]*)|(?P<punct>->|[()\[\]{},:=]))"
)


_SYMBOL_OPS = (Op.LOAD, Op.CALL, Op.PATTERN, Op.RANGE_MIN, Op.RANGE_MAX)


class IRParseError(InternalError):
    """IR text that the printer could not have written."""


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
        return IRParseError(f"IR line {self.number}: {reason}: {self.text!r}")

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
            line.take(value=":")
            type_ = Type(line.take("name"))
            default = None
            if line.peek() == "=":
                line.take()
                default = const(_parse_const(line.take()))
                if type_ is Type.FLOAT:
                    default = const(float(default.attr))  # type: ignore[arg-type]
            params.append(ParamDecl(name, type_, default))
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
        else:
            line.take(value="(")
            params = self.params(line, ")")
        line.take(value="{")
        scope = _Scope(self, {p.name: p.type for p in params})
        inputs: list[InputDecl] = []
        lets: list[tuple[str, Node]] = []
        mask = score = None
        derived: list[tuple[str, Node]] = []
        sparsity = None
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
            elif word == "derive":
                body.take()
                derived_name = body.take("name")
                body.take(value="=")
                derived.append((derived_name, scope.operand(body)))
            elif word == "sparsity":
                body.take()
                sparsity = body.text.split("sparsity", 1)[1].strip()
            elif word in ("mask", "score"):
                body.take()
                body.take(value="=")
                if word == "mask":
                    mask = scope.operand(body)
                else:
                    score = scope.operand(body)
            else:
                scope.definition(body)
        return PatternIR(
            name, params, tuple(inputs), tuple(lets), mask, score, bindings, None, tuple(derived), sparsity
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
    return _ModuleParser(text).module()
