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
    const,
    infer_type,
    walk_all,
)
from attnc.ir.printer import print_module
from attnc.ir.results import METADATA_AXES, RANGE_AXES, KernelValues, Sparsity

# Members read on hot paths, as module constants: a read of `Op.X` or `Type.X` costs Python 3.10 and
# 3.11 a call of `EnumType.__getattr__`'s hook (`ir/nodes.py`).
_BOOL = Type.BOOL
_CALL = Op.CALL
_CONST = Op.CONST
_FLOAT = Type.FLOAT
_INT = Type.INT
_LOAD = Op.LOAD
_PARAM = Op.PARAM
_PATTERN = Op.PATTERN
_RANGE_MAX = Op.RANGE_MAX
_RANGE_MIN = Op.RANGE_MIN
_REF = Op.REF
_SCORE = Op.SCORE
_SIZE = Op.SIZE
_VAR = Op.VAR

# What each typed result (`ir/results.py`) may read: the tile box of its own kind, b, h (and the sizes,
# runtime parameters and inputs, which every expression may); a kernel value, the positions and `s`.
_TILES_READ = frozenset({*TILE_VARS, "b", "h"})
_RANGE_READ = {
    "kv": frozenset({"q_first", "q_last", "b", "h"}),
    "q": frozenset({"kv_first", "kv_last", "b", "h"}),
}
_KERNEL_READ = frozenset({*INDEX_VARS, "s"})


_CONTEXTUAL = (Op.VAR, Op.SCORE, Op.PARAM, Op.REF, Op.LOAD, Op.RANGE_MIN, Op.RANGE_MAX, Op.CALL, Op.PATTERN)
"""The ops whose check in `_Verifier.one` depends on where the expression stands (the tile variables and
the score are allowed in some expressions only, names resolve against a scope or a declaration)."""
_DECLARED = frozenset((Op.CONST, Op.SIZE, *_CONTEXTUAL))
"""The ops `_Verifier.one` checks against a declaration, a scope or a set of names; the others' nodes
are typed by their op's rule (and found in this set without reading `Op`'s members one by one, which
costs Python 3.10 and 3.11 a call each: `ir/nodes.py`)."""
_SYMBOLS = "_verified_symbols"
"""On an interned node that passed `one` with everything under it: the (interned) nodes of `_CONTEXTUAL`
ops under it; not itself, which would keep it alive until a garbage collection (its users add it)."""


