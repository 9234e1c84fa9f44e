"""`lower-triton`: a fused pattern to its `KernelSpec`, and the spec rendered into Triton source.

The last stage of the pipeline. `build_spec` reads what the earlier passes decided — the kernel values
and hoisted lets of `fuse`, the sparsity of `block-sparsify`, the closed-form ranges of
`derive-ranges` — and turns every expression into Triton statements (`emit.py`). `render` places the
spec in the Jinja templates (`templates/*.py.jinja`, `StrictUndefined`: a name the template uses and
the spec lacks is an error, never an empty string); each kind of tile is a tile function whose
parameters are the names its statements read (`tile_parameters`). `checked_code` is how the source
becomes code: one parse with Python's parser, before Triton ever sees it, checking that it defines
exactly the template's kernels, constants, helpers and tile functions, that each tile function takes
every name it reads, and that no name but the inputs' parameters lies in the inputs' namespace, then
compiled from that tree. No name of the pattern is rendered (the spec holds none), so
patterns of one structure share one source.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from types import CodeType

import jinja2

from attnc.analysis.normal_form import value_ranges
from attnc.analysis.value_ranges import ValueRanges, fits_int32
from attnc.codegen.emit import (
    FP32,
    INT32,
    INT64,
    Assign,
    Emitter,
    covered_sizes,
    expand_blocks,
    float64_nodes,
    foldable_scale,
    input_arg,
    param_arg,
)
from attnc.codegen.gather import TileAxis
from attnc.codegen.spec import (
    INPUT_NAMESPACES,
    PARAM_NAMESPACE,
    BackwardSpec,
    Body,
    InputArg,
    InputGrad,
    KernelSpec,
    KeyRange,
    ParamArg,
)
from attnc.errors import InternalError
from attnc.ir.nodes import Node, Op, PatternIR
from attnc.ir.results import KernelValues, Sparsity, differentiable_inputs, grad_loads

TEMPLATES = Path(__file__).parent / "templates"

# What the names of the IR are called in the kernel (see the templates' header comments).
KERNEL_NAMES = {
    "q": "q_idx",
    "kv": "kv_idx",
    "b": "b_idx",
    "h": "h_idx",
    "q_first": "q_first",
    "q_last": "q_last",
    "kv_first": "kv_first",
    "kv_last": "kv_last",
    "BATCH": "BATCH",
    "NUM_HEADS": "NUM_HEADS",
    "Q_LEN": "Q_LEN",
    "KV_LEN": "KV_LEN",
    "s": "s",
}

# How q and kv run over the tile of each kernel's tile functions, in their names (`gather.TileAxis`):
# the tile's first position, its size, and when tiles start at multiples of their size (positions
# shifted by no offset) and hold consecutive positions (the forward's packed GQA rows wrap around).
_Q_ALIGNED, _KV_ALIGNED = "(SHIFTED == 0) & (ROW_OFFSETS == 0)", "SHIFTED == 0"
# The forward's keys lie inside the rows in its FULL tiles and in the PARTIAL ones but the tile the rows
# may cut (CHECK_ROWS: `attention_fwd.py.jinja`).
FORWARD_TILES = {
    "q": TileAxis("q_first", "BLOCK_M", _Q_ALIGNED, "PACK_GQA == 0"),
    "kv": TileAxis(
        "(start_n + kv_shift)", "BLOCK_N", _KV_ALIGNED, inside="not CHECK_ROWS", offsets="offs_n[None, :]"
    ),
}
FORWARD_FULL_TILES = {**FORWARD_TILES, "kv": replace(FORWARD_TILES["kv"], inside="True")}
DQ_TILES = {
    "q": TileAxis("q_first", "BLOCK_M", _Q_ALIGNED),
    "kv": TileAxis("(start_n + kv_shift)", "BLOCK_N", _KV_ALIGNED, offsets="offs_n[None, :]"),
}
DKV_TILES = {
    "q": TileAxis("q_first", "BLOCK_M", _Q_ALIGNED),
    "kv": TileAxis("kv_first", "BLOCK_N", _KV_ALIGNED),
}


def _scalar(emitter: Emitter, node: Node) -> str:
    """A prologue value that must be a tensor (constants become typed scalars)."""
    if node.op is Op.CONST:
        dtype = INT32 if fits_int32((int(node.attr), int(node.attr))) else INT64  # type: ignore[arg-type]
        return f"tl.full([], {int(node.attr)}, {dtype})"  # type: ignore[arg-type]
    return emitter.value(node)


def _bind(emitter: Emitter, name: str, node: Node, value: Callable[[Node], str]) -> None:
    """The statement `name = <the node's value>` (`value` computes it) of the emitter; where computing
    it appended a line whose temporary is the value, that line assigns `name` instead: one statement,
    not a temporary and its copy (nothing reads the temporary yet: it was the last line made, and it
    does not read itself, as a reduction's accumulator does in its loop)."""
    lines = emitter.lines
    count = len(lines)
    text = value(node)
    if len(lines) > count and lines[-1].target == text and not re.search(rf"\b{text}\b", lines[-1].value):
        lines[-1] = Assign(name, lines[-1].value)
        for known, known_text in emitter.names.items():
            if known_text == text:
                emitter.names[known] = name
    else:
        lines.append(Assign(name, text))


def _check_fused(pattern: PatternIR) -> tuple[KernelValues, Sparsity]:
    """The kernel values and sparsity of a pattern compiled through `block-sparsify` and `fuse`."""
    if pattern.sparsity is None or pattern.kernel is None:
        raise InternalError("lower-triton runs after block-sparsify and fuse")
    return pattern.kernel, pattern.sparsity


def _lets_used(pattern: PatternIR, roots: list[Node]) -> list[str]:
    """The lets the roots refer to, directly or through other lets, in the pattern's order."""
    lets = dict(pattern.lets)
    used: set[str] = set()
    stack = list(roots)
    while stack:
        for n in stack.pop().walk():
            if n.op is Op.REF and str(n.attr) in lets and str(n.attr) not in used:
                used.add(str(n.attr))
                stack.append(lets[str(n.attr)])
    return [name for name, _ in pattern.lets if name in used]


def _depends(node: Node, name: str, lets: dict[str, Node]) -> bool:
    """Whether the value reads the index variable `name` (or, for "s", the score), following lets.
    `Node.free` answers for each value; only the lets it refers to are looked for, each node once."""
    stack, seen = [node], set()
    while stack:
        value = stack.pop()
        if name in value.free:
            return True
        if lets:
            for n in value.walk(skip=seen.__contains__):
                seen.add(n)
                if n.op is Op.REF and str(n.attr) in lets:
                    stack.append(lets[str(n.attr)])
    return False


def _tile_shaped(node: Node, lets: dict[str, Node]) -> bool:
    """Whether the value has a whole tile's shape: it reads `s`, or both `q` and `kv` (otherwise it
    is a scalar, a column or a row, and a score must be broadcast to the tile)."""
    return _depends(node, "s", lets) or (_depends(node, "q", lets) and _depends(node, "kv", lets))


class _Kernel:
    """What one kernel computes of a fused pattern: its hoisted rows (an emitter) and its bodies.
    `ranges` are the pattern's value ranges, shared by every emitter of a spec: each node's range is
    found once, not once per emitter."""

    def __init__(
        self,
        pattern: PatternIR,
        roots: list[Node],
        float64: frozenset[Node],
        prefix: str,
        ranges: ValueRanges,
    ) -> None:
        self.pattern = pattern
        self.float64 = float64
        self.prefix = prefix
        self.value_ranges = ranges
        self.rows = Emitter(pattern, KERNEL_NAMES, float64, prefix=f"{prefix}r", value_ranges=ranges)
        lets = dict(pattern.lets)
        for name in _lets_used(pattern, roots):
            _bind(self.rows, name, lets[name], self.rows.value)
        self.helpers = set(self.rows.helpers)
        self.bits: set[str] = set()  # the inputs its bodies read as packed bits (`Emitter.bits`)

    def ranges(self, axis: str) -> tuple[tuple[Assign, ...], tuple[KeyRange, ...] | None]:
        """The analytic plan's ranges of positions along `axis` ("kv" or "q"), as statements (computed
        where the tile of the other axis is known), or None for metadata plans."""
        sparsity, analytic = self.pattern.sparsity, self.pattern.ranges
        if sparsity is None or not sparsity.analytic or analytic is None:
            return (), None
        bounds = "kb" if axis == "kv" else "qb"
        emitter = Emitter(
            self.pattern,
            KERNEL_NAMES,
            self.float64,
            prefix=f"{self.prefix}{bounds}",
            value_ranges=self.value_ranges,
        )
        ranges = []
        for j, axis_range in enumerate(analytic.axis(axis)):
            values = []
            for part, node in axis_range.named().items():
                _bind(emitter, f"{axis}_{part}_{j}", node, lambda n: _scalar(emitter, n))
                values.append(f"{axis}_{part}_{j}")
            ranges.append(KeyRange(*values))
        self.helpers |= emitter.helpers
        return tuple(emitter.lines), tuple(ranges)

    def body(
        self,
        with_mask: bool,
        tiles: Mapping[str, TileAxis],
        backward: bool = False,
        grads: bool = False,
    ) -> Body:
        """One kind of tile's statements; `tiles`: how q and kv run over its tile (`gather.py`)."""
        pattern = self.pattern
        emitter = Emitter(
            pattern,
            KERNEL_NAMES,
            self.float64,
            known=self.rows.names,
            prefix=f"{self.prefix}{'m' if with_mask else 'f'}",
            value_ranges=self.value_ranges,
            tiles=tiles,
        )
        kernel_values, _ = _check_fused(pattern)
        kernel_score, kernel_mask = kernel_values.score, kernel_values.mask
        lets = dict(pattern.lets)
        score, score_log2 = None, False
        scale_folded = (
            not backward and kernel_score is not None and foldable_scale(kernel_score, emitter.varies)
        )
        if scale_folded:
            emitter.fold_scale = "scale"
        if kernel_score is not None and not backward:
            score = _log2_score(emitter, kernel_score)
            score_log2 = score is not None
        if kernel_score is not None and score is None:
            score = emitter.cast(kernel_score, FP32)
        if kernel_score is not None and not _tile_shaped(kernel_score, lets):
            score = f"({score} + tl.zeros_like(s))"
        mask = emitter.value(kernel_mask) if with_mask and kernel_mask is not None else None
        if mask is not None and not emitter.varies(kernel_mask):
            # A scalar (a mask of h, b or the sizes only) as a [1, 1] tile: Triton's interpreter holds a
            # scalar comparison as int32, which `allowed & mask` would not take.
            mask = f"((tl.zeros([1, 1], tl.int32) + ({mask}).to(tl.int32)) != 0)"
        dscore = None
        input_grads: list[InputGrad] = []
        if backward:
            node = kernel_values.dscore
            dscore = emitter.cast(node, FP32) if node is not None else None
        if grads:
            for load, value in grad_loads(pattern):
                decl = pattern.input(str(load.attr))
                assert decl is not None and load.op is Op.LOAD
                arg = _input(decl)
                indices = [emitter.value(i) for i in load.args]
                offset = " + ".join(
                    f"tl.cast({i}, {INT64}) * {stride}"
                    for i, stride in zip(indices, arg.grad_strides, strict=True)
                )
                valid = " & ".join(
                    f"({i} >= 0) & ({i} < {dim})"
                    for i, dim in zip(indices, arg.scalars[: arg.rank], strict=True)
                )
                input_grads.append(
                    InputGrad(
                        input=arg,
                        value=emitter.cast(value, FP32),
                        offset=offset or "0",
                        valid=valid or "tl.full([], 1, tl.int1)",
                        over_q=_depends(load, "q", lets),
                        over_kv=_depends(load, "kv", lets),
                    )
                )
        self.helpers |= emitter.helpers
        self.bits |= emitter.bits
        return Body(tuple(emitter.lines), score, mask, dscore, tuple(input_grads), score_log2, scale_folded)


def _log2_score(emitter: Emitter, score: Node) -> str | None:
    """The score times log2(e) as `f * (c * LOG2E)` where it is a float32 product `c * f` (either
    order) of a factor `c` that is the same for the whole tile (a parameter or constant: a soft cap's
    `cap * tanh(s / cap)`), so that the forward's base-2 softmax needs no multiply of its own; None
    otherwise."""
    if score.op is not Op.MUL or emitter.dtype(score) != FP32:
        return None
    for c, f in (score.args, score.args[::-1]):
        if not emitter.varies(c) and emitter.varies(f) and emitter.dtype(c) == FP32:
            if f.op is Op.SCORE and emitter.fold_scale is not None:  # `c * s`, s unscaled
                return f"{emitter.value(f)} * ({emitter.cast(c, FP32)} * ({emitter.fold_scale} * LOG2E))"
            return f"{emitter.cast(f, FP32)} * ({emitter.cast(c, FP32)} * LOG2E)"
    return None


def _input(decl, bits: set[str] | frozenset[str] = frozenset()) -> InputArg:
    """The input's kernel arguments; `bits`: the inputs the kernels read as packed bits too."""
    return InputArg(
        decl.name,
        input_arg(decl.name),
        decl.dtype,
        len(decl.dims),
        covered_sizes(decl.dims),
        decl.name in bits,
    )


def _params(pattern: PatternIR) -> tuple[ParamArg, ...]:
    return tuple(ParamArg(i, param_arg(i), str(p.type)) for i, p in enumerate(pattern.params))


def _float64(kernel: KernelValues, pattern: PatternIR) -> frozenset[Node]:
    return float64_nodes([kernel.mask] if kernel.mask is not None else [], dict(pattern.lets))


def _value_ranges(pattern: PatternIR) -> ValueRanges:
    """The pattern's value ranges, its lets known; in a compilation, taking what its passes found of
    each value that refers to no let (`normal_form.value_ranges`)."""
    return ValueRanges(pattern, dict(pattern.lets), known=value_ranges(pattern))


def _present(*values: Node | None) -> list[Node]:
    return [v for v in values if v is not None]


def build_spec(pattern: PatternIR) -> KernelSpec:
    """The forward kernel's spec of a pattern compiled through `fuse`."""
    values, sparsity = _check_fused(pattern)
    roots = _present(values.mask, values.score)
    kernel = _Kernel(pattern, roots, _float64(values, pattern), "", _value_ranges(pattern))
    range_lines, kv_ranges = kernel.ranges("kv")
    masked, full = kernel.body(True, FORWARD_TILES), kernel.body(False, FORWARD_FULL_TILES)
    metadata_b, metadata_h = "b" in sparsity.axes, "h" in sparsity.axes
    return KernelSpec(
        inputs=tuple(_input(d, kernel.bits) for d in pattern.inputs),
        params=_params(pattern),
        prologue=tuple(kernel.rows.lines) + range_lines,
        kv_ranges=kv_ranges,
        metadata_b=metadata_b,
        metadata_h=metadata_h,
        masked=masked,
        full=full,
        helpers=tuple(sorted(kernel.helpers)),
    )


def build_backward_spec(pattern: PatternIR) -> BackwardSpec:
    """The backward kernels' spec of a pattern compiled through `fuse`."""
    values, sparsity = _check_fused(pattern)
    float64 = _float64(values, pattern)
    scores = _present(values.mask, values.score, values.dscore)
    loads = grad_loads(pattern)
    ranges = _value_ranges(pattern)
    dq = _Kernel(
        pattern, scores + [n for load, value in loads for n in (load, value)], float64, "dq_", ranges
    )
    dq_prologue, kv_ranges = dq.ranges("kv")
    dq_masked = dq.body(True, DQ_TILES, backward=True, grads=True)
    dq_full = dq.body(False, DQ_TILES, backward=True, grads=True)
    dkv = _Kernel(pattern, scores, float64, "dkv_", ranges)
    dkv_prologue, q_ranges = dkv.ranges("q")
    dkv_masked = dkv.body(True, DKV_TILES, backward=True)
    dkv_full = dkv.body(False, DKV_TILES, backward=True)
    with_grad = differentiable_inputs(pattern)
    metadata_b, metadata_h = "b" in sparsity.axes, "h" in sparsity.axes
    return BackwardSpec(
        inputs=tuple(_input(d, dq.bits | dkv.bits) for d in pattern.inputs),
        params=_params(pattern),
        grad_inputs=tuple(_input(d) for d in pattern.inputs if d.name in with_grad),
        metadata_b=metadata_b,
        metadata_h=metadata_h,
        dq_rows=tuple(dq.rows.lines),
        dq_prologue=dq_prologue,
        kv_ranges=kv_ranges,
        dq_masked=dq_masked,
        dq_full=dq_full,
        dkv_rows=tuple(dkv.rows.lines),
        dkv_prologue=dkv_prologue,
        q_ranges=q_ranges,
        dkv_masked=dkv_masked,
        dkv_full=dkv_full,
        helpers=tuple(sorted(dq.helpers | dkv.helpers)),
    )


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        extensions=["jinja2.ext.do"],
    )
    env.filters["tile_parameters"] = tile_parameters
    env.filters["kernel_functions"] = kernel_functions
    return env


