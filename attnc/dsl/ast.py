"""Syntax-tree nodes, one class per grammar rule of `grammar/attn.lark`; every node keeps its location."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from attnc.errors import Loc, SourceFile


@dataclass(frozen=True)
class Expr:
    loc: Loc


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class IntLit(Expr):
    value: int


@dataclass(frozen=True)
class FloatLit(Expr):
    value: float


@dataclass(frozen=True)
class BoolLit(Expr):
    value: bool


@dataclass(frozen=True)
class Neg(Expr):
    operand: Expr


@dataclass(frozen=True)
class Not(Expr):
    operand: Expr


@dataclass(frozen=True)
class BinOp(Expr):
    """`+ - * / // %` and the bitwise `& | ^ << >>`; `op_loc` is the operator token."""

    op: str
    left: Expr
    right: Expr
    op_loc: Loc


@dataclass(frozen=True)
class BoolOp(Expr):
    """`and` / `or` over two or more operands."""

    op: str
    operands: tuple[Expr, ...]


@dataclass(frozen=True)
class Compare(Expr):
    """A comparison chain `a < b <= c`: operands[i] ops[i] operands[i + 1]."""

    operands: tuple[Expr, ...]
    ops: tuple[str, ...]
    op_locs: tuple[Loc, ...]


@dataclass(frozen=True)
class KeywordArg:
    name: str
    value: Expr
    loc: Loc


@dataclass(frozen=True)
class Call(Expr):
    func: str
    func_loc: Loc
    args: tuple[Expr, ...]
    kwargs: tuple[KeywordArg, ...]


@dataclass(frozen=True)
class Index(Expr):
    name: str
    name_loc: Loc
    indices: tuple[Expr, ...]


@dataclass(frozen=True)
class Reduce(Expr):
    """A bounded reduction `kind(var in lo..hi: body)`: `kind` one of sum, any, all, max, min; `var`
    takes lo, lo + 1, ..., hi - 1 (an empty range if hi <= lo)."""

    kind: str
    kind_loc: Loc
    var: str
    var_loc: Loc
    lo: Expr
    hi: Expr
    body: Expr


@dataclass(frozen=True)
class Param:
    name: str
    type_name: str
    default: Expr | None
    loc: Loc
    type_loc: Loc
    static_loc: Loc | None = None  # where `static` is written, if it is


@dataclass(frozen=True)
class InputStmt:
    name: str
    dtype: str
    dims: tuple[Expr, ...]
    loc: Loc
    dtype_loc: Loc


@dataclass(frozen=True)
class LetStmt:
    name: str
    value: Expr
    loc: Loc


@dataclass(frozen=True)
class MaskStmt:
    value: Expr
    loc: Loc


@dataclass(frozen=True)
class ScoreStmt:
    value: Expr
    loc: Loc


Stmt = InputStmt | LetStmt | MaskStmt | ScoreStmt


@dataclass(frozen=True)
class ImportDecl:
    path: str
    loc: Loc


@dataclass(frozen=True)
class FnDecl:
    name: str
    params: tuple[Param, ...]
    body: Expr
    loc: Loc


@dataclass(frozen=True)
class PatternDecl:
    name: str
    params: tuple[Param, ...]
    stmts: tuple[Stmt, ...]
    loc: Loc


Decl = ImportDecl | FnDecl | PatternDecl


@dataclass(frozen=True)
class Module:
    file: SourceFile
    decls: tuple[Decl, ...]


def children(node: Expr) -> list[Expr]:
    """The sub-expressions of an expression, in source order (a keyword argument's value included)."""
    found: list[Expr] = []
    for name in node.__dataclass_fields__:
        value = getattr(node, name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, KeywordArg):
                found.append(item.value)
            elif isinstance(item, Expr):
                found.append(item)
    return found


def decl_exprs(decl: Decl) -> list[Expr]:
    """The top-level expressions of a declaration, in source order."""
    if isinstance(decl, FnDecl):
        return [*(p.default for p in decl.params if p.default is not None), decl.body]
    if isinstance(decl, PatternDecl):
        exprs = [p.default for p in decl.params if p.default is not None]
        for stmt in decl.stmts:
            exprs.extend(stmt.dims if isinstance(stmt, InputStmt) else [stmt.value])
        return exprs
    return []


def walk(roots: list[Expr]) -> Iterator[Expr]:
    """Every expression under `roots`, parents before children, in source order, without recursion."""
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))