class _Verifier:
    def __init__(self, module: ModuleIR, previous: ModuleIR | None = None) -> None:
        self.module = module
        # The module of the stage before, verified: a pattern's values that a pass left as they were
        # (the same objects, in the same declarations) are not checked again.
        self.previous = {p.name: p for p in previous.patterns} if previous is not None else {}
        self.errors: list[str] = []
        self.tile_vars = False  # whether the expression being checked may use the tile box variables
        self.runtime: dict[str, Type] = {}  # the runtime parameters of the bound pattern being checked
        self.let_reads: dict[str, frozenset[str]] = {}  # per let of the pattern: the variables it reads

    def fail(self, where: str, reason: str) -> None:
        self.errors.append(f"{where}: {reason}")

    def node(
        self, where: str, node: Node, refs: dict[str, Type], pattern: PatternIR | None, allow_score: bool
    ) -> None:
        """Check every node of the expression (`one`). A node that passed, over operands that did, is
        marked (`_SYMBOLS`) and never walked again, in any verification: what `one` checks of it
        depends only on the node, except for its symbols (variables, the score, parameters, refs,
        loads, calls), whose meaning depends on where the expression stands, so those are checked
        again in each context, and the mark keeps them."""
        twin = node.canonical
        marks = twin.__dict__.get(_SYMBOLS)
        if marks is not None:  # marked itself (most values a pass left as they were): its symbols only
            own = set(marks)
            if node.op in _CONTEXTUAL:
                own.add(twin)
            for symbol in own:
                self.one(where, symbol, refs, pattern, allow_score)
            return
        boundary: list[frozenset[Node]] = []
        symbols: set[Node] = set()  # the marked nodes' symbols, themselves included if contextual

        # The interned twin is walked: what `one` checks is the same of a located node and its twin,
        # and interned nodes hash, compare and carry their marks without a Python call.
        def marked(n: Node) -> bool:
            below = n.__dict__.get(_SYMBOLS)
            if below is None:
                return False
            boundary.append(below)
            if n.op in _CONTEXTUAL:
                symbols.add(n)
            return True

        walked: set[Node] = set()
        for n in twin.walk(skip=marked):
            failures = len(self.errors)
            self.one(where, n, refs, pattern, allow_score)
            walked.add(n)
            if len(self.errors) != failures:
                continue
            below: set[Node] | None = set()  # the operands' marks and contextual selves, if all are marked
            for a in n.args:
                marks = a.__dict__.get(_SYMBOLS)
                if marks is None:
                    below = None
                    break
                below |= marks
                if a.op in _CONTEXTUAL:
                    below.add(a)
            if below is not None:
                object.__setattr__(n, _SYMBOLS, frozenset(below))
        symbols.update(*boundary)
        for symbol in symbols - walked:
            self.one(where, symbol, refs, pattern, allow_score)

    def one(
        self, where: str, n: Node, refs: dict[str, Type], pattern: PatternIR | None, allow_score: bool
    ) -> None:
        op = n.op
        if op not in _DECLARED:  # most nodes: an interior op, typed by its rule
            inferred = infer_type(op, n.args, n.attr) if op in OPS else None
            if inferred is None:
                self.fail(where, f"unknown op {op}")
            elif inferred is not n.type:
                self.fail(where, f"{op} typed {n.type}, rule gives {inferred}")
        elif op is _CONST:
            expected = {bool: _BOOL, int: _INT, float: _FLOAT}.get(type(n.attr))
            if expected is not n.type:
                self.fail(where, f"constant {n.attr!r} typed {n.type}")
        elif op is _VAR:
            allowed = INDEX_VARS + TILE_VARS if self.tile_vars else INDEX_VARS
            if n.attr not in allowed or n.type is not _INT:
                self.fail(where, f"bad index variable {n.attr!r}")
        elif op is _SIZE:
            if n.attr not in SIZES or n.type is not _INT:
                self.fail(where, f"bad size {n.attr!r}")
        elif op is _PARAM:
            if self.runtime.get(str(n.attr)) is not n.type:
                self.fail(where, f"!{n.attr} is not a {n.type} runtime parameter of a bound pattern")
        elif op is _SCORE:
            if not allow_score or n.type is not _FLOAT:
                self.fail(where, "the score s used outside score")
        elif op is _REF:
            if refs.get(str(n.attr)) is not n.type:
                self.fail(where, f"${n.attr} does not name a {n.type} in scope")
        elif op is _LOAD:
            decl = pattern.input(str(n.attr)) if pattern is not None else None
            if decl is None:
                self.fail(where, f"load of undeclared input @{n.attr}")
            elif len(n.args) != len(decl.dims) or n.type is not decl.type:
                self.fail(where, f"load @{n.attr} does not match its declaration")
            if any(a.type is not _INT for a in n.args):
                self.fail(where, f"load @{n.attr} with a non-int index")
        elif op in (_RANGE_MIN, _RANGE_MAX):
            decl = pattern.input(str(n.attr)) if pattern is not None else None
            if not self.tile_vars:
                self.fail(where, f"{op} outside the tile analyses' results")
            if decl is None:
                self.fail(where, f"{op} of undeclared input @{n.attr}")
            elif len(n.args) != 2 * len(decl.dims) or n.type is not decl.type or decl.type is _FLOAT:
                self.fail(where, f"{op} @{n.attr} does not match its declaration")
            if any(a.type is not _INT for a in n.args):
                self.fail(where, f"{op} @{n.attr} with a non-int bound")
        elif op in (_CALL, _PATTERN):
            callee: FnIR | PatternIR | None = (
                self.module.fn(str(n.attr)) if op is _CALL else self.module.pattern(str(n.attr))
            )
            if callee is None:
                self.fail(where, f"{op} of unknown @{n.attr}")
                return
            types = tuple(p.type for p in callee.params)
            result = callee.body.type if isinstance(callee, FnIR) else _BOOL
            if tuple(a.type for a in n.args) != types or n.type is not result:
                self.fail(where, f"{op} @{n.attr} does not match its signature")

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
        bound = pattern.bindings is not None
        if bound and any(p.static for p in pattern.params):
            self.fail(where, "a bound pattern's parameters must be its runtime ones, not static")
        if bound and {n for n, _ in pattern.bindings or ()} & {p.name for p in pattern.params}:
            self.fail(where, "a parameter is both bound and runtime")
        self.params(where, pattern.params)
        # Before `bind-params` parameters are refs; after it the runtime ones are `!name` leaves.
        refs = {} if bound else {p.name: p.type for p in pattern.params}
        self.runtime = {p.name: p.type for p in pattern.params} if bound else {}
        names = (
            [p.name for p in pattern.params] + [i.name for i in pattern.inputs] + [n for n, _ in pattern.lets]
        )
        if len(set(names)) != len(names):
            self.fail(where, "a name is declared twice")
        for decl in pattern.inputs:
            for dim in decl.dims:
                self.node(where, dim, refs, pattern, allow_score=False)
                if dim.type is not _INT or any(n.op in (_VAR, _LOAD, _SCORE) for n in dim.walk()):
                    self.fail(where, f"shape of input {decl.name} is not an int of parameters and sizes")
        score_lets: set[str] = set()
        for name, value in pattern.lets:
            self.node(where, value, refs, pattern, allow_score=True)
            if any(n.op is _SCORE or (n.op is _REF and n.attr in score_lets) for n in value.walk()):
                score_lets.add(name)
            refs[name] = value.type
        if pattern.mask is not None:
            self.node(where, pattern.mask, refs, pattern, allow_score=False)
            if pattern.mask.type is not _BOOL:
                self.fail(where, "mask is not bool")
            if score_lets and any(n.op is _REF and n.attr in score_lets for n in pattern.mask.walk()):
                self.fail(where, "mask uses a let that uses the score")
        if pattern.score is not None:
            self.node(where, pattern.score, refs, pattern, allow_score=True)
            if pattern.score.type is not _FLOAT:
                self.fail(where, "score is not float")
        self.results(where, pattern, refs)

    def result(
        self,
        where: str,
        what: str,
        value: Node,
        type_: Type,
        may_read: frozenset[str],
        refs: dict[str, Type],
        pattern: PatternIR,
    ) -> None:
        """One expression of a typed result: its nodes, its type and the variables it reads."""
        self.node(where, value, refs, pattern, allow_score="s" in may_read)
        if value.type is not type_:
            self.fail(where, f"{what} is not {type_}")
        extra = self.reads(value) - may_read
        if extra:
            self.fail(where, f"{what} reads {', '.join(sorted(extra))}")

    def reads(self, value: Node) -> frozenset[str]:
        """The variables the value reads, through the lets it refers to (found among the symbols `node`
        marked on a verified value, without walking it again)."""
        if not self.let_reads:
            return value.free
        symbols = value.canonical.__dict__.get(_SYMBOLS)
        found = set(value.free)
        for n in value.walk() if symbols is None else symbols:
            if n.op is _REF and str(n.attr) in self.let_reads:
                found |= self.let_reads[str(n.attr)]
        return frozenset(found)

    def _unchanged(self, pattern: PatternIR, *fields: str) -> bool:
        """Whether the previous stage's pattern of this name, verified, had these very fields, in the
        same declarations (what their check depends on besides themselves). Lets may have been added
        (`fuse` hoists rows into lets): a value that checked without them refers to none of them, so
        it checks with them too, and reads what it read."""
        before = self.previous.get(pattern.name)
        if before is None or not all(getattr(before, f) is getattr(pattern, f) for f in fields):
            return False
        context = ("params", "inputs", "bindings")
        if not all(getattr(before, f) == getattr(pattern, f) for f in context):
            return False
        return before.lets == pattern.lets[: len(before.lets)]

    def results(self, where: str, pattern: PatternIR, refs: dict[str, Type]) -> None:
        """The analyses' typed results: what each may read, their types, and that they agree."""
        self.let_reads = {}
        for name, value in pattern.lets:
            self.let_reads[name] = self.reads(value)
        self.tile_vars = True
        if pattern.tiles is not None and not self._unchanged(pattern, "tiles"):
            for part, value in pattern.tiles.named().items():
                self.result(where, f"tiles {part}", value, _BOOL, _TILES_READ, refs, pattern)
        if pattern.ranges is not None and not self._unchanged(pattern, "ranges"):
            kv, q = pattern.ranges.kv, pattern.ranges.q
            if len(kv) != len(q):
                self.fail(where, f"ranges have {len(kv)} kv conjuncts and {len(q)} q conjuncts")
            for axis in RANGE_AXES:
                for j, r in enumerate(pattern.ranges.axis(axis)):
                    for part, value in r.named().items():
                        what = f"range {axis} {j} {part}"
                        self.result(where, what, value, _INT, _RANGE_READ[axis], refs, pattern)
        self.tile_vars = False
        if pattern.kernel is not None and not self._unchanged(pattern, "kernel", "mask", "score"):
            self.kernel(where, pattern, pattern.kernel, refs)
        if pattern.sparsity is not None and not self._unchanged(pattern, "sparsity", "tiles", "ranges"):
            self.sparsity(where, pattern, pattern.sparsity)

    def kernel(self, where: str, pattern: PatternIR, kernel: KernelValues, refs: dict[str, Type]) -> None:
        if kernel.mask is not None:
            self.result(where, "kernel mask", kernel.mask, _BOOL, _KERNEL_READ - {"s"}, refs, pattern)
        for name, value in (("score", kernel.score), ("dscore", kernel.dscore)):
            if value is not None:
                self.result(where, f"kernel {name}", value, _FLOAT, _KERNEL_READ, refs, pattern)
        # `fuse` gives the kernel a mask exactly when the pattern's mask is not `true`, a score exactly
        # when it is not `s`: without them the kernel would compute another pattern.
        has_mask = pattern.mask is not None and pattern.mask != const(True)
        has_score = pattern.score is not None and pattern.score.op is not _SCORE
        for name, needed, value in (("mask", has_mask, kernel.mask), ("score", has_score, kernel.score)):
            if needed and value is None:
                self.fail(where, f"kernel {name} missing for a pattern with a {name}")
            elif value is not None and not needed:
                self.fail(where, f"kernel {name} for a pattern without a {name}")
        if kernel.dscore is not None and kernel.score is None:
            self.fail(where, "kernel dscore for a kernel without a score (d s / d s is 1)")
        lets = dict(pattern.lets)
        # A gradient is d score / d load for one load the kernel's score reads: the backward adds it to
        # that input's gradient, so one of a load the score does not read, or two of one load, would
        # give the input a gradient the pattern does not have.
        read = _read_through_lets(kernel.score, lets) if kernel.gradients else set()
        loads: dict[Node, int] = {}
        for k, gradient in enumerate(kernel.gradients):
            what = f"kernel grad {k} value"
            self.result(where, what, gradient.value, _FLOAT, _KERNEL_READ, refs, pattern)
            self.node(where, gradient.load, refs, pattern, allow_score=False)
            load = gradient.input_load(lets)
            decl = pattern.input(str(load.attr)) if load.op is _LOAD else None
            if decl is None or decl.type is not _FLOAT:
                self.fail(where, f"kernel grad {k} load is not a load of a float input")
            if gradient.load not in read:
                self.fail(where, f"kernel grad {k} load is not read by the kernel score")
            if load in loads:
                self.fail(where, f"kernel grad {k} load is kernel grad {loads[load]}'s too")
            loads.setdefault(load, k)

    def sparsity(self, where: str, pattern: PatternIR, sparsity: Sparsity) -> None:
        if sparsity.kind not in ("analytic", "metadata"):
            self.fail(where, f"unknown sparsity kind {sparsity.kind!r}")
        elif sparsity.analytic and pattern.ranges is None:
            self.fail(where, "sparsity analytic without ranges")
        elif not sparsity.analytic and pattern.ranges is not None:
            self.fail(where, "sparsity metadata for a mask with ranges")
        if sparsity.analytic and sparsity.axes:
            self.fail(where, f"sparsity analytic with axes {list(sparsity.axes)}")
        if sparsity.axes != tuple(a for a in METADATA_AXES if a in sparsity.axes):
            self.fail(where, f"sparsity axes must be b and/or h, in that order, got {list(sparsity.axes)}")
        if sparsity.kind == "metadata":
            if pattern.tiles is None:
                self.fail(where, "sparsity metadata without tile classes")
                return
            read = self.reads(pattern.tiles.any) | self.reads(pattern.tiles.all)
            missing = [a for a in METADATA_AXES if a in read and a not in sparsity.axes]
            if missing:
                self.fail(where, f"sparsity {sparsity} is not per {', '.join(missing)}, which the tiles read")

    def module_(self) -> None:
        names = [f.name for f in self.module.fns] + [p.name for p in self.module.patterns]
        if len(set(names)) != len(names):
            self.fail("module", "a symbol is defined twice")
        for fn in self.module.fns:
            self.fn(fn)
        for pattern in self.module.patterns:
            self.pattern(pattern)


def _read_through_lets(value: Node | None, lets: dict[str, Node]) -> set[Node]:
    """The nodes of `value` and of the lets it refers to, directly or through other lets."""
    read: set[Node] = set()
    roots = [] if value is None else [value]
    while roots:
        fresh = list(walk_all(roots, skip=read.__contains__))
        read.update(fresh)
        roots = [lets[str(n.attr)] for n in fresh if n.op is _REF and str(n.attr) in lets]
    return read


def verify(module: ModuleIR, after: str = "", previous: ModuleIR | None = None) -> None:
    """Raise `InternalError` (with the IR text) if the module breaks an IR invariant. `previous`, a
    verified module the pass made this one of: the results it left as they were are not checked again."""
    verifier = _Verifier(module, previous)
    verifier.module_()
    if verifier.errors:
        stage = f" after {after}" if after else ""
        raise InternalError(
            f"IR verification failed{stage}:\n  " + "\n  ".join(verifier.errors) + "\n" + print_module(module)
        )