# The module-level names of every template (`_TEMPLATE_NAMES`' constants), Python's builtins and keywords:
# what a tile function reads without a parameter.
_MODULE_CONSTANTS = (
    frozenset({"triton", "tl", "LOG2E", "LN2"}) | frozenset(dir(builtins)) | frozenset(keyword.kwlist)
)
# In one line of a tile's statements: a string literal; an assignment `a = ...`, `a, b = ...` or
# `a += ...` (targets, operator, value); a loop's header; a name read (not an attribute, not a keyword
# argument's name).
_STRING = re.compile(r"\"[^\"]*\"|'[^']*'")
_ASSIGNMENT = re.compile(r"\s*([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*([-+*/]?=)(?!=)(.*)")
_LOOP = re.compile(r"\s*for\s+([A-Za-z_]\w*)\s+in\b(.*)")
_READ = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?!\w)(?!\s*=(?!=))")
_WORD = re.compile(r"\w+")


def tile_parameters(body: str, spec: KernelSpec | BackwardSpec) -> list[str]:
    """The parameters of a tile function (`_common.py.jinja`'s `tile_function`) whose statements are
    `body`: every name a statement reads before one assigns it, in the order of first reading, except
    the module's names (constants, the spec's helpers, builtins). Found in the rendered statements
    themselves, so that the function takes each value its tile reads (the pattern's hoisted rows,
    inputs, parameters, ... as well as the template's own names); the caller passes them by the same
    names. The render parses nothing (one parse of the whole source where it is loaded): the statements
    are read line by line, each line one statement of the templates' forms, and `checked_code` checks
    in that parse that no tile function reads a name it lacks (`_tile_function_reads`)."""
    return list(_free_names(body, _helper_names(spec)))


