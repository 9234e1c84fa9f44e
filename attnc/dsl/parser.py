"""Parse `.attn` text into the syntax tree of `attnc.dsl.ast`; lark's errors become `AttnSyntaxError`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from lark.lexer import PatternStr

from attnc.dsl import ast
from attnc.errors import AttnError, AttnSyntaxError, Loc, SourceFile
from attnc.ir.nodes import MAX_NESTING


class _NewlinesInBrackets:
    """Post-lexer: drops line ends inside `(...)` and `[...]` and merges runs of them elsewhere."""

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        pending_newline: Token | None = None
        for token in stream:
            if token.type == "_NL":
                if depth == 0 and pending_newline is None:
                    pending_newline = token
                continue
            if pending_newline is not None:
                yield pending_newline
                pending_newline = None
            if token.value in ("(", "["):
                depth += 1
            elif token.value in (")", "]") and depth > 0:
                depth -= 1
            yield token
        if pending_newline is not None:
            yield pending_newline


@cache
def _lark() -> Lark:
    grammar = (Path(__file__).resolve().parents[1] / "grammar" / "attn.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        lexer="basic",
        postlex=_NewlinesInBrackets(),
        propagate_positions=True,
        maybe_placeholders=False,
    )


def _token_loc(file: SourceFile, token: Token) -> Loc:
    end = token.end_column if token.end_line == token.line else None
    return Loc(file, token.line, token.column, end)


_READABLE = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": 'a "path"',
    "COMPARE": "a comparison",
    "MUL_OP": "an operator",
    "SHIFT_OP": "a shift",
    "_NL": "end of line",
    "$END": "end of file",
}


def _describe_terminal(name: str) -> str:
    if name in _READABLE:
        return _READABLE[name]
    for terminal in _lark().terminals:
        if terminal.name == name and isinstance(terminal.pattern, PatternStr):
            return f"'{terminal.pattern.value}'"
    return name.lower()


_EXPRESSION_START = {"NAME", "INT", "FLOAT", "LPAR", "MINUS", "TRUE", "FALSE", "NOT"}


def _expected(names: set[str]) -> str:
    described = []
    if {"NAME", "INT", "LPAR"} <= names:
        described.append("an expression")
        names = names - _EXPRESSION_START
    described = sorted({*described, *(_describe_terminal(n) for n in names)})
    if len(described) == 1:
        return described[0]
    if len(described) > 8:
        described = [*described[:8], "..."]
    return "one of " + ", ".join(described)


def _describe_token(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "_NL":
        return "end of line"
    return f"'{token.value}'"


def _syntax_error(file: SourceFile, err: UnexpectedInput) -> AttnSyntaxError:
    if isinstance(err, UnexpectedToken):
        token = err.token
        if token.type == "$END":
            lines = file.text.splitlines() or [""]
            loc = Loc(file, len(lines), len(lines[-1]) + 1)
        else:
            loc = _token_loc(file, token)
        expected = set(err.expected)
        if err.interactive_parser is not None:
            expected = set(err.interactive_parser.accepts()) or expected
        reason = f"unexpected {_describe_token(token)}, expected {_expected(expected)}"
        if token.type == "_NL" and token.line is not None:
            line = file.line(token.line)
            loc = Loc(file, token.line, len(line) + 1)
        return AttnSyntaxError(reason, loc)
    if isinstance(err, UnexpectedCharacters):
        char = file.text[err.pos_in_stream] if err.pos_in_stream < len(file.text) else ""
        shown = char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        return AttnSyntaxError(f"unexpected character '{shown}'", Loc(file, err.line, err.column))
    if isinstance(err, UnexpectedEOF):
        lines = file.text.splitlines() or [""]
        loc = Loc(file, len(lines), len(lines[-1]) + 1)
        return AttnSyntaxError(f"unexpected end of file, expected {_expected(set(err.expected))}", loc)
    return AttnSyntaxError(str(err), Loc(file, getattr(err, "line", 1), getattr(err, "column", 1)))


class _ToAst(Transformer_NonRecursive):
    """Builds `attnc.dsl.ast` nodes from lark's tree; node classes are named after grammar rules."""

    def __init__(self, file: SourceFile) -> None:
        super().__init__()
        self.file = file

    def _loc(self, meta) -> Loc:
        end = meta.end_column if meta.end_line == meta.line else None
        return Loc(self.file, meta.line, meta.column, end)

    def _tok(self, token: Token) -> Loc:
        return _token_loc(self.file, token)

    @v_args(meta=True)
    def start(self, meta, children) -> ast.Module:
        return ast.Module(self.file, tuple(children))

    @v_args(meta=True)
    def import_decl(self, meta, children) -> ast.ImportDecl:
        return ast.ImportDecl(str(children[0])[1:-1], self._loc(meta))

    @v_args(meta=True)
    def fn_decl(self, meta, children) -> ast.FnDecl:
        name, *params, body = children
        return ast.FnDecl(str(name), tuple(params), body, self._tok(name))

    @v_args(meta=True)
    def pattern_decl(self, meta, children) -> ast.PatternDecl:
        name, *rest = children
        params = tuple(c for c in rest if isinstance(c, ast.Param))
        stmts = tuple(c for c in rest if not isinstance(c, ast.Param))
        return ast.PatternDecl(str(name), params, stmts, self._tok(name))

    @v_args(meta=True)
    def param(self, meta, children) -> ast.Param:
        name, type_name, *default = children
        return ast.Param(
            str(name), str(type_name), default[0] if default else None, self._tok(name), self._tok(type_name)
        )

    @v_args(meta=True)
    def modified_param(self, meta, children) -> ast.Param:
        # `static` is a word only here (no keyword), so it stays usable as a name everywhere else.
        modifier, name, type_name, *default = children
        if str(modifier) != "static":
            raise AttnSyntaxError(
                f"unexpected '{modifier}' before parameter '{name}'; the only modifier is 'static'",
                self._tok(modifier),
            )
        return ast.Param(
            str(name),
            str(type_name),
            default[0] if default else None,
            self._tok(name),
            self._tok(type_name),
            self._tok(modifier),
        )

    @v_args(meta=True)
    def input_stmt(self, meta, children) -> ast.InputStmt:
        name, dtype, *dims = children
        return ast.InputStmt(str(name), str(dtype), tuple(dims), self._tok(name), self._tok(dtype))

    @v_args(meta=True)
    def let_stmt(self, meta, children) -> ast.LetStmt:
        return ast.LetStmt(str(children[0]), children[1], self._tok(children[0]))

    @v_args(meta=True)
    def mask_stmt(self, meta, children) -> ast.MaskStmt:
        return ast.MaskStmt(children[0], self._loc(meta))

    @v_args(meta=True)
    def score_stmt(self, meta, children) -> ast.ScoreStmt:
        return ast.ScoreStmt(children[0], self._loc(meta))

    @v_args(meta=True)
    def or_expr(self, meta, children) -> ast.Expr:
        if len(children) == 1:
            return children[0]
        return ast.BoolOp(self._loc(meta), "or", tuple(children))

    @v_args(meta=True)
    def and_expr(self, meta, children) -> ast.Expr:
        if len(children) == 1:
            return children[0]
        return ast.BoolOp(self._loc(meta), "and", tuple(children))

    @v_args(meta=True)
    def not_expr(self, meta, children) -> ast.Not:
        return ast.Not(self._loc(meta), children[1])

    @v_args(meta=True)
    def comparison(self, meta, children) -> ast.Compare:
        operands = tuple(children[0::2])
        tokens = children[1::2]
        return ast.Compare(
            self._loc(meta), operands, tuple(str(t) for t in tokens), tuple(map(self._tok, tokens))
        )

    def _fold(self, children) -> ast.Expr:
        # Left-associative: a - b + c == (a - b) + c.
        result = children[0]
        for token, right in zip(children[1::2], children[2::2], strict=True):
            loc = Loc(
                self.file,
                result.loc.line,
                result.loc.col,
                right.loc.end_col if right.loc.line == result.loc.line else None,
            )
            result = ast.BinOp(loc, str(token), result, right, self._tok(token))
        return result

    def sum(self, children) -> ast.Expr:
        return self._fold(children)

    def product(self, children) -> ast.Expr:
        return self._fold(children)

    def bit_or(self, children) -> ast.Expr:
        return self._fold(children)

    def bit_xor(self, children) -> ast.Expr:
        return self._fold(children)

    def bit_and(self, children) -> ast.Expr:
        return self._fold(children)

    def shift(self, children) -> ast.Expr:
        return self._fold(children)

    @v_args(meta=True)
    def neg(self, meta, children) -> ast.Neg:
        return ast.Neg(self._loc(meta), children[1])

    @v_args(meta=True)
    def call(self, meta, children) -> ast.Call:
        name, *args = children
        for before, after in itertools.pairwise(args):
            if isinstance(before, ast.KeywordArg) and not isinstance(after, ast.KeywordArg):
                raise AttnSyntaxError("a positional argument cannot follow a keyword argument", after.loc)
        positional = tuple(a for a in args if not isinstance(a, ast.KeywordArg))
        keywords = tuple(a for a in args if isinstance(a, ast.KeywordArg))
        return ast.Call(self._loc(meta), str(name), self._tok(name), positional, keywords)

    @v_args(meta=True)
    def reduction(self, meta, children) -> ast.Reduce:
        kind, var, keyword, lo, _dots, hi, body = children
        if str(keyword) != "in":
            raise AttnSyntaxError(f"unexpected '{keyword}', expected 'in'", self._tok(keyword))
        return ast.Reduce(self._loc(meta), str(kind), self._tok(kind), str(var), self._tok(var), lo, hi, body)

    def arg(self, children) -> ast.Expr:
        return children[0]

    def keyword_arg(self, children) -> ast.KeywordArg:
        return ast.KeywordArg(str(children[0]), children[1], self._tok(children[0]))

    @v_args(meta=True)
    def index(self, meta, children) -> ast.Index:
        name, *indices = children
        return ast.Index(self._loc(meta), str(name), self._tok(name), tuple(indices))

    def name(self, children) -> ast.Name:
        return ast.Name(self._tok(children[0]), str(children[0]))

    def int_lit(self, children) -> ast.IntLit:
        text = str(children[0])
        return ast.IntLit(self._tok(children[0]), int(text, 16) if text[:2] in ("0x", "0X") else int(text))

    def float_lit(self, children) -> ast.FloatLit:
        return ast.FloatLit(self._tok(children[0]), float(children[0]))

    def true_lit(self, children) -> ast.BoolLit:
        return ast.BoolLit(self._tok(children[0]), True)

    def false_lit(self, children) -> ast.BoolLit:
        return ast.BoolLit(self._tok(children[0]), False)


def parse(text: str, filename: str = "<string>") -> ast.Module:
    """Parse one `.attn` file into its syntax tree."""
    file = SourceFile(filename, text)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(file, err) from None
    try:
        module = _ToAst(file).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, AttnError):
            raise err.orig_exc from None
        raise
    _check_nesting(module)
    return module


def _check_nesting(module: ast.Module) -> None:
    """Expressions nested deeper than MAX_NESTING are an error, not a crash of the recursive passes.

    Nesting is what the front end recurses on: parentheses, unary operators, calls, indices, and the
    operands of comparisons and `and`/`or`. A chain of binary operators (`a + b - c + ...`, left-folded
    into a spine of `BinOp`s) is one level however long: it is lowered by a loop."""
    for decl in module.decls:
        if isinstance(decl, ast.ImportDecl):
            continue
        stack = [(expr, 1) for expr in ast.decl_exprs(decl)]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_NESTING:
                raise AttnSyntaxError(f"expression nested more than {MAX_NESTING} levels deep", node.loc)
            if isinstance(node, ast.BinOp):
                stack.append((node.left, depth if isinstance(node.left, ast.BinOp) else depth + 1))
                stack.append((node.right, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in ast.children(node))
