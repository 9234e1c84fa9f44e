"""The textual form of the IR: SSA-style lines, one per distinct interior node, leaves written inline.

    pattern gemma_local(window: int = 4096, cap: float = 50.0) {
      %0 = sub(q, kv) : int
      let dist = %0
      %1 = lt($dist, $window) : bool
      mask = %1
    }

`ir.parser.parse_module` reads it back to equal nodes (round-trip). A bound pattern's header lists its
static parameters' values in brackets, then its runtime parameters, if any, in parentheses:
`pattern gemma_local[cap=50.0](window: int = 4096) {`; a runtime parameter in an expression is
`!window` (a let or an unbound parameter is `$name`). A parameter declared static shows it:
`pattern dilated(window: int, static dilation: int)`.
"""

from __future__ import annotations

from typing import Any

from attnc.ir.nodes import FnIR, ModuleIR, Node, Op, ParamDecl, PatternIR, Type, format_const
from attnc.ir.results import RANGE_AXES

# Members read on hot paths, as module constants: a read of `Op.X` or `Type.X` costs Python 3.10 and
# 3.11 a call of `EnumType.__getattr__`'s hook (`ir/nodes.py`).
_BOOL = Type.BOOL
_CONST = Op.CONST
_PARAM = Op.PARAM
_REF = Op.REF
_SCORE = Op.SCORE
_SIZE = Op.SIZE
_VAR = Op.VAR

_LEAVES = (Op.CONST, Op.VAR, Op.SIZE, Op.PARAM, Op.SCORE, Op.REF)
_SYMBOL_OPS = (Op.LOAD, Op.CALL, Op.PATTERN, Op.RANGE_MIN, Op.RANGE_MAX, Op.BOUND, Op.REDUCE)
_OPERANDS_PUSHED: Any = object()  # on the printer's stack above a node whose operands are pushed


class _Numbering:
    """Names interior nodes `%0, %1, ...` in the order they are first printed."""

    def __init__(self) -> None:
        self.names: dict[Node, str] = {}
        self.lines: list[str] = []

    def operand(self, node: Node) -> str:
        name = self.names.get(node)
        if name is not None:  # an interior node, named when defined
            return name
        if node.op is _CONST:
            return format_const(node.attr)  # type: ignore[arg-type]
        if node.op in (_VAR, _SIZE):
            return str(node.attr)
        if node.op is _SCORE:
            return "s"
        if node.op is _REF:
            return f"${node.attr}"
        if node.op is _PARAM:
            return f"!{node.attr}"
        return self.names[node]

    def define(self, root: Node) -> str:
        """Emit lines for every not-yet-named interior node under root; return root's operand text."""
        name = self.names.get(root)
        if name is not None:  # (many results' values are named already, or leaves: no walk)
            return name
        if not root.args and root.op in _LEAVES:
            return self.operand(root)
        names, lines, operand = self.names, self.lines, self.operand
        # `root.walk(skip=names.__contains__)`'s order (operands first, left to right, each node once),
        # without its generator and `seen` set: `names` holds the nodes done, and a node is pushed again
        # under `_OPERANDS_PUSHED` once its operands are (in a DAG no other copy of it is on the stack
        # then). Leaves are written inline, never named, so they are not pushed.
        stack: list[Node] = [root]
        pop, push = stack.pop, stack.append
        while stack:
            node = pop()
            if node is _OPERANDS_PUSHED:
                node = pop()
                name = f"%{len(names)}"
                # Most operands are named interior nodes: their names are looked up without a call.
                text = ", ".join([names.get(a) or operand(a) for a in node.args])
                symbol = f" @{node.attr}" if node.op in _SYMBOL_OPS else ""
                # (`_value_`: formatting an op or a type calls its `__str__`, a Python call per line.)
                lines.append(f"  {name} = {node.op._value_}{symbol}({text}) : {node.type._value_}")
                names[node] = name
            elif node not in names:
                push(node)
                push(_OPERANDS_PUSHED)
                for a in reversed(node.args):
                    if a not in names and (a.args or a.op not in _LEAVES):
                        push(a)
        return operand(root)


