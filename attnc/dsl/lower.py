"""Resolve names and check types: syntax tree -> IR, with every user error located in the source.

A `Program` is one loaded file with its imports and the standard library. Declarations are lowered on
demand and memoised; each gets a unique symbol (`name` in the loaded file, `stdlib.name` or
`<file stem>.name` elsewhere, the stem made an identifier and numbered where two files share it).
Lowering keeps `fn` calls, pattern references and `let`s as they are written — expanding them is the
`inline` pass's job — but every node is typed, with ints promoted to float explicitly (`tofloat`)
wherever they meet floats.
"""

from __future__ import annotations

import difflib
import gc
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TypeVar

from attnc.analysis.value_ranges import ValueRanges
from attnc.dsl import ast
from attnc.dsl.parser import parse
from attnc.dsl.source import (
    MAX_PROGRAM_BYTES,
    MAX_SOURCE_BYTES,
    SUFFIX,
    SourceReadError,
    read_source,
    resolve_import,
    shown_path,
    size_error,
)
from attnc.errors import (
    ArityError,
    AttnError,
    AttnImportError,
    AttnSyntaxError,
    AttnTypeError,
    CycleError,
    DuplicateError,
    InternalError,
    Loc,
    SourceFile,
    UnknownNameError,
)
from attnc.ir import fold
from attnc.ir import reduce as reductions
from attnc.ir.nodes import (
    INDEX_VARS,
    INPUT_DTYPES,
    SIZES,
    FnIR,
    InputDecl,
    ModuleIR,
    Node,
    Op,
    ParamDecl,
    PatternIR,
    Type,
    const,
    deep_recursion,
    make,
)
from attnc.reserved import RESERVED_NAMES, RESERVED_PARAMETER_NAMES, RESERVED_RUNTIME_PARAMETER_NAMES

INT64_MAX = 2**63 - 1
PARAM_TYPES = {"int": Type.INT, "float": Type.FLOAT, "bool": Type.BOOL}
MATH_FUNCTIONS = {
    "exp": Op.EXP,
    "exp2": Op.EXP2,
    "log": Op.LOG,
    "log2": Op.LOG2,
    "sqrt": Op.SQRT,
    "tanh": Op.TANH,
    "sigmoid": Op.SIGMOID,
    "sin": Op.SIN,
    "cos": Op.COS,
    "tan": Op.TAN,
    "erf": Op.ERF,
}
BUILTINS = frozenset({"abs", "min", "max", "clamp", "where", "floor", "ceil", *MATH_FUNCTIONS})
_NOT_FIXED = (Op.LOAD, Op.CALL, Op.PATTERN, Op.BOUND, Op.REDUCE)
"""Ops a reduction's bound may not contain (besides leaves other than constants and parameters)."""
REDUCTIONS = ("sum", "any", "all", "max", "min")
"""The bounded reductions, `sum(i in lo..hi: term)`: see `ir/reduce.py`."""
CONSTANTS = {"inf": math.inf}
"""Built-in float constants: `inf` (and so `-inf`, the spelling of a masked-out score)."""
RESERVED = frozenset({*INDEX_VARS, *SIZES, "s", *BUILTINS, *CONSTANTS})
KERNEL_KEYWORDS = RESERVED_NAMES - RESERVED
"""Names an input cannot take because a kernel call takes them as keywords (built-ins aside, which have
their own message)."""

Decl = ast.FnDecl | ast.PatternDecl
K = TypeVar("K")


# ---- files, imports and global names ----------------------------------------------------------------


@dataclass(eq=False)
class FileScope:
    """One `.attn` file: its declarations, the files it imports, and the stdlib behind them."""

    module: ast.Module
    path: Path | None
    qualifier: str
    decls: dict[str, Decl] = field(default_factory=dict)
    imports: list[tuple[ast.ImportDecl, FileScope]] = field(default_factory=list)
    stdlib: FileScope | None = None

    def symbol(self, name: str) -> str:
        return f"{self.qualifier}.{name}" if self.qualifier else name


def _collect_decls(scope: FileScope) -> None:
    for decl in scope.module.decls:
        if isinstance(decl, ast.ImportDecl):
            continue
        if decl.name in RESERVED:
            raise DuplicateError(f"'{decl.name}' is a built-in name and cannot be redefined", decl.loc)
        previous = scope.decls.get(decl.name)
        if previous is not None:
            raise DuplicateError(f"'{decl.name}' is already defined at line {previous.loc.line}", decl.loc)
        scope.decls[decl.name] = decl


@cache
def _stdlib_scope() -> FileScope:
    text = (Path(__file__).resolve().parents[1] / "stdlib.attn").read_text()
    scope = FileScope(parse(text, "<stdlib>"), None, "stdlib")
    _collect_decls(scope)
    return scope


class _Loader:
    """Loads a file's imports, each file once, within the program's size budget."""

    def __init__(self, size: int) -> None:
        self.loaded: dict[Path, FileScope] = {}
        self.size = size
        # A qualifier names a file's symbols (`lib.f`); two files named lib.attn in different
        # directories, or a file named stdlib.attn, must not share one, or one `f` would stand for both.
        self.qualifiers = {"", "stdlib"}

    def scope(self, module: ast.Module, path: Path | None, qualifier: str, loading: list[Path]) -> FileScope:
        scope = FileScope(module, path, qualifier, stdlib=_stdlib_scope())
        _collect_decls(scope)
        base = path.parent if path is not None else Path.cwd()
        for decl in module.decls:
            if isinstance(decl, ast.ImportDecl):
                scope.imports.append((decl, self.imported(decl, base, loading)))
        return scope

    def imported(self, decl: ast.ImportDecl, base: Path, loading: list[Path]) -> FileScope:
        try:
            target = resolve_import(base, decl.path)
        except SourceReadError as err:
            raise AttnImportError(f"cannot read '{shown_path(decl.path)}': {err.reason}", decl.loc) from None
        if target in loading:
            chain = " -> ".join(p.name for p in [*loading[loading.index(target) :], target])
            raise AttnImportError(f"import cycle: {chain}", decl.loc)
        if target not in self.loaded:
            try:
                text = read_source(target)
            except SourceReadError as err:
                raise AttnImportError(
                    f"cannot read '{shown_path(decl.path)}': {err.reason}", decl.loc
                ) from None
            self.size += len(text)
            if self.size > MAX_PROGRAM_BYTES:
                reason = size_error(MAX_PROGRAM_BYTES, "the program with its imports")
                raise AttnImportError(f"cannot read '{decl.path}': {reason}", decl.loc)
            child = parse(text, _display_path(target))
            self.loaded[target] = self.scope(child, target, self.qualifier(target), [*loading, target])
        return self.loaded[target]

    def qualifier(self, path: Path) -> str:
        """A name for the file's symbols: its stem made an identifier, numbered if already taken."""
        stem = re.sub(r"[^A-Za-z0-9_]", "_", path.name[: -len(SUFFIX)]) or "_"
        qualifier, number = stem, 1
        while qualifier in self.qualifiers:
            number += 1
            qualifier = f"{stem}_{number}"
        self.qualifiers.add(qualifier)
        return qualifier


