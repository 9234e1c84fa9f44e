"""The IR verifier: checks every node's type by its op's rule and every name against its declaration.

A failure is a bug in attnc (a pass broke an invariant), reported as `InternalError` with the IR text.
"""

from __future__ import annotations

from attnc.errors import InternalError
from attnc.ir.nodes import (
    INDEX_VARS,
    OPS,
    SIZES,
    TILE_VARS,
    FnIR,
    ModuleIR,
    Node,
    Op,
    PatternIR,
    Type,
    infer_type,
)
from attnc.ir.printer import print_module

SPARSITY_KINDS = ("analytic", "metadata", "metadata[b]", "metadata[h]", "metadata[b, h]")
SCORE_DERIVED = ("kernel_score", "kernel_dscore", "kernel_grad_")
"""Derived values that are functions of the score `s`, by name or name prefix (the others are functions
of the mask's inputs)."""


class _Verifier:
    def __init__(self, module: ModuleIR) -> None:
        self.module = module
        self.errors: list[str] = []
        self.tile_vars = False  # whether the expression being checked may use the tile box variables

    def fail(self, where: str, reason: str) -> None:
        self.errors.append(f"{where}: {reason}")

    def node(
        self, where: str, node: Node, refs: dict[str, Type], pattern: PatternIR | None, allow_score: bool
    ) -> None:
        for n in node.walk():
            self.one(where, n, refs, pattern, allow_score)

    def one(
        self, where: str, n: Node, refs: dict[str, Type], pattern: PatternIR | None, allow_score: bool
    ) -> None:
        op = n.op
        if op not in OPS:
            self.fail(where, f"unknown op {op}")
        elif op is Op.CONST:
            expected = {bool: Type.BOOL, int: Type.INT, float: Type.FLOAT}.get(type(n.attr))
            if expected is not n.type:
                self.fail(where, f"constant {n.attr!r} typed {n.type}")
        elif op is Op.VAR:
            allowed = INDEX_VARS + TILE_VARS if self.tile_vars else INDEX_VARS
            if n.attr not in allowed or n.type is not Type.INT:
                self.fail(where, f"bad index variable {n.attr!r}")
        elif op is Op.SIZE:
            if n.attr not in SIZES or n.type is not Type.INT:
                self.fail(where, f"bad size {n.attr!r}")
        elif op is Op.SCORE:
            if not allow_score or n.type is not Type.FLOAT:
                self.fail(where, "the score s used outside score")
        elif op is Op.REF:
            if refs.get(str(n.attr)) is not n.type:
                self.fail(where, f"${n.attr} does not name a {n.type} in scope")
        elif op is Op.LOAD:
            decl = pattern.input(str(n.attr)) if pattern is not None else None
            if decl is None:
                self.fail(where, f"load of undeclared input @{n.attr}")
            elif len(n.args) != len(decl.dims) or n.type is not decl.type:
                self.fail(where, f"load @{n.attr} does not match its declaration")
            if any(a.type is not Type.INT for a in n.args):
                self.fail(where, f"load @{n.attr} with a non-int index")
        elif op in (Op.RANGE_MIN, Op.RANGE_MAX):
            decl = pattern.input(str(n.attr)) if pattern is not None else None
            if not self.tile_vars:
                self.fail(where, f"{op} outside a derived expression")
            if decl is None:
                self.fail(where, f"{op} of undeclared input @{n.attr}")
            elif len(n.args) != 2 * len(decl.dims) or n.type is not decl.type or decl.type is Type.FLOAT:
                self.fail(where, f"{op} @{n.attr} does not match its declaration")
            if any(a.type is not Type.INT for a in n.args):
                self.fail(where, f"{op} @{n.attr} with a non-int bound")
        elif op in (Op.CALL, Op.PATTERN):
            callee: FnIR | PatternIR | None = (
                self.module.fn(str(n.attr)) if op is Op.CALL else self.module.pattern(str(n.attr))
            )
            if callee is None:
                self.fail(where, f"{op} of unknown @{n.attr}")
                return
            types = tuple(p.type for p in callee.params)
            result = callee.body.type if isinstance(callee, FnIR) else Type.BOOL
            if tuple(a.type for a in n.args) != types or n.type is not result:
                self.fail(where, f"{op} @{n.attr} does not match its signature")
        else:
            inferred = infer_type(op, n.args, n.attr)
            if inferred is not n.type:
                self.fail(where, f"{op} typed {n.type}, rule gives {inferred}")

    def fn(self, fn: FnIR) -> None:
        refs = {p.name: p.type for p in fn.params}
        self.params(fn.name, fn.params)
        self.node(f"fn {fn.name}", fn.body, refs, None, allow_score=False)

    def params(self, owner: str, params) -> None:
        for p in params:
            if p.default is not None and (not p.default.is_const or p.default.type is not p.type):
                self.fail(owner, f"default of {p.name} is not a {p.type} constant")

    def pattern(self, pattern: PatternIR) -> None:
        where = f"pattern {pattern.name}"
        if pattern.bindings is not None and pattern.params:
            self.fail(where, "both parameters and bindings")
        self.params(where, pattern.params)
        refs = {p.name: p.type for p in pattern.params}
        names = (
            [p.name for p in pattern.params] + [i.name for i in pattern.inputs] + [n for n, _ in pattern.lets]
        )
        if len(set(names)) != len(names):
            self.fail(where, "a name is declared twice")
        for decl in pattern.inputs:
            for dim in decl.dims:
                self.node(where, dim, refs, pattern, allow_score=False)
                if dim.type is not Type.INT or any(n.op in (Op.VAR, Op.LOAD, Op.SCORE) for n in dim.walk()):
                    self.fail(where, f"shape of input {decl.name} is not an int of parameters and sizes")
        score_lets: set[str] = set()
        for name, value in pattern.lets:
            self.node(where, value, refs, pattern, allow_score=True)
            if any(n.op is Op.SCORE or (n.op is Op.REF and n.attr in score_lets) for n in value.walk()):
                score_lets.add(name)
            refs[name] = value.type
        if pattern.mask is not None:
            self.node(where, pattern.mask, refs, pattern, allow_score=False)
            if pattern.mask.type is not Type.BOOL:
                self.fail(where, "mask is not bool")
            if any(n.op is Op.REF and n.attr in score_lets for n in pattern.mask.walk()):
                self.fail(where, "mask uses a let that uses the score")
        if pattern.score is not None:
            self.node(where, pattern.score, refs, pattern, allow_score=True)
            if pattern.score.type is not Type.FLOAT:
                self.fail(where, "score is not float")
        derived_names = [n for n, _ in pattern.derived]
        if len(set(derived_names)) != len(derived_names):
            self.fail(where, "a derived value is named twice")
        self.tile_vars = True
        for name, value in pattern.derived:
            self.node(where, value, refs, pattern, allow_score=name.startswith(SCORE_DERIVED))
        self.tile_vars = False
        if pattern.sparsity is not None and pattern.sparsity not in SPARSITY_KINDS:
            self.fail(where, f"unknown sparsity {pattern.sparsity!r}")

    def module_(self) -> None:
        names = [f.name for f in self.module.fns] + [p.name for p in self.module.patterns]
        if len(set(names)) != len(names):
            self.fail("module", "a symbol is defined twice")
        for fn in self.module.fns:
            self.fn(fn)
        for pattern in self.module.patterns:
            self.pattern(pattern)


def verify(module: ModuleIR, after: str = "") -> None:
    """Raise `InternalError` (with the IR text) if the module breaks an IR invariant."""
    verifier = _Verifier(module)
    verifier.module_()
    if verifier.errors:
        stage = f" after {after}" if after else ""
        raise InternalError(
            f"IR verification failed{stage}:\n  " + "\n  ".join(verifier.errors) + "\n" + print_module(module)
        )