def _params(params: tuple[ParamDecl, ...]) -> str:
    parts = []
    for p in params:
        default = "" if p.default is None else f" = {format_const(p.default.attr)}"  # type: ignore[arg-type]
        static = "static " if p.static and p.type is not _BOOL else ""  # bools: static always
        parts.append(f"{static}{p.name}: {p.type}{default}")
    return ", ".join(parts)


def print_fn(fn: FnIR) -> str:
    numbering = _Numbering()
    result = numbering.define(fn.body)
    lines = [
        f"fn {fn.name}({_params(fn.params)}) -> {fn.body.type} {{",
        *numbering.lines,
        f"  return {result}",
    ]
    return "\n".join([*lines, "}"])


def pattern_header(pattern: PatternIR) -> str:
    """The first line of `print_pattern`: `pattern NAME[static values](runtime parameters) {`. The rest
    of the text does not depend on the name, the bindings or the parameter list."""
    if pattern.bindings is not None:
        header = "[" + ", ".join(f"{n}={format_const(v)}" for n, v in pattern.bindings) + "]"
        if pattern.params:
            header += f"({_params(pattern.params)})"
    else:
        header = f"({_params(pattern.params)})"
    return f"pattern {pattern.name}{header} {{"


def print_pattern(pattern: PatternIR) -> str:
    return f"{pattern_header(pattern)}\n{pattern_body(pattern)}"


def pattern_body(pattern: PatternIR) -> str:
    """`print_pattern`'s text after its header line: the pattern's declarations, values and results,
    whatever its name, bindings and parameter list."""
    numbering = _Numbering()
    for decl in pattern.inputs:
        dims = [numbering.define(d) for d in decl.dims]
        numbering.lines.append(f"  input {decl.name}: {decl.dtype}[{', '.join(dims)}]")
    for name, value in pattern.lets:
        numbering.lines.append(f"  let {name} = {numbering.define(value)}")
    if pattern.mask is not None:
        numbering.lines.append(f"  mask = {numbering.define(pattern.mask)}")
    if pattern.score is not None:
        numbering.lines.append(f"  score = {numbering.define(pattern.score)}")
    _results(numbering, pattern)
    return "\n".join([*numbering.lines, "}"])


def _fields(numbering: _Numbering, values: dict[str, Node | None]) -> str:
    """`name = operand, ...` (`none` for an absent value), every value defined first, in this order."""
    return ", ".join(
        f"{name} = {'none' if value is None else numbering.define(value)}" for name, value in values.items()
    )


def _results(numbering: _Numbering, pattern: PatternIR) -> None:
    """The lines of the analyses' typed results (`ir/results.py`), in the order the passes set them."""
    lines = numbering.lines
    if pattern.tiles is not None:
        lines.append(f"  tiles {_fields(numbering, pattern.tiles.named())}")
    if pattern.ranges is not None:
        lines.append(f"  ranges conjuncts = {pattern.ranges.conjuncts}")
        for axis in RANGE_AXES:
            for j, r in enumerate(pattern.ranges.axis(axis)):
                lines.append(f"  range {axis} {j}: {_fields(numbering, r.named())}")
    if pattern.kernel is not None:
        kernel = pattern.kernel
        values = {"mask": kernel.mask, "score": kernel.score, "dscore": kernel.dscore}
        lines.append(f"  kernel {_fields(numbering, values)}")
        for k, g in enumerate(kernel.gradients):
            lines.append(f"  kernel grad {k}: {_fields(numbering, {'load': g.load, 'value': g.value})}")
    if pattern.sparsity is not None:
        lines.append(f"  sparsity {pattern.sparsity}")


def print_module(module: ModuleIR) -> str:
    """The whole module: fns, then patterns, the entry pattern last."""
    parts = [print_fn(f) for f in module.fns] + [print_pattern(p) for p in module.patterns]
    return "\n\n".join(parts) + "\n"