def _display_path(path: Path) -> str:
    """A path to show in diagnostics: relative to the working directory where that is shorter."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return relative if not relative.startswith("..") else str(path)


def load_program(text: str, filename: str = "<string>", path: Path | None = None) -> Program:
    """Parse and check a file (and its imports); patterns are lowered on first use."""
    if len(text) > MAX_SOURCE_BYTES:
        loc = Loc(SourceFile(filename, text), 1, 1)
        raise AttnSyntaxError(size_error(MAX_SOURCE_BYTES, "the source"), loc)
    with deep_recursion(), _collector_paused():
        module = parse(text, filename)
        resolved = path.resolve() if path is not None else None
        loader = _Loader(len(text))
        scope = loader.scope(module, resolved, "", [resolved] if resolved else [])
        program = Program(scope)
        program.check_all()
    return program


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector: loading builds no reference cycles, but its many
    small objects (tokens, syntax and IR nodes) make the collector's passes over the growing heap most
    of the time for large files (20,000 fns: 7.1 s with it, 4.7 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def stdlib_program() -> Program:
    program = Program(_stdlib_scope())
    program.check_all()
    return program


def _post_order(
    roots: Sequence[tuple[K, Loc | None]],
    edges: Callable[[K], Sequence[tuple[K, Loc | None]]],
    cycle: Callable[[list[K], K, Loc | None], Exception],
) -> list[K]:
    """The keys reachable from `roots`, each after every key it refers to, found without recursion.

    Lowering a definition lowers what it refers to first, recursively; a chain of 10,000 lets or fns
    would need 10,000 nested lowerings. Lowering in this order instead finds every reference already
    lowered. `cycle(path, key, loc)` is the error for the reference at `loc` from the end of `path`
    back to `key`, which is on it: the one recursive lowering would have met, in the same order."""
    done: set[K] = set()
    order: list[K] = []
    for root, _ in roots:
        if root in done:
            continue
        path, on_path, pending = [root], {root}, [iter(edges(root))]
        while pending:
            for key, loc in pending[-1]:
                if key in on_path:
                    raise cycle(path, key, loc)
                if key not in done:
                    path.append(key)
                    on_path.add(key)
                    pending.append(iter(edges(key)))
                    break
            else:
                pending.pop()
                key = path.pop()
                on_path.discard(key)
                done.add(key)
                order.append(key)
    return order


# ---- the program: lowering on demand -----------------------------------------------------------------


class Program:
    """A loaded file seen through its global names; lowers declarations to IR on demand."""

    def __init__(self, root: FileScope) -> None:
        self.root = root
        self._fns: dict[int, FnIR] = {}
        self._patterns: dict[int, PatternIR] = {}
        self._in_progress: set[int] = set()
        self._decls: dict[int, tuple[FileScope, Decl]] = {}  # by id: checking lowers in dependency order

    # Global names: the file's own, then its imports', then the stdlib's.
    def lookup(self, scope: FileScope, name: str, loc: Loc) -> tuple[FileScope, Decl] | None:
        if name in scope.decls:
            return scope, scope.decls[name]
        found: list[tuple[ast.ImportDecl, FileScope]] = [
            (imp, child) for imp, child in scope.imports if name in child.decls
        ]
        distinct = {id(child.decls[name]) for _, child in found}
        if len(distinct) > 1:
            files = " and ".join(f'"{imp.path}"' for imp, _ in found)
            raise UnknownNameError(f"'{name}' is ambiguous: it is defined in {files}", loc)
        if found:
            child = found[0][1]
            return child, child.decls[name]
        if scope.stdlib is not None and name in scope.stdlib.decls:
            return scope.stdlib, scope.stdlib.decls[name]
        return None

    def global_names(self, scope: FileScope) -> set[str]:
        names = set(scope.decls)
        for _, child in scope.imports:
            names |= set(child.decls)
        if scope.stdlib is not None:
            names |= set(scope.stdlib.decls)
        return names

    def pattern_names(self) -> list[str]:
        """Patterns reachable by name from the root file: its own first, then imports', then stdlib's."""
        names = [n for n, d in self.root.decls.items() if isinstance(d, ast.PatternDecl)]
        for scope in [child for _, child in self.root.imports] + [self.root.stdlib]:
            if scope is None:
                continue
            names += [n for n, d in scope.decls.items() if isinstance(d, ast.PatternDecl) and n not in names]
        return names

    def pattern_decl(self, name: str) -> tuple[FileScope, ast.PatternDecl] | None:
        found = self.lookup(self.root, name, Loc(self.root.module.file, 1, 1))
        if found is None or not isinstance(found[1], ast.PatternDecl):
            return None
        return found  # type: ignore[return-value]

    def check_all(self) -> None:
        """Lower every declaration of the root file and of the files it imports, so that `load` reports
        every error up front."""
        pending, seen, roots = [self.root], set(), []
        while pending:
            scope = pending.pop()
            if id(scope) in seen:
                continue
            seen.add(id(scope))
            for decl in scope.decls.values():
                self._decls[id(decl)] = scope, decl
                roots.append((id(decl), decl.loc))
            pending.extend(child for _, child in scope.imports)
        for key in _post_order(roots, self._references, self._cycle):
            scope, decl = self._decls[key]
            self._lower(scope, decl, decl.loc)

    def _references(self, key: int) -> list[tuple[int, Loc | None]]:
        """The declarations that lowering declaration `key` lowers, each with where it is referred to."""
        scope, decl = self._decls[key]
        local_names = {p.name for p in decl.params}
        constants = [p.default for p in decl.params if p.default is not None]
        if isinstance(decl, ast.PatternDecl):
            for stmt in decl.stmts:
                if isinstance(stmt, ast.InputStmt | ast.LetStmt):
                    local_names.add(stmt.name)
                if isinstance(stmt, ast.InputStmt):
                    constants.extend(stmt.dims)
        in_constants = {id(e) for e in ast.walk(constants)}
        found: list[tuple[int, Loc | None]] = []
        for expr in ast.walk(ast.decl_exprs(decl)):
            if isinstance(expr, ast.Reduce):  # its variable is local to its term (parents come first)
                local_names.add(expr.var)
            if isinstance(expr, ast.Call) and expr.func not in local_names and expr.func not in BUILTINS:
                name, name_loc = expr.func, expr.func_loc
            elif isinstance(expr, ast.Name) and expr.id not in local_names and expr.id not in RESERVED:
                name, name_loc = expr.id, expr.loc
            else:
                continue
            target = self.lookup(scope, name, name_loc)
            if target is None:
                continue
            target_decl = target[1]
            if isinstance(target_decl, ast.PatternDecl):
                if id(expr) in in_constants:
                    continue  # a pattern in a default or a shape is an error, reported without lowering it
                found.append((id(target_decl), expr.loc))
            elif isinstance(expr, ast.Call):
                found.append((id(target_decl), name_loc))
            self._decls[id(target_decl)] = target
        return found

    def _cycle(self, path: list[int], key: int, loc: Loc | None) -> CycleError:
        decl = self._decls[key][1]
        kind = "fn" if isinstance(decl, ast.FnDecl) else "pattern"
        return CycleError(f"{kind} '{decl.name}' refers to itself (recursion is not allowed)", loc)

    def _lower(self, scope: FileScope, decl: Decl, ref_loc: Loc) -> FnIR | PatternIR:
        key = id(decl)
        table: dict[int, FnIR] | dict[int, PatternIR] = (
            self._fns if isinstance(decl, ast.FnDecl) else self._patterns
        )
        if key in table:
            return table[key]
        if key in self._in_progress:
            kind = "fn" if isinstance(decl, ast.FnDecl) else "pattern"
            raise CycleError(f"{kind} '{decl.name}' refers to itself (recursion is not allowed)", ref_loc)
        self._in_progress.add(key)
        try:
            if isinstance(decl, ast.FnDecl):
                result: FnIR | PatternIR = _FnLowerer(self, scope, decl).lower()
            else:
                result = _PatternLowerer(self, scope, decl).lower()
        finally:
            self._in_progress.discard(key)
        table[key] = result  # type: ignore[index, assignment]
        return result

    def lower_fn(self, scope: FileScope, decl: ast.FnDecl, ref_loc: Loc) -> FnIR:
        return self._lower(scope, decl, ref_loc)  # type: ignore[return-value]

    def lower_pattern(self, scope: FileScope, decl: ast.PatternDecl, ref_loc: Loc) -> PatternIR:
        return self._lower(scope, decl, ref_loc)  # type: ignore[return-value]

    def module(self, name: str) -> ModuleIR:
        """The pattern `name` with every fn and pattern it refers to: the pipeline's input."""
        found = self.pattern_decl(name)
        assert found is not None, name
        entry = self.lower_pattern(found[0], found[1], found[1].loc)
        by_symbol: dict[str, FnIR | PatternIR] = {}
        for ir in [*self._fns.values(), *self._patterns.values()]:
            by_symbol[ir.name] = ir

        def callees(symbol: str) -> list[tuple[str, Loc | None]]:
            ir = by_symbol[symbol]
            roots = [ir.body] if isinstance(ir, FnIR) else list(ir.roots())
            return [
                (str(node.attr), node.loc)
                for root in roots
                for node in root.walk()
                if node.op in (Op.CALL, Op.PATTERN)
            ]

        def cycle(path: list[str], symbol: str, loc: Loc | None) -> InternalError:
            return InternalError(f"lowered definitions refer to each other: {' -> '.join([*path, symbol])}")

        order = [by_symbol[s] for s in _post_order([(entry.name, entry.loc)], callees, cycle)]
        fns = tuple(ir for ir in order if isinstance(ir, FnIR))
        patterns = tuple(ir for ir in order if isinstance(ir, PatternIR))
        return ModuleIR(fns, patterns)