def _free_names(body: str, helpers: frozenset[str]) -> tuple[str, ...]:
    """`tile_parameters` of the statements `body`, where `helpers` are the spec's helper functions (the
    other module-level names, `_MODULE_CONSTANTS`, are left out of each line's reads already)."""
    found: dict[str, None] = {}
    bound: set[str] = set()
    for line in expand_blocks(body).splitlines():
        reads, assigned = _LINES.get(line) or _line_names(line)
        for name in reads:
            if name not in bound and name not in helpers:
                found.setdefault(name)
        bound.update(assigned)  # after the value is read: `x = x + 1` reads x
    return tuple(found)


_LINES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
"""`_line_names` of the lines seen: most of a tile's lines are the template's own, the same in every
kernel (at most `_LINES_KEPT` kept)."""
_LINES_KEPT = 4096


def _line_names(line: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names one statement line reads, in order of first reading, each once and none of
    `_MODULE_CONSTANTS` (`tl`, builtins: most of a line's names, never a parameter), and those it binds
    (assignment targets, a loop's variable)."""
    code, targets = _STRING.sub('""', line.split("#", 1)[0]), ""  # (no string holds a "#")
    if assignment := _ASSIGNMENT.match(code):
        targets, operator, code = assignment.groups()
        if operator != "=":  # `x += y` reads x too
            code = f"{targets} {code}"
    elif loop := _LOOP.match(code):
        targets = loop.group(1)  # a reduction's loop variable (its names are the loop's own)
        code = loop.group(2)
    reads = dict.fromkeys(n for n in _READ.findall(code) if n not in _MODULE_CONSTANTS)
    names = (tuple(reads), tuple(_WORD.findall(targets)))
    if len(_LINES) >= _LINES_KEPT:
        _LINES.clear()
    _LINES[line] = names
    return names


def _tile_function_reads(function: ast.FunctionDef, module: frozenset[str]) -> list[str]:
    """The names a function's statements read that are neither its parameters, nor assigned by it before
    on every path, nor the module's: empty for a tile function whose parameters are complete."""
    missing: dict[str, None] = {}

    def read(node: ast.AST, bound: set[str]) -> None:
        for n in _names(node):
            if type(n.ctx) is ast.Load and n.id not in bound and n.id not in module:
                missing.setdefault(n.id)

    def run(statements: list[ast.stmt], bound: set[str]) -> set[str]:
        """Reads the statements' free names into `missing`; the names bound after them on every path."""
        for stmt in statements:
            if isinstance(stmt, ast.If):
                read(stmt.test, bound)
                bound = bound | (run(stmt.body, bound) & run(stmt.orelse, bound))
            elif isinstance(stmt, ast.Assign | ast.AugAssign):
                read(stmt.value, bound)
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if isinstance(stmt, ast.AugAssign):  # `x += y` reads x too
                    read(ast.Name(id=ast.unparse(stmt.target), ctx=ast.Load()), bound)
                bound = bound | {n.id for target in targets for n in _names(target)}
            elif isinstance(stmt, ast.For):
                read(stmt.iter, bound)
                run(stmt.body, bound | {n.id for n in _names(stmt.target)})
            else:
                read(stmt, bound)
        return bound

    run(function.body, {a.arg for a in function.args.args})
    return list(missing)


# What each template defines at module level, besides the helpers `_common.py.jinja` adds for a spec.
_TEMPLATE_NAMES = {
    "attention_fwd.py.jinja": frozenset(
        {"triton", "tl", "LOG2E", "LN2", "_fwd_partial_tile", "_fwd_full_tile", "attnc_fwd"}
    ),
    "attention_bwd.py.jinja": frozenset(
        {
            "triton",
            "tl",
            "LOG2E",
            "_dq_partial_tile",
            "_dq_full_tile",
            "_dkv_partial_tile",
            "_dkv_full_tile",
            "attnc_bwd_preprocess",
            "attnc_bwd_dq",
            "attnc_bwd_dkv",
        }
    ),
}
_IMPORTS = {("triton", None): "triton", ("triton.language", "tl"): "tl"}
# The module of the `@triton.jit` functions the kernels import (`kernel_functions`), and its functions.
KERNEL_FUNCTIONS = "attnc.codegen.kernel_functions"
_KERNEL_FUNCTIONS = frozenset(
    {"_tile_of", "_conjunct_tiles", "_disjoint", "_cut", "_step_over", "_floordiv", "_floormod"}
    | {"_div_scalar", "_tanh", "_kv_rows", "_opaque"}
)


def kernel_functions(spec: KernelSpec | BackwardSpec) -> list[str]:
    """The functions of `codegen/kernel_functions.py` a spec's kernels call (the templates import them),
    sorted: the helpers of its statements (`emit`), the tile arithmetic of analytic plans (with
    several conjuncts, their tiles and step-over loops), and the forward's key rows (`_kv_rows`)."""
    names = {f"_{helper}" for helper in spec.helpers}
    if isinstance(spec, KernelSpec):
        names.add("_kv_rows")
    else:
        names.add("_opaque")  # the dK/dV kernel's query rows
    if "floormod" in spec.helpers:  # _floormod calls _floordiv
        names.add("_floordiv")
    if spec.analytic:
        names.add("_tile_of")
        if len(spec.kv_ranges or ()) > 1:  # the tiles and step-over loops of several conjuncts
            names |= {"_conjunct_tiles", "_disjoint", "_cut", "_step_over"}
    return sorted(names)


def _helper_names(spec: KernelSpec | BackwardSpec) -> frozenset[str]:
    """The kernel functions a spec's kernels import, and the backward's tile functions of the exact
    Delta (only where the spec has input gradients)."""
    names = set(kernel_functions(spec))
    if isinstance(spec, BackwardSpec) and spec.grad_inputs:
        names |= {"_delta_partial_tile", "_delta_full_tile"}
    return frozenset(names)


def _input_arguments(spec: KernelSpec | BackwardSpec) -> frozenset[str]:
    """The kernel arguments named after the spec's inputs."""
    names = {name for arg in spec.inputs for name in (arg.ptr, *arg.scalars)}
    for arg in spec.inputs:
        if arg.bits:
            words, count, word_strides = arg.bit_args
            names |= {words, count, *word_strides}
    for arg in spec.grad_inputs if isinstance(spec, BackwardSpec) else ():
        names |= {arg.grad_ptr, *arg.grad_strides, arg.grad_flag}
    return frozenset(names)


def _definitions(tree: ast.Module) -> list[str]:
    """The names a module defines at its top level; raises ValueError on any other statement (an
    expression, a stray import, ...)."""
    names = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Import) and all((a.name, a.asname) in _IMPORTS for a in stmt.names):
            names += [_IMPORTS[a.name, a.asname] for a in stmt.names]
        elif (
            isinstance(stmt, ast.ImportFrom)
            and (stmt.module, stmt.level) == (KERNEL_FUNCTIONS, 0)
            and all(a.asname is None and a.name in _KERNEL_FUNCTIONS for a in stmt.names)
        ):
            names += [a.name for a in stmt.names]
        elif isinstance(stmt, ast.Assign) and [type(t) for t in stmt.targets] == [ast.Name]:
            names.append(stmt.targets[0].id)  # type: ignore[attr-defined]
        elif isinstance(stmt, ast.FunctionDef):
            names.append(stmt.name)
        else:
            raise ValueError(f"a {type(stmt).__name__} statement at line {stmt.lineno}")
    return names


_NODE_FIELDS: dict[type, tuple[str, ...]] = {}
"""Per AST class, the fields that may hold nodes binding a name: all but contexts and operators."""


def _node_fields(kind: type[ast.AST]) -> tuple[str, ...]:
    fields = tuple(f for f in kind._fields if f not in ("ctx", "op", "ops"))
    _NODE_FIELDS[kind] = fields
    return fields


def _bindings(tree: ast.Module) -> list[ast.arg | ast.Name]:
    """Every argument (`ast.arg`) and every name the module stores to (`ast.Name` in a store context),
    in any order: what `ast.walk` would find of them, at a quarter of its cost (a kernel's tree has
    thousands of nodes, and the check runs on every load)."""
    return [
        n  # type: ignore[misc]
        for n in _leaves(tree, (ast.Name, ast.arg))
        if type(n) is ast.arg or type(n.ctx) is ast.Store  # type: ignore[attr-defined]
    ]


def _names(tree: ast.AST) -> list[ast.Name]:
    """Every `ast.Name` in the tree, in any order (as `_bindings`)."""
    return _leaves(tree, (ast.Name,))  # type: ignore[return-value]


def _leaves(tree: ast.AST, kinds: tuple[type, ...]) -> list[ast.AST]:
    """The nodes of `kinds` in the tree, in any order, none of them entered; constants (and the
    operators, which have no fields) are never entered either."""
    found: list[ast.AST] = []
    stack: list[object] = [tree]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind in kinds:
            found.append(node)  # type: ignore[arg-type]
        elif kind is not ast.Constant and isinstance(node, ast.AST):  # lists may hold strings
            fields = _NODE_FIELDS.get(kind)
            for name in _node_fields(kind) if fields is None else fields:
                value = getattr(node, name, None)
                if type(value) is list:
                    stack.extend(value)
                elif isinstance(value, ast.AST):
                    stack.append(value)
    return found


def _check_structure(tree: ast.Module, spec: KernelSpec | BackwardSpec, template: str) -> None:
    """Raise ValueError unless the module defines exactly the template's names and the spec's helpers,
    each tile function reads only its parameters and the module's names, and the names in the inputs'
    namespaces are exactly the inputs' kernel parameters (so no template name, and no other input, can
    take one of them); likewise the runtime parameters' namespace."""
    defined = _definitions(tree)
    expected = _TEMPLATE_NAMES[template] | _helper_names(spec)
    if len(defined) != len(set(defined)) or set(defined) != expected:
        raise ValueError(f"it defines {sorted(defined)}, not {sorted(expected)}")
    _check_signatures(tree, spec)
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name.endswith("_tile"):
            missing = _tile_function_reads(stmt, _MODULE_CONSTANTS | expected)
            if missing:
                raise ValueError(f"tile function {stmt.name} reads {missing}, not among its parameters")
    parameters: set[str] = set()
    runtime: set[str] = set()
    namespaces = (*INPUT_NAMESPACES, PARAM_NAMESPACE)
    for node in _bindings(tree):
        if isinstance(node, ast.arg) and node.arg.startswith(INPUT_NAMESPACES):
            parameters.add(node.arg)
        elif isinstance(node, ast.arg) and node.arg.startswith(PARAM_NAMESPACE):
            runtime.add(node.arg)
        elif (
            isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id.startswith(namespaces)
        ):
            raise ValueError(f"it assigns {node.id} at line {node.lineno}, a name of an arguments' namespace")
    if parameters != _input_arguments(spec):
        raise ValueError(
            f"its input parameters are {sorted(parameters)}, not {sorted(_input_arguments(spec))}"
        )
    if runtime != {p.arg for p in spec.params}:
        raise ValueError(
            f"its runtime parameter arguments are {sorted(runtime)}, not {sorted(p.arg for p in spec.params)}"
        )


def _check_signatures(tree: ast.Module, spec: KernelSpec | BackwardSpec) -> None:
    """Raise ValueError unless each kernel's parameters are its argument description's, in order, the
    constexprs (and only they) annotated `tl.constexpr`: the launcher calls by that description."""
    kernels = {stmt.name: stmt for stmt in tree.body if isinstance(stmt, ast.FunctionDef)}
    for signature in spec.signatures:
        found = [(a.arg, _is_constexpr(a)) for a in kernels[signature.kernel].args.args]
        described = [(a.name, a.kind == "constexpr") for a in signature.parameters]
        if found != described:
            pairs = enumerate(zip(found, described, strict=False))
            at = next((i for i, (f, d) in pairs if f != d), min(len(found), len(described)))
            raise ValueError(
                f"{signature.kernel}'s parameters differ from its argument description from parameter "
                f"{at}: (name, constexpr) {found[at : at + 1]} where it has {described[at : at + 1]}"
            )


def _is_constexpr(arg: ast.arg) -> bool:
    """Whether a parameter is annotated `tl.constexpr`."""
    annotation = arg.annotation
    return (
        isinstance(annotation, ast.Attribute)
        and annotation.attr == "constexpr"
        and isinstance(annotation.value, ast.Name)
        and annotation.value.id == "tl"
    )


def render(spec: KernelSpec | BackwardSpec, template: str = "attention_fwd.py.jinja") -> str:
    """The Triton source of a spec, as text: not parsed here. Python parses it once, where it is loaded
    (`checked_code`), and checks its structure then, before any of it runs."""
    return expand_blocks(_environment().get_template(template).render(spec=spec))  # reductions' loops


def checked_code(
    source: str, spec: KernelSpec | BackwardSpec, template: str, filename: str = "<attnc kernel>"
) -> CodeType:
    """The rendered source of a spec compiled to a module's code, from a single parse; raises
    InternalError (with the numbered source) if it does not parse as Python, or defines other names
    than the template's kernels, constants and helpers (`_check_structure`)."""
    try:
        tree = ast.parse(source, filename)
        _check_structure(tree, spec, template)
    except SyntaxError as err:
        raise InternalError(
            f"rendered {template} does not parse: {err.msg} at line {err.lineno}\n{_numbered(source)}"
        ) from None
    except ValueError as err:
        raise InternalError(
            f"rendered {template} is not the expected module: {err}\n{_numbered(source)}"
        ) from None
    return compile(tree, filename, "exec")


def _numbered(source: str) -> str:
    return "\n".join(f"{i:4} {line}" for i, line in enumerate(source.splitlines(), start=1))
