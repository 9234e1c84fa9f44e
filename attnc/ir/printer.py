"""The textual form of the IR: SSA-style lines, one per distinct interior node, leaves written inline.

    pattern gemma_local(window: int = 4096, cap: float = 50.0) {
      %0 = sub(q, kv) : int
      let dist = %0
      %1 = lt($dist, $window) : bool
      mask = %1
    }

`ir.parser.parse_module` reads it back to equal nodes (round-trip). A bound pattern's header lists its
parameter values in brackets: `pattern gemma_local[window=512, cap=50.0] {`.
"""

from __future__ import annotations

from attnc.ir.nodes import FnIR, ModuleIR, Node, Op, ParamDecl, PatternIR, format_const

_LEAVES = (Op.CONST, Op.VAR, Op.SIZE, Op.SCORE, Op.REF)
_SYMBOL_OPS = (Op.LOAD, Op.CALL, Op.PATTERN, Op.RANGE_MIN, Op.RANGE_MAX)


class _Numbering:
    """Names interior nodes `%0, %1, ...` in the order they are first printed."""

    def __init__(self) -> None:
        self.names: dict[Node, str] = {}
        self.lines: list[str] = []

    def operand(self, node: Node) -> str:
        if node.op is Op.CONST:
            return format_const(node.attr)  # type: ignore[arg-type]
        if node.op in (Op.VAR, Op.SIZE):
            return str(node.attr)
        if node.op is Op.SCORE:
            return "s"
        if node.op is Op.REF:
            return f"${node.attr}"
        return self.names[node]

    def define(self, root: Node) -> str:
        """Emit lines for every not-yet-named interior node under root; return root's operand text."""
        for node in root.walk(skip=self.names.__contains__):  # named: printed with its operands
            if node.op in _LEAVES:
                continue
            name = f"%{len(self.names)}"
            args = ", ".join(self.operand(a) for a in node.args)
            symbol = f" @{node.attr}" if node.op in _SYMBOL_OPS else ""
            self.lines.append(f"  {name} = {node.op}{symbol}({args}) : {node.type}")
            self.names[node] = name
        return self.operand(root)


def _params(params: tuple[ParamDecl, ...]) -> str:
    parts = []
    for p in params:
        default = "" if p.default is None else f" = {format_const(p.default.attr)}"  # type: ignore[arg-type]
        parts.append(f"{p.name}: {p.type}{default}")
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


def print_pattern(pattern: PatternIR) -> str:
    if pattern.bindings is not None:
        header = "[" + ", ".join(f"{n}={format_const(v)}" for n, v in pattern.bindings) + "]"
    else:
        header = f"({_params(pattern.params)})"
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
    for name, value in pattern.derived:
        numbering.lines.append(f"  derive {name} = {numbering.define(value)}")
    if pattern.sparsity is not None:
        numbering.lines.append(f"  sparsity {pattern.sparsity}")
    return "\n".join([f"pattern {pattern.name}{header} {{", *numbering.lines, "}"])


def print_module(module: ModuleIR) -> str:
    """The whole module: fns, then patterns, the entry pattern last."""
    parts = [print_fn(f) for f in module.fns] + [print_pattern(p) for p in module.patterns]
    return "\n\n".join(parts) + "\n"