# ---- expressions -------------------------------------------------------------------------------------


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _promote(a: Node, b: Node) -> tuple[Node, Node]:
    """Int meets float: the int becomes a float."""
    if a.type is Type.INT and b.type is Type.FLOAT:
        return make(Op.TOFLOAT, a, loc=a.loc), b
    if a.type is Type.FLOAT and b.type is Type.INT:
        return a, make(Op.TOFLOAT, b, loc=b.loc)
    return a, b


def _to_type(node: Node, target: Type, loc: Loc, what: str) -> Node:
    """Convert node to target (int -> float is the only implicit conversion) or report `what`."""
    if node.type is target:
        return node
    if node.type is Type.INT and target is Type.FLOAT:
        return make(Op.TOFLOAT, node, loc=node.loc)
    raise AttnTypeError(f"{what} must be {target}, got {node.type}", loc)


def _is_number(node: Node) -> bool:
    return node.type in (Type.INT, Type.FLOAT)


_ARITH = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL}
_BITWISE = {"&": Op.BITAND, "|": Op.BITOR, "^": Op.BITXOR, "<<": Op.SHL, ">>": Op.SHR}
SCORE_IN_MASK = (
    "'s' (the score) exists only inside score: a mask decides which keys, and so which tiles, are "
    "computed at all, before any score exists; to drop keys by their score, write "
    "score = where(COND, s, -inf)"
)
_COMPARE = {"==": Op.EQ, "!=": Op.NE, "<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE}


@dataclass
class _Local:
    """A name bound inside a fn or pattern: how to refer to it and what it is."""

    kind: str  # "param", "arg", "let", "input"
    loc: Loc
    type: Type | None = None  # None for a let not yet lowered


class _ExprLowerer:
    """Lowers expressions inside one declaration; subclasses say which names are local."""

    def __init__(self, program: Program, scope: FileScope) -> None:
        self.program = program
        self.scope = scope
        self.locals: dict[str, _Local] = {}
        self.bound: dict[str, Node] = {}  # the variables of the enclosing reductions
        self.allow_score = False
        self.context = "an expression"

    # Names a subclass resolves itself (lets, inputs).
    def local_ref(self, name: str, loc: Loc) -> Node:
        local = self.locals[name]
        assert local.type is not None
        return Node(Op.REF, local.type, (), name, loc)

    def input_decl(self, name: str) -> InputDecl | None:
        return None

    def allow_index_vars(self) -> bool:
        return True

    def unknown(self, name: str, loc: Loc) -> AttnError:
        candidates = set(self.locals) | self.program.global_names(self.scope) | RESERVED
        close = difflib.get_close_matches(name, sorted(candidates), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return UnknownNameError(f"unknown name '{name}'{hint}", loc)

    def expr(self, e: ast.Expr) -> Node:
        method: Callable[[ast.Expr], Node] = getattr(self, "_" + type(e).__name__)
        return method(e)

    def _IntLit(self, e: ast.IntLit) -> Node:
        if e.value > INT64_MAX:
            raise AttnTypeError(f"integer literal {e.value} does not fit in 64 bits", e.loc)
        return const(e.value, e.loc)

    def _FloatLit(self, e: ast.FloatLit) -> Node:
        return const(e.value, e.loc)

    def _BoolLit(self, e: ast.BoolLit) -> Node:
        return const(e.value, e.loc)

    def _Name(self, e: ast.Name) -> Node:
        name = e.id
        if name in self.bound:
            variable = self.bound[name]
            return Node(Op.BOUND, Type.INT, variable.args, variable.attr, e.loc)
        if name in self.locals:
            if self.locals[name].kind == "input":
                decl = self.input_decl(name)
                if decl is not None and not decl.dims:
                    raise AttnTypeError(f"input '{name}' is a 0-d tensor: read it as {name}[]", e.loc)
                raise AttnTypeError(f"input '{name}' is a tensor: index it, as in {name}[...]", e.loc)
            return self.local_ref(name, e.loc)
        if name in INDEX_VARS:
            if not self.allow_index_vars():
                raise AttnTypeError(f"'{name}' cannot be used in {self.context}", e.loc)
            return Node(Op.VAR, Type.INT, (), name, e.loc)
        if name in SIZES:
            return Node(Op.SIZE, Type.INT, (), name, e.loc)
        if name in CONSTANTS:
            return const(CONSTANTS[name], e.loc)
        if name == "s":
            if not self.allow_score:
                if self.context == "mask":
                    raise AttnTypeError(SCORE_IN_MASK, e.loc)
                raise AttnTypeError("'s' (the score) exists only inside a pattern's score statement", e.loc)
            return Node(Op.SCORE, Type.FLOAT, (), None, e.loc)
        if name in BUILTINS:
            raise AttnTypeError(f"built-in function '{name}' must be called", e.loc)
        found = self.program.lookup(self.scope, name, e.loc)
        if found is None:
            raise self.unknown(name, e.loc)
        scope, decl = found
        if isinstance(decl, ast.FnDecl):
            raise AttnTypeError(f"fn '{name}' must be called, as in {name}(...)", e.loc)
        return self.pattern_ref(scope, decl, (), (), e.loc)

    def pattern_ref(
        self,
        scope: FileScope,
        decl: ast.PatternDecl,
        args: Sequence[ast.Expr],
        kwargs: Sequence[ast.KeywordArg],
        loc: Loc,
    ) -> Node:
        if not self.allow_index_vars():
            raise AttnTypeError(f"pattern '{decl.name}' cannot be used in {self.context}", loc)
        target = self.program.lower_pattern(scope, decl, loc)
        values = self.bind_args(f"pattern '{decl.name}'", target.params, args, kwargs, loc)
        return Node(Op.PATTERN, Type.BOOL, values, target.name, loc)

    def bind_args(
        self,
        what: str,
        params: tuple[ParamDecl, ...],
        args: Sequence[ast.Expr],
        kwargs: Sequence[ast.KeywordArg],
        loc: Loc,
    ) -> tuple[Node, ...]:
        """Match positional and keyword arguments to parameters; fill defaults; convert types."""
        if len(args) > len(params):
            raise ArityError(
                f"{what} takes {len(params)} argument(s), got {len(args) + len(kwargs)}",
                args[len(params)].loc,
            )
        bound: dict[str, ast.Expr] = {}
        for param, arg in zip(params, args, strict=False):
            bound[param.name] = arg
        names = [p.name for p in params]
        for kw in kwargs:
            if kw.name not in names:
                close = difflib.get_close_matches(kw.name, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ArityError(f"{what} has no parameter '{kw.name}'{hint}", kw.loc)
            if kw.name in bound:
                raise ArityError(f"{what} got parameter '{kw.name}' twice", kw.loc)
            bound[kw.name] = kw.value
        values = []
        for param in params:
            if param.name in bound:
                expr = bound[param.name]
                value = self.expr(expr)
                values.append(_to_type(value, param.type, expr.loc, f"argument '{param.name}' of {what}"))
            elif param.default is not None:
                values.append(param.default)
            else:
                raise ArityError(f"{what} needs argument '{param.name}'", loc)
        return tuple(values)

    def _Call(self, e: ast.Call) -> Node:
        name = e.func
        if name in self.locals:
            raise AttnTypeError(f"'{name}' is {_article(self.locals[name].kind)}, not a function", e.func_loc)
        if name in BUILTINS:
            return self.builtin(e)
        found = self.program.lookup(self.scope, name, e.func_loc)
        if found is None:
            if name in RESERVED:
                raise AttnTypeError(f"'{name}' is not a function", e.func_loc)
            raise self.unknown(name, e.func_loc)
        scope, decl = found
        if isinstance(decl, ast.PatternDecl):
            return self.pattern_ref(scope, decl, e.args, e.kwargs, e.loc)
        target = self.program.lower_fn(scope, decl, e.func_loc)
        values = self.bind_args(f"fn '{name}'", target.params, e.args, e.kwargs, e.loc)
        return Node(Op.CALL, target.body.type, values, target.name, e.loc)

    def builtin(self, e: ast.Call) -> Node:
        name = e.func
        if e.kwargs:
            raise ArityError(f"built-in '{name}' takes no keyword arguments", e.kwargs[0].loc)
        arity = {"clamp": (3, 3), "where": (3, 3), "min": (2, None), "max": (2, None)}.get(name, (1, 1))
        low, high = arity
        if len(e.args) < low or (high is not None and len(e.args) > high):
            count = f"{low}" if low == high else f"at least {low}"
            raise ArityError(f"'{name}' takes {count} argument(s), got {len(e.args)}", e.loc)
        args = [self.expr(a) for a in e.args]
        if name == "where":
            cond, a, b = args
            _to_type(cond, Type.BOOL, e.args[0].loc, "the condition of 'where'")
            if _is_number(a) and _is_number(b):
                a, b = _promote(a, b)
            elif a.type != b.type:
                raise AttnTypeError(
                    f"the branches of 'where' must have one type, got {a.type} and {b.type}", e.loc
                )
            return make(Op.WHERE, cond, a, b, loc=e.loc)
        for arg, expr in zip(args, e.args, strict=True):
            if not _is_number(arg):
                raise AttnTypeError(f"'{name}' needs numbers, got {arg.type}", expr.loc)
        if name in MATH_FUNCTIONS:
            return make(MATH_FUNCTIONS[name], _to_type(args[0], Type.FLOAT, e.loc, ""), loc=e.loc)
        if name in ("floor", "ceil"):
            if args[0].type is Type.INT:
                return args[0]
            return make(Op.FLOOR if name == "floor" else Op.CEIL, args[0], loc=e.loc)
        if name == "abs":
            return make(Op.ABS, args[0], loc=e.loc)
        if name == "clamp":
            x, lo, hi = args
            if Type.FLOAT in (x.type, lo.type, hi.type):
                x, lo, hi = (_to_type(v, Type.FLOAT, e.loc, "") for v in (x, lo, hi))
            return make(Op.MIN, make(Op.MAX, x, lo, loc=e.loc), hi, loc=e.loc)
        op = Op.MIN if name == "min" else Op.MAX
        if any(a.type is Type.FLOAT for a in args):
            args = [_to_type(a, Type.FLOAT, e.loc, "") for a in args]
        result = args[0]
        for arg in args[1:]:
            result = make(op, result, arg, loc=e.loc)
        return result

    def _Index(self, e: ast.Index) -> Node:
        decl = self.input_decl(e.name)
        if decl is None:
            if e.name in self.locals or self.program.lookup(self.scope, e.name, e.name_loc) is not None:
                raise AttnTypeError(f"'{e.name}' is not an input tensor and cannot be indexed", e.name_loc)
            raise self.unknown(e.name, e.name_loc)
        if len(e.indices) != len(decl.dims):
            raise ArityError(
                f"input '{e.name}' has {len(decl.dims)} dimension(s), indexed with {len(e.indices)}", e.loc
            )
        indices = []
        for index in e.indices:
            value = self.expr(index)
            if value.type is not Type.INT:
                raise AttnTypeError(f"an index must be int, got {value.type}", index.loc)
            indices.append(value)
        return Node(Op.LOAD, decl.type, tuple(indices), e.name, e.loc)

    def _Neg(self, e: ast.Neg) -> Node:
        value = self.expr(e.operand)
        if not _is_number(value):
            raise AttnTypeError(f"unary '-' needs a number, got {value.type}", e.loc)
        return make(Op.NEG, value, loc=e.loc)

    def _Not(self, e: ast.Not) -> Node:
        value = self.expr(e.operand)
        if value.type is not Type.BOOL:
            raise AttnTypeError(f"'not' needs a bool, got {value.type}", e.loc)
        return make(Op.NOT, value, loc=e.loc)

    def _BinOp(self, e: ast.BinOp) -> Node:
        # A flat chain `a + b - c + ...` is a left spine of BinOps as long as the chain: lowered by a
        # loop, in the order it is written, so that its length costs no recursion.
        spine = []
        while isinstance(e, ast.BinOp):
            spine.append(e)
            e = e.left
        value = self.expr(e)
        for binop in reversed(spine):
            value = self._binop(binop, value, self.expr(binop.right))
        return value

    def _binop(self, e: ast.BinOp, left: Node, right: Node) -> Node:
        if e.op in _BITWISE:
            return self._bitwise(e, left, right)
        if not (_is_number(left) and _is_number(right)):
            raise AttnTypeError(
                f"operator '{e.op}' needs numbers, got {left.type} and {right.type}", e.op_loc
            )
        if e.op in ("//", "%"):
            if left.type is not Type.INT or right.type is not Type.INT:
                hint = " (use floor(a / b) for floats)" if e.op == "//" else ""
                raise AttnTypeError(
                    f"operator '{e.op}' needs ints, got {left.type} and {right.type}{hint}", e.op_loc
                )
            return make(Op.FLOORDIV if e.op == "//" else Op.MOD, left, right, loc=e.loc)
        if e.op == "/":
            left, right = (_to_type(v, Type.FLOAT, e.loc, "") for v in (left, right))
            return make(Op.DIV, left, right, loc=e.loc)
        left, right = _promote(left, right)
        return make(_ARITH[e.op], left, right, loc=e.loc)

    def _bitwise(self, e: ast.BinOp, left: Node, right: Node) -> Node:
        """`& | ^ << >>`: ints only (int64, two's complement, as Python's); a shift count is clamped to
        [0, 63] (`fold.SHIFT_LIMIT`), and a constant count outside that is an error here."""
        if left.type is not Type.INT or right.type is not Type.INT:
            hint = ""
            if left.type is Type.BOOL and right.type is Type.BOOL and e.op in ("&", "|"):
                hint = f" (use '{'and' if e.op == '&' else 'or'}' for bools)"
            raise AttnTypeError(
                f"operator '{e.op}' needs ints, got {left.type} and {right.type}{hint}", e.op_loc
            )
        if e.op in ("<<", ">>"):
            count = reductions.constant(right)
            if isinstance(count, int) and not 0 <= count <= fold.SHIFT_LIMIT:
                raise AttnTypeError(
                    f"shift count {count} is outside [0, {fold.SHIFT_LIMIT}]: ints are 64-bit", e.right.loc
                )
        return make(_BITWISE[e.op], left, right, loc=e.loc)

    def _Reduce(self, e: ast.Reduce) -> Node:
        """`sum(i in lo..hi: term)` (and any, all, max, min): see `ir/reduce.py`. The bounds are int
        expressions of literals and parameters (constants once bound, or runtime kernel arguments);
        constant bounds with few terms are unrolled here, the rest at binding or in the kernel."""
        if e.kind not in REDUCTIONS:
            raise AttnSyntaxError(
                f"'{e.kind}(... in ...)' is not a reduction; expected one of {', '.join(REDUCTIONS)}",
                e.kind_loc,
            )
        self._check_reduction_name(e)
        lo, hi = (self._reduction_bound(b) for b in (e.lo, e.hi))
        qualifier = re.sub(r"\W", "_", self.scope.qualifier)
        name = "_".join(x for x in (e.var, qualifier, str(e.var_loc.line), str(e.var_loc.col)) if x)
        self.bound[e.var] = Node(Op.BOUND, Type.INT, (lo, hi), name, e.var_loc)
        try:
            term = self.expr(e.body)
        finally:
            del self.bound[e.var]
        if e.kind in ("any", "all"):
            if term.type is not Type.BOOL:
                raise AttnTypeError(f"the term of '{e.kind}' must be bool, got {term.type}", e.body.loc)
        elif not _is_number(term):
            raise AttnTypeError(f"the term of '{e.kind}' must be a number, got {term.type}", e.body.loc)
        node = reductions.reduction(e.kind, name, lo, hi, term, loc=e.loc)
        unrolled = reductions.unroll(node)
        return node if unrolled is None else unrolled

    def _check_reduction_name(self, e: ast.Reduce) -> None:
        """A reduction's variable is a new name: it may not shadow any name in scope."""
        var = e.var
        if var in self.bound:
            raise DuplicateError(f"'{var}' is already the variable of an enclosing reduction", e.var_loc)
        if var in self.locals:
            local = self.locals[var]
            raise DuplicateError(
                f"'{var}' is already declared as {_article(local.kind)} at line {local.loc.line}; "
                "a reduction's variable needs a new name",
                e.var_loc,
            )
        if var in RESERVED or var in CONSTANTS:
            raise DuplicateError(
                f"'{var}' is a built-in name and cannot be a reduction's variable", e.var_loc
            )
        if self.program.lookup(self.scope, var, e.var_loc) is not None:
            raise DuplicateError(
                f"'{var}' is already defined in the program; a reduction's variable needs a new name",
                e.var_loc,
            )

    def _reduction_bound(self, expr: ast.Expr) -> Node:
        """A bound of a reduction: an int expression of literals and parameters (fn arguments
        included, checked again once inlined: `bind-params`)."""
        value = self.expr(expr)  # (an enclosing reduction's variable is not fixed: reported below)
        if value.type is not Type.INT:
            raise AttnTypeError(f"a reduction's bound must be int, got {value.type}", expr.loc)
        for n in value.walk():
            if n.op is Op.REF:
                local = self.locals.get(str(n.attr))
                fixed = local is not None and local.kind in ("param", "arg")
            else:
                fixed = n.op is Op.CONST or (bool(n.args) and n.op not in _NOT_FIXED)
            if not fixed:
                break
        else:
            return value
        raise AttnTypeError(
            "a reduction's bound must be an int of literals and parameters (a constant, or a runtime "
            "parameter: the kernel then loops); it cannot read positions, sizes, inputs, lets or calls",
            expr.loc,
        )

    def _BoolOp(self, e: ast.BoolOp) -> Node:
        values = []
        for operand in e.operands:
            value = self.expr(operand)
            if value.type is not Type.BOOL:
                raise AttnTypeError(f"operand of '{e.op}' must be bool, got {value.type}", operand.loc)
            values.append(value)
        return make(Op.AND if e.op == "and" else Op.OR, *values, loc=e.loc)

    def _Compare(self, e: ast.Compare) -> Node:
        # `a < b <= c` means `a < b and b <= c`; b is pure, so using it twice is safe.
        values = [self.expr(o) for o in e.operands]
        parts = []
        for i, (op, op_loc) in enumerate(zip(e.ops, e.op_locs, strict=True)):
            left, right = values[i], values[i + 1]
            if _is_number(left) and _is_number(right):
                left, right = _promote(left, right)
            elif not (left.type is right.type is Type.BOOL and op in ("==", "!=")):
                kinds = "two numbers" if op not in ("==", "!=") else "two numbers or two bools"
                raise AttnTypeError(f"'{op}' compares {kinds}, got {left.type} and {right.type}", op_loc)
            loc = Loc(
                e.loc.file, e.operands[i].loc.line, e.operands[i].loc.col, e.operands[i + 1].loc.end_col
            )
            parts.append(make(_COMPARE[op], left, right, loc=loc))
        return parts[0] if len(parts) == 1 else make(Op.AND, *parts, loc=e.loc)


def _constant(program: Program, scope: FileScope, expr: ast.Expr, target: Type, what: str) -> Node:
    """A default value: an expression of literals only, evaluated now."""

    class _Const(_ExprLowerer):
        def allow_index_vars(self) -> bool:
            return False

    lowerer = _Const(program, scope)
    lowerer.context = "a default value"
    node = _to_type(lowerer.expr(expr), target, expr.loc, what)
    value = reductions.constant(node)
    if value is None:
        raise AttnTypeError(f"{what} must be a constant made of literals", expr.loc)
    return const(value, expr.loc)


def _params(
    program: Program,
    scope: FileScope,
    params: tuple[ast.Param, ...],
    owner: str,
    python_names: frozenset[str] = frozenset(),
    pattern: bool = False,
) -> tuple[ParamDecl, ...]:
    """The declared parameters; `python_names` are the names a parameter passed from Python cannot take.
    A pattern's parameter is static if declared so, or a bool; a fn's arguments are inlined, so
    `static` means nothing there (bools are static for both, so a fn's IR reads as a pattern's)."""
    result: list[ParamDecl] = []
    seen: dict[str, ast.Param] = {}
    for p in params:
        if p.name in RESERVED:
            raise DuplicateError(f"'{p.name}' is a built-in name and cannot be a parameter", p.loc)
        if p.name in python_names:
            raise DuplicateError(
                f"'{p.name}' is reserved: it is an argument of the Python call that makes a kernel, "
                "so a parameter of that name could not be given",
                p.loc,
            )
        if p.name in seen:
            raise DuplicateError(f"parameter '{p.name}' is declared twice", p.loc)
        seen[p.name] = p
        if p.type_name not in PARAM_TYPES:
            raise AttnTypeError(f"unknown type '{p.type_name}'; expected int, float or bool", p.type_loc)
        type_ = PARAM_TYPES[p.type_name]
        default = None
        if p.default is not None:
            default = _constant(program, scope, p.default, type_, f"the default of '{p.name}'")
        if p.static_loc is not None and not pattern:
            raise AttnSyntaxError(
                f"'static' is for pattern parameters: fn '{owner}' is inlined, and its argument "
                f"'{p.name}' takes whatever each call passes",
                p.static_loc,
            )
        static = p.static_loc is not None or type_ is Type.BOOL
        if pattern and not static and p.name in RESERVED_RUNTIME_PARAMETER_NAMES:
            raise DuplicateError(
                f"'{p.name}' is reserved: a runtime parameter may be given by keyword to kern(...) and "
                f"its methods, where '{p.name}' is a keyword; declare it 'static {p.name}' or choose another "
                "name",
                p.loc,
            )
        result.append(ParamDecl(p.name, type_, default, p.loc, static=static))
    return tuple(result)


def _check_dimension_sign(dim: Node, loc: Loc) -> None:
    """A dimension negative for every launch and parameter value makes an input that can never be
    passed (`input x: bool[-5]`): an error here rather than at every call."""
    if any(n.op in (Op.CALL, Op.PATTERN) for n in dim.walk()):
        return  # not inlined yet; value ranges need the expanded expression
    lowest, highest = ValueRanges().of(dim)
    if highest < 0:
        shown = f"{highest}" if lowest == highest else f"at most {highest}"
        raise AttnTypeError(f"a dimension cannot be negative, and this one is {shown}", loc)


class _FnLowerer(_ExprLowerer):
    def __init__(self, program: Program, scope: FileScope, decl: ast.FnDecl) -> None:
        super().__init__(program, scope)
        self.decl = decl
        self.context = f"fn '{decl.name}'"

    def lower(self) -> FnIR:
        params = _params(self.program, self.scope, self.decl.params, self.decl.name)
        for p in params:
            assert p.loc is not None
            self.locals[p.name] = _Local("arg", p.loc, p.type)
        body = self.expr(self.decl.body)
        return FnIR(self.scope.symbol(self.decl.name), params, body, self.decl.loc)


class _PatternLowerer(_ExprLowerer):
    def __init__(self, program: Program, scope: FileScope, decl: ast.PatternDecl) -> None:
        super().__init__(program, scope)
        self.decl = decl
        self.context = f"pattern '{decl.name}'"
        self.inputs: dict[str, ast.InputStmt] = {}
        self.input_decls: dict[str, InputDecl] = {}
        self.let_stmts: dict[str, ast.LetStmt] = {}
        self.lets: dict[str, Node] = {}
        self.let_order: list[str] = []
        self.lets_in_progress: list[str] = []
        self.score_lets: set[str] = set()  # lets that use `s`, directly or through other lets
        self.in_dims = False

    def allow_index_vars(self) -> bool:
        return not self.in_dims

    def _declare(self, name: str, kind: str, loc: Loc, type_: Type | None = None) -> None:
        if name in RESERVED:
            raise DuplicateError(f"'{name}' is a built-in name and cannot be redefined", loc)
        if name in self.locals:
            previous = self.locals[name]
            raise DuplicateError(
                f"'{name}' is already declared as {_article(previous.kind)} at line {previous.loc.line}", loc
            )
        self.locals[name] = _Local(kind, loc, type_)

    def lower(self) -> PatternIR:
        params = _params(
            self.program, self.scope, self.decl.params, self.decl.name, RESERVED_PARAMETER_NAMES, pattern=True
        )
        for p in params:
            assert p.loc is not None
            self._declare(p.name, "param", p.loc, p.type)
        mask_stmt: ast.MaskStmt | None = None
        score_stmt: ast.ScoreStmt | None = None
        for stmt in self.decl.stmts:
            if isinstance(stmt, ast.InputStmt):
                if stmt.name in KERNEL_KEYWORDS:
                    raise DuplicateError(
                        f"'{stmt.name}' is reserved: it is a keyword of kern(...) and its methods, "
                        "so an input of that name could never be passed",
                        stmt.loc,
                    )
                self._declare(stmt.name, "input", stmt.loc)
                self.inputs[stmt.name] = stmt
            elif isinstance(stmt, ast.LetStmt):
                self._declare(stmt.name, "let", stmt.loc)
                self.let_stmts[stmt.name] = stmt
            elif isinstance(stmt, ast.MaskStmt):
                if mask_stmt is not None:
                    raise DuplicateError(f"mask is already given at line {mask_stmt.loc.line}", stmt.loc)
                mask_stmt = stmt
            else:
                if score_stmt is not None:
                    raise DuplicateError(f"score is already given at line {score_stmt.loc.line}", stmt.loc)
                score_stmt = stmt
        for stmt in self.inputs.values():
            self.input_decls[stmt.name] = self._input(stmt)
        roots = [*self._let_references(mask_stmt), *self._let_references(score_stmt)]
        roots += [(name, stmt.loc) for name, stmt in self.let_stmts.items()]
        for name in _post_order(roots, lambda name: self._let_references(self.let_stmts[name]), self._cycle):
            self._let(name, self.let_stmts[name].loc)
        mask = score = None
        if mask_stmt is not None:
            self.context = "mask"
            mask = _to_type(self.expr(mask_stmt.value), Type.BOOL, mask_stmt.value.loc, "mask")
        if score_stmt is not None:
            self.allow_score = True
            self.context = "score"
            value = self.expr(score_stmt.value)
            score = _to_type(value, Type.FLOAT, score_stmt.value.loc, "score")
        return PatternIR(
            self.scope.symbol(self.decl.name),
            params,
            tuple(self.input_decls.values()),
            tuple((n, self.lets[n]) for n in self.let_order),
            mask,
            score,
            None,
            self.decl.loc,
        )

    def _input(self, stmt: ast.InputStmt) -> InputDecl:
        if stmt.dtype not in INPUT_DTYPES:
            raise AttnTypeError(
                f"unknown dtype '{stmt.dtype}'; expected one of {', '.join(INPUT_DTYPES)}", stmt.dtype_loc
            )
        self.in_dims, self.context = True, "an input's shape"
        dims = []
        for dim in stmt.dims:
            value = self.expr(dim)
            if value.type is not Type.INT:
                raise AttnTypeError(f"a dimension must be int, got {value.type}", dim.loc)
            _check_dimension_sign(value, dim.loc)
            dims.append(value)
        self.in_dims = False
        return InputDecl(stmt.name, stmt.dtype, tuple(dims), stmt.loc)

    def _Call(self, e: ast.Call) -> Node:
        # A shape is evaluated before the kernel, from parameters and sizes: `inline` expands no call
        # there, so a fn in a shape is an error here rather than a crash later.
        if self.in_dims and e.func not in BUILTINS and e.func not in self.locals:
            found = self.program.lookup(self.scope, e.func, e.func_loc)
            if found is not None and isinstance(found[1], ast.FnDecl):
                raise AttnTypeError(f"fn '{e.func}' cannot be called in {self.context}", e.func_loc)
        return super()._Call(e)

    def input_decl(self, name: str) -> InputDecl | None:
        if name in self.inputs and self.in_dims:
            raise AttnTypeError(f"input '{name}' cannot be used in an input's shape", self.inputs[name].loc)
        return self.input_decls.get(name)

    def local_ref(self, name: str, loc: Loc) -> Node:
        local = self.locals[name]
        if local.kind == "let":
            if self.in_dims:
                raise AttnTypeError(f"let '{name}' cannot be used in an input's shape", loc)
            value = self._let(name, loc)
            if not self.allow_score and name in self.score_lets:
                if self.context == "mask":
                    raise AttnTypeError(f"let '{name}' uses 's', and {SCORE_IN_MASK}", loc)
                raise AttnTypeError(f"let '{name}' uses 's' (the score), which exists only inside score", loc)
            return Node(Op.REF, value.type, (), name, loc)
        return super().local_ref(name, loc)

    def _let_references(
        self, stmt: ast.LetStmt | ast.MaskStmt | ast.ScoreStmt | None
    ) -> list[tuple[str, Loc]]:
        """The lets a statement refers to, in source order."""
        if stmt is None:
            return []
        return [
            (e.id, e.loc)
            for e in ast.walk([stmt.value])
            if isinstance(e, ast.Name) and e.id in self.let_stmts
        ]

    def _cycle(self, path: list[str], name: str, loc: Loc | None) -> CycleError:
        chain = " -> ".join([*path[path.index(name) :], name])
        return CycleError(f"let '{name}' depends on itself: {chain}", loc)

    def _let(self, name: str, loc: Loc) -> Node:
        if name in self.lets:
            return self.lets[name]
        if name in self.lets_in_progress:
            chain = " -> ".join([*self.lets_in_progress[self.lets_in_progress.index(name) :], name])
            raise CycleError(f"let '{name}' depends on itself: {chain}", loc)
        stmt = self.let_stmts[name]
        self.lets_in_progress.append(name)
        # A let may use `s`; whether that is allowed is checked where it is used.
        saved = self.allow_score, self.context
        self.allow_score, self.context = True, f"let '{name}'"
        try:
            value = self.expr(stmt.value)
        finally:
            self.allow_score, self.context = saved
            self.lets_in_progress.pop()
        if any(n.op is Op.SCORE or (n.op is Op.REF and n.attr in self.score_lets) for n in value.walk()):
            self.score_lets.add(name)
        self.lets[name] = value
        self.let_order.append(name)
        return value
