"""Syntax-tree nodes, one class per grammar rule of `grammar/attn.lark`; every node keeps its location."""

from __future__ import annotations

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
    """`+ - * / // %`; `op_loc` is the operator token."""

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
class Param:
    name: str
    type_name: str
    default: Expr | None
    loc: Loc
    type_loc: Loc


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
