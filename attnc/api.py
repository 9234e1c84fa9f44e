"""The Python API: `load`/`loads` give an `AttnModule`; a module's pattern, called with its parameters,
gives a `Kernel` — the pattern compiled for those values, with its dense mask, its reference attention (the
oracle) and the IR of every stage.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import operator
import weakref
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from attnc import config, oracle
from attnc.analysis.value_ranges import SIZE_LIMIT
from attnc.compiler import CompiledPattern, compile_pattern
from attnc.dsl.lower import Program, load_program, stdlib_program
from attnc.dsl.source import SourceReadError, read_source, shown_path
from attnc.errors import (
    LOCATED_ERRORS,
    AttnError,
    AttnImportError,
    InputError,
    InputTypeError,
    Loc,
    ParameterError,
    SourceFile,
)
from attnc.ir import fold
from attnc.ir.nodes import (
    INPUT_DTYPES,
    ModuleIR,
    Node,
    Op,
    ParamDecl,
    PatternIR,
    Type,
    deep_recursion,
    node_budget,
)
from attnc.ir.printer import print_module
from attnc.ir.results import differentiable_inputs
from attnc.passes import PASSES
from attnc.passes.bind_params import static_params
from attnc.passes.inline import Inline
from attnc.passes.manager import INPUT_STAGE
from attnc.runtime import autograd, backend, cache, registry
from attnc.runtime.autotune import MAX_BLOCK, Config
from attnc.runtime.launch import DTYPES, MAX_HEAD_DIM, Forward
from attnc.runtime.plan import Plan, exact_block_map, make_plan, per_row_plan, uses

Value = int | float | bool

NESTED_ADVICE = (
    "attnc takes dense tensors; pad the sequences to one length, or pack them into one row and mask "
    "by document ids (examples/document_causal.attn)"
)
"""What an `InputError` for a nested (jagged) tensor advises."""

RUNTIME_INT_LIMIT = 2**30
"""A runtime int parameter takes values in [-RUNTIME_INT_LIMIT, RUNTIME_INT_LIMIT]: the analyses prove
the kernels' int arithmetic safe for every value in that range (a `static` one may take any int64)."""

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""The largest `scale` the kernels accept: they compute in float32."""

DENSE_LIMIT = 2**31
"""The most elements a dense result (`Kernel.mask`, `Kernel.reference`'s scores, `Kernel.block_map`'s
tiles) may have: past it an `InputError` says so, before anything is allocated. Module-level, so a
caller with the memory for more can raise it (`attnc.api.DENSE_LIMIT = 2**34`)."""

KERNEL_OPTIONS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "SPLIT_KV", "PACK_GQA")
"""The keys of a call's `kernel_options` (`Kernel.__call__`), in the op's order."""

MAX_SPLIT_KV = 1024
"""The most key splits a call's `kernel_options` may ask for (`runtime/launch.py`'s `kv_splits`)."""


def load(path: str | Path) -> AttnModule:
    """Parse and check an `.attn` file (and what it imports)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot read {path}: No such file or directory")
    try:  # what imports read: a regular file (never a FIFO or a device), at most the size cap, UTF-8
        text = read_source(path)
    except SourceReadError as err:
        where = Loc(SourceFile(shown_path(str(path)), ""), 1, 1)
        raise AttnImportError(f"cannot read {shown_path(str(path))}: {err.reason}", where) from None
    return AttnModule(load_program(text, str(path), path))


def loads(text: str, filename: str = "<string>") -> AttnModule:
    """Parse and check `.attn` source text; imports are relative to the current directory."""
    return AttnModule(load_program(text, filename))


def stdlib() -> AttnModule:
    """The standard library as a module: `attnc.stdlib().causal()`."""
    return AttnModule(stdlib_program())


class AttnModule:
    """A loaded `.attn` file. Its patterns — its own, then imported ones, then the stdlib's — are
    attributes and items: `mod.causal`, `mod["causal"]`. Named like `AttnError`, `AttnTypeError`: with
    the prefix where the plain name is another library's (`torch.nn.Module`)."""

    def __init__(self, program: Program) -> None:
        self._program = program

    @property
    def patterns(self) -> list[str]:
        """Every pattern name this module can reach, its own first."""
        return self._program.pattern_names()

    @property
    def own_patterns(self) -> list[str]:
        """The patterns declared in the file itself."""
        from attnc.dsl import ast

        return [n for n, d in self._program.root.decls.items() if isinstance(d, ast.PatternDecl)]

    def __getitem__(self, name: str) -> Pattern:
        found = self._program.pattern_decl(name)
        if found is None:
            raise KeyError(f"no pattern '{name}'; patterns: {', '.join(self.patterns)}")
        return Pattern(self._program, name)

    def __getattr__(self, name: str) -> Pattern:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(err.args[0]) from None

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *self.patterns]

    def __repr__(self) -> str:
        return f"<attnc.AttnModule {self._program.root.module.file.name}: {', '.join(self.own_patterns)}>"


Module = AttnModule
"""The name DESIGN.md §3 and attnc 0.1 used, kept as an alias of `AttnModule` for one release."""


class Pattern:
    """A pattern of a module, not yet bound to parameter values; call it to get a `Kernel`."""

    def __init__(self, program: Program, name: str) -> None:
        self._program = program
        self.name = name
        self._module_ir = program.module(name)

    @property
    def static_names(self) -> frozenset[str]:
        """The parameters its kernel is specialised on, as `bind-params` decides them: declared `static`,
        bools, and those that reach an input's shape, also through a pattern it refers to (so decided
        after inlining). The others are runtime kernel arguments."""
        known = _STATIC_NAMES.setdefault(self._program, {})
        if self.name not in known:
            entry = self._module_ir.entry
            with deep_recursion(), node_budget(entry.loc, f"pattern '{self.name}' (inline)"):
                inlined = Inline().run(self._module_ir)
            _INLINED.setdefault(self._program, {})[self.name] = (self._module_ir, inlined)
            known[self.name] = static_params(inlined.entry)
        return known[self.name]

    @property
    def params(self) -> tuple[ParamDecl, ...]:
        return self._module_ir.entry.params

    def __call__(self, *args: Value, **params: Value) -> Kernel:
        values = self._bind(args, params)
        return Kernel(self.name, _pipeline(self._program, self._module_ir, values, self.static_names), values)

    def _bind(
        self, args: tuple[Value, ...], params: dict[str, Value], specialize: frozenset[str] = frozenset()
    ) -> tuple[tuple[str, Value], ...]:
        """Every parameter's value, checked (a runtime int within ±2**30); `specialize` names parameters
        compiled as static (`attnc ir -D`), which may take any value of their type."""
        entry = self._module_ir.entry
        decls = entry.params
        if len(args) > len(decls):
            raise ParameterError(
                f"pattern '{self.name}' takes {len(decls)} parameter(s), got {len(args)}", entry.loc
            )
        given: dict[str, Value] = {d.name: a for d, a in zip(decls, args, strict=False)}
        names = [d.name for d in decls]
        for key, value in params.items():
            if key not in names:
                listed = ", ".join(names) or "none"
                raise ParameterError(
                    f"pattern '{self.name}' has no parameter '{key}' (its parameters: {listed})", entry.loc
                )
            if key in given:
                raise ParameterError(f"parameter '{key}' of pattern '{self.name}' given twice", entry.loc)
            given[key] = value
        runtime = {d.name for d in decls if d.name not in self.static_names | specialize}
        values = []
        for decl in decls:
            if decl.name in given:
                values.append(
                    (decl.name, _check_param(decl, given[decl.name], self.name, decl.name in runtime))
                )
            elif decl.default is not None:  # checked too: a runtime int's default must be in range
                values.append(
                    (decl.name, _check_param(decl, decl.default.attr, self.name, decl.name in runtime))
                )
            else:
                raise ParameterError(
                    f"parameter '{decl.name}' of pattern '{self.name}' has no default and was not given",
                    decl.loc,
                )
        return tuple(values)  # type: ignore[return-value]

    def __repr__(self) -> str:
        params = ", ".join(
            f"{'static ' if p.static and p.type is not Type.BOOL else ''}{p.name}: {p.type}"
            for p in self.params
        )
        return f"<attnc.Pattern {self.name}({params})>"


def _check_param(
    decl: ParamDecl, value: Any, pattern: str, runtime: bool, error: type[AttnError] = ParameterError
) -> Value:
    """`value` as the parameter's type, or a located `error`; a `runtime` int must lie within
    ±`RUNTIME_INT_LIMIT`. Under `torch.compile` a runtime value may be a `torch.SymInt` /
    `torch.SymFloat`: it is kept symbolic (`int()` would specialise the graph on it), and the range
    check becomes a guard."""
    if decl.type is Type.BOOL:
        if isinstance(value, bool):
            return value
    elif isinstance(value, bool):
        pass
    elif decl.type is Type.INT and isinstance(value, numbers.Integral | torch.SymInt):
        low, high = (-RUNTIME_INT_LIMIT, RUNTIME_INT_LIMIT) if runtime else (-(2**63), 2**63 - 1)
        if low <= value <= high:
            return value if isinstance(value, torch.SymInt) else int(value)
        if runtime:
            raise error(
                f"parameter '{decl.name}' of pattern '{pattern}' is a runtime int: it must lie in "
                f"[-2**30, 2**30], got {_shown(value)} (a `static` parameter may take any int64 value)",
                decl.loc,
            )
    elif decl.type is Type.FLOAT and isinstance(value, torch.SymFloat):
        return value  # type: ignore[return-value]
    elif decl.type is Type.FLOAT and runtime and isinstance(value, torch.Tensor):
        return _float_tensor_param(decl, value, pattern, error)
    elif decl.type is Type.FLOAT and isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int (or Fraction) beyond float's range, like 10**400
            raise error(
                f"parameter '{decl.name}' of pattern '{pattern}' is float, got {type(value).__name__} "
                f"{_shown(value)}, beyond any float",
                decl.loc,
            ) from None
    raise error(
        f"parameter '{decl.name}' of pattern '{pattern}' is {decl.type}, "
        f"got {type(value).__name__} {value!r}",
        decl.loc,
    )


def _float_tensor_param(
    decl: ParamDecl, value: torch.Tensor, pattern: str, error: type[AttnError]
) -> Value | torch.Tensor:
    """A runtime float given as a 0-d CPU tensor: its value (a float), or under `torch.compile` the
    tensor itself, which reaches the op as a graph input (`autograd.param_lists`), so one graph serves
    all its values (dynamo specialises a Python float passed to a custom op: one graph per value)."""
    if value.dim() != 0 or value.device.type != "cpu" or value.dtype == torch.bool or value.is_complex():
        raise error(
            f"parameter '{decl.name}' of pattern '{pattern}' is float: a tensor for it must be a 0-d real "
            f"tensor on the CPU (its value is read at launch), got {value.dim()}-d {str(value.dtype)[6:]} "
            f"on {value.device.type}",
            decl.loc,
        )
    if value.requires_grad:
        raise error(
            f"parameter '{decl.name}' of pattern '{pattern}' takes no gradient: pass the tensor detached",
            decl.loc,
        )
    return value if torch.compiler.is_compiling() else float(value)


def _shown(value: Any) -> str:
    """A value for a message, at most 24 characters of it (an int may have thousands of digits). While
    dynamo traces, a runtime int may be a `torch.SymInt`, which it can `repr` neither as it is nor after
    `int()`: `operator.index` makes it the int it stands for (the graph that raises is specialised on
    that value)."""
    if isinstance(value, int):  # dynamo's SymInt passes for an int
        value = operator.index(value)
    text = repr(value)
    return text[:24] + ("..." if len(text) > 24 else "")


_PIPELINES: weakref.WeakKeyDictionary[Program, dict[tuple[str, ...], CompiledPattern]] = (
    weakref.WeakKeyDictionary()
)
"""Compiled pipelines of each loaded program, by pattern and static parameter values: a kernel of a
pattern for new runtime values (`mod.sliding_window(window=w)` in a sweep) runs no pass again."""

_STATIC_NAMES: weakref.WeakKeyDictionary[Program, dict[str, frozenset[str]]] = weakref.WeakKeyDictionary()
"""`Pattern.static_names` of each loaded program, by pattern (`module[name]` makes a new `Pattern`)."""

_INLINED: weakref.WeakKeyDictionary[Program, dict[str, tuple[ModuleIR, ModuleIR]]] = (
    weakref.WeakKeyDictionary()
)
"""The module `Pattern.static_names` inlined and what `inline` made of it, by pattern, until the next
compilation of that module takes it (its pipeline starts from it: one inline per build, not two)."""


def clear_memory() -> None:
    """Forget the compiled pipelines and static parameter sets of every program (the kernel sources
    are `runtime.cache.clear_memory`'s): the next kernel of a pattern runs every pass again."""
    _PIPELINES.clear()
    _STATIC_NAMES.clear()
    _INLINED.clear()


PIPELINES_PER_PROGRAM = 256
"""At most this many compilations are kept per program (the oldest is dropped first)."""


def _pipeline(
    program: Program, module_ir: ModuleIR, values: tuple[tuple[str, Value], ...], static: frozenset[str]
) -> CompiledPattern:
    """The pattern compiled for `values`, from the memo when only runtime values differ. Runtime values
    do not enter the pipeline's output (they become `Op.PARAM` leaves), so the key holds the values of
    `static` only (`Pattern.static_names`: as bind-params decides, after inlining); `repr` tells 0.0
    from -0.0, which compare equal but may compile differently. The kernel source is asked of the
    cache again (a dictionary hit, normally): the cache stays its one authority."""
    entry = module_ir.entry
    key = (entry.name, *(f"{name}={value!r}" for name, value in values if name in static))
    compiled = _PIPELINES.setdefault(program, {})
    if key not in compiled:
        if len(compiled) >= PIPELINES_PER_PROGRAM:
            del compiled[next(iter(compiled))]
        source, inlined = _INLINED.get(program, {}).pop(entry.name, (None, None))
        compiled[key] = compile_pattern(module_ir, values, inlined=inlined if source is module_ir else None)
        return compiled[key]
    done = compiled[key]
    return replace(done, source=cache.source(done.entry, done.spec, structure=done.source.structure))


def _uses(pattern: PatternIR, *names: str) -> bool:
    return any(n.op in (Op.VAR, Op.SIZE) and n.attr in names for r in pattern.roots() for n in r.walk())


def _dim_value(dim: Node, sizes: Mapping[str, Any]) -> Any:
    """A shape expression (constants and sizes only, once bound: a parameter in a shape is static) evaluated;
    None if a size is unknown.

    Plain integer arithmetic, so that under `torch.compile` a symbolic size (a `torch.SymInt`) stays
    symbolic: the shape check becomes a guard on the sizes, not a data-dependent `.item()`. A shape that
    computes in floats (`ceil(sqrt(tofloat(Q_LEN)))`) goes through the oracle on concrete sizes."""
    known: dict[str, Any] = {}
    for n in dim.walk():
        if n.op is Op.SIZE:
            value = sizes.get(str(n.attr))
            if value is None:
                return None
            known[str(n.attr)] = value
    values: dict[Node, Any] = {}
    for n in dim.walk():
        if n.op is Op.SIZE:
            values[n] = known[str(n.attr)]
        elif n.op is Op.CONST and n.type is not Type.FLOAT:
            values[n] = n.attr
        elif fold.foldable(n.op) and all(m.type is not Type.FLOAT for m in (n, *n.args)):
            values[n] = _int_value(n.op, [values[a] for a in n.args])
        else:
            return _dim_by_oracle(dim, known)
    return values[dim]


def _dim_by_oracle(dim: Node, known: Mapping[str, Any]) -> int:
    concrete = {name: int(value) for name, value in known.items()}  # specialises a symbolic size
    env = oracle.Env(
        concrete.get("BATCH", 1),
        concrete.get("NUM_HEADS", 1),
        concrete.get("Q_LEN", 0),
        concrete.get("KV_LEN", 0),
        torch.device("cpu"),
        {},
    )
    return int(oracle.evaluate(dim, PatternIR("dims"), env).item())


def _int_value(op: Op, args: list[Any]) -> Any:
    """An int/bool op on plain or symbolic ints: `fold`'s exact arithmetic (`x // 0` is 0, ...), with
    torch's `sym_min`/`sym_max`, which keep a `torch.SymInt` symbolic where `min` would guard on it."""
    if op is Op.MIN:
        return torch.sym_min(*args)
    if op is Op.MAX:
        return torch.sym_max(*args)
    return fold.evaluate(op, args)


"""Integer and bool operations of a shape expression, as Python (or `torch.SymInt`) arithmetic with
the oracle's semantics: floor division and modulo, `x // 0 = 0`, `x % 0 = x`."""


def _raised_when_run(call: Callable[..., Any]) -> Callable[..., Any]:
    """A `Kernel` call (q, k, v first) whose errors keep their type and message under `torch.compile`.

    Its checks run while dynamo traces the call, and dynamo lets no exception leave a trace: with
    `fullgraph=True` the caller saw dynamo's `Unsupported` ("Observed exception") instead of attnc's
    located error. So a traced call catches its `AttnError` and puts `attnc::raise_error` in the graph
    instead of attention, which raises the error when the graph runs; the graph is guarded on what the
    check read, so a later good call traces again. The results it stands for are shaped as the call's
    would be (out [..., Dv], and lse with `return_lse` or `return_aux`), so that tracing goes on past
    the call. Uncompiled, under `torch.export` (whose program would always raise), or where there is no
    shape to give (q or v not a 3-D or 4-D tensor), the error is raised as it is."""
    names = list(inspect.signature(call).parameters)[1:4]  # q, k, v or k_cache, v_cache
    packed = call.__name__ == "varlen"  # q [Tq, Hq, D], lse [Hq, Tq]

    @functools.wraps(call)
    def checked(self: Kernel, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(self, *args, **kwargs)
        except AttnError as err:
            given = dict(zip(names, args, strict=False)) | kwargs
            q, v = given.get(names[0]), given.get(names[2])
            if (
                not torch.compiler.is_dynamo_compiling()
                or torch.compiler.is_exporting()  # a program that always raises is no export
                or LOCATED_ERRORS.get(type(err).__name__) is not type(err)
                or not (isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor))
                or q.dim() not in (3, 4)
                or v.dim() != q.dim()
            ):
                raise
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
            # A 3-D q of another call (refused) as `scaled_dot_product_attention` takes one: [H, L, D].
            rows = (q.shape[1], q.shape[0]) if packed and q.dim() == 3 else q.shape[:-1]
            lse = q.new_empty(rows, dtype=torch.float32)
            count = 3 if kwargs.get("return_aux") is True else 2 if kwargs.get("return_lse") is True else 1
            where = "" if err.loc is None else err.loc.pack()
            results = autograd.raise_error(type(err).__name__, err.reason, where, [out, lse, lse][:count])
            return results[0] if count == 1 else tuple(results)

    return checked


class Kernel:
    """A pattern compiled for parameter values. The static ones shape the kernel; the runtime ones are
    kernel arguments, and `params` holds the values a call uses unless it gives others by keyword
    (`kern(q, k, v, window=512)`, likewise `reference`, `mask`, `plan` and `block_map`)."""

    def __init__(self, name: str, compiled: CompiledPattern, values: tuple[tuple[str, Value], ...]) -> None:
        self.name = name
        self.params: dict[str, Value] = dict(values)
        self._compiled = compiled
        self._declared = compiled.passes.modules[INPUT_STAGE].entry.params
        self._bound = compiled.passes.modules[PASSES["bind-params"].name].entry
        # After bind-params a pattern's `params` are exactly its runtime parameters.
        self._runtime: dict[str, ParamDecl] = {d.name: d for d in self._bound.params}
        self.pattern: PatternIR = self._compiled.entry
        # Patterns of one structure share their kernels (and their autotuning) through the registry.
        # `_op_pattern`, the pattern's IR text, names them to the custom ops (a saved program reloads).
        self._forward, self._op_pattern = registry.register(
            Forward(self.name, self.pattern, self._compiled.spec, self._compiled.source)
        )
        self._key = self._forward.source.key
        # The op's errors about argument values point here (patterns of one structure share the op's
        # pattern, so it cannot know this one's place).
        self._where = self._bound.loc.pack()
        backend.active()  # decided now, not while torch.compile traces a call
        self._differentiable = differentiable_inputs(self.pattern)

    @property
    def stages(self) -> dict[str, str]:
        """The IR text after every stage, by pass name (`input` is before the first pass)."""
        return dict(self._compiled.stages)

    def ir(self, after: str | None = None) -> str:
        """The textual IR after the named pass (default: the last one)."""
        if after is None:
            return print_module(self._compiled.final)
        if after not in self._compiled.stages:
            raise ValueError(f"no stage '{after}'; stages: {', '.join(self._compiled.stages)}")
        return self._compiled.stages[after]

    @property
    def inputs(self) -> dict[str, tuple[str, int]]:
        """Each `input` tensor: its dtype and rank."""
        return {d.name: (d.dtype, len(d.dims)) for d in self._bound.inputs}

    @property
    def runtime_params(self) -> tuple[str, ...]:
        """The runtime parameters, in declaration order: a call may give them other values by keyword."""
        return tuple(self._runtime)

    def _split(self, keywords: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Value]]:
        """A call's keywords as (input tensors, runtime parameter values): each runtime parameter a
        keyword names takes that value for this call (checked as at binding), the others the kernel's."""
        inputs: dict[str, Any] = {}
        params = {name: self.params[name] for name in self._runtime}
        static = {d.name: d for d in self._declared if d.name not in self._runtime}
        for key, value in keywords.items():
            if key in self._runtime:
                params[key] = _check_param(self._runtime[key], value, self.name, True, InputError)
            elif key in static:
                raise InputError(
                    f"parameter '{key}' is static: bind it with mod.{self.name}({key}=...)", static[key].loc
                )
            else:
                inputs[key] = value
        return inputs, params

    def _env(
        self,
        q_len: int,
        kv_len: int,
        batch: int | None,
        num_heads: int | None,
        inputs: Mapping[str, Any],
        params: Mapping[str, Value],
        device: torch.device | None,
        q_offset: Any = 0,
        chunk: tuple[int, int, int] | None = None,
    ) -> oracle.Env:
        """The environment of a call, its arguments checked; `chunk` (kv_offset, Q_LEN, KV_LEN): a block
        of a longer problem (`chunk`), whose sizes the inputs' shapes follow."""
        pattern = self._bound
        loc = pattern.loc
        for key in inputs:
            if pattern.input(key) is None:
                names = ", ".join(d.name for d in pattern.inputs) or "none"
                if not self._runtime:
                    raise InputError(f"pattern '{self.name}' has no input '{key}' (its inputs: {names})", loc)
                raise InputError(
                    f"pattern '{self.name}' has no input or runtime parameter '{key}' (its inputs: {names}; "
                    f"its runtime parameters: {', '.join(self._runtime)})",
                    loc,
                )
        for decl in pattern.inputs:
            if decl.name not in inputs:
                raise InputError(f"input '{decl.name}' was not given", decl.loc)
            tensor = inputs[decl.name]
            if not isinstance(tensor, torch.Tensor):
                raise InputTypeError(
                    f"input '{decl.name}' must be a torch.Tensor, got {type(tensor).__name__}", decl.loc
                )
            if tensor.is_nested:
                raise InputError(f"input '{decl.name}' is a nested tensor: {NESTED_ADVICE}", decl.loc)
            if tensor.dtype != getattr(torch, decl.dtype):
                # Never converted: an int64 id may not fit int32, and the caller knows its values.
                hint = f" (convert it: .to(torch.{decl.dtype}))" if decl.dtype in ("int32", "int64") else ""
                raise InputError(
                    f"input '{decl.name}' must be {decl.dtype}, got {str(tensor.dtype)[6:]}{hint}", decl.loc
                )
            if tensor.dim() != len(decl.dims):
                raise InputError(
                    f"input '{decl.name}' must have {len(decl.dims)} dimension(s), "
                    f"got shape {list(tensor.shape)}",
                    decl.loc,
                )
            if device is None:
                device = tensor.device
            elif tensor.device != device:
                raise InputError(f"input '{decl.name}' is on {tensor.device}, expected {device}", decl.loc)
            for axis, dim in enumerate(decl.dims):  # sizes a shape names exactly are inferred from it
                if dim.op is Op.SIZE and dim.attr == "BATCH" and batch is None:
                    batch = tensor.shape[axis]
                if dim.op is Op.SIZE and dim.attr == "NUM_HEADS" and num_heads is None:
                    num_heads = tensor.shape[axis]
        for what, value, names in (
            ("batch", batch, ("b", "BATCH")),
            ("num_heads", num_heads, ("h", "NUM_HEADS")),
        ):
            if value is None and _uses(pattern, *names):
                raise InputError(
                    f"pattern '{self.name}' depends on {names[0]} or {names[1]}: pass {what}= (no input's "
                    f"shape determines it)",
                    loc,
                )
        for what, value in (("batch", batch), ("num_heads", num_heads), ("q_len", q_len), ("kv_len", kv_len)):
            # A torch.SymInt is a size under torch.compile's dynamic shapes. Zero is allowed everywhere,
            # as for the lengths: the result is empty.
            if value is not None and (not isinstance(value, int | torch.SymInt) or isinstance(value, bool)):
                raise InputError(f"{what} must be a non-negative int, got {value!r}", loc)
            if value is not None and value < 0:
                raise InputError(f"{what} must be a non-negative int, got {value!r}", loc)
        if batch is None and isinstance(q_offset, torch.Tensor) and q_offset.dim() == 1:
            batch = q_offset.shape[0]  # one offset per batch row
        offset = self._q_offset(q_offset, batch, q_len, device)
        per_row = isinstance(offset, torch.Tensor)
        # The pattern's Q_LEN is where the queries end (`oracle.Env`): per batch row for per-row offsets.
        sizes = {
            "BATCH": batch,
            "NUM_HEADS": num_heads,
            "Q_LEN": None if per_row else q_len + offset,
            "KV_LEN": kv_len,
        }
        if chunk is not None:
            sizes["Q_LEN"], sizes["KV_LEN"] = chunk[1], chunk[2]
        for decl in pattern.inputs:
            tensor = inputs[decl.name]
            if per_row and any(n.op is Op.SIZE and n.attr == "Q_LEN" for d in decl.dims for n in d.walk()):
                raise InputError(
                    f"input '{decl.name}' has a shape that depends on Q_LEN, which differs per batch row "
                    f"under a q_offset tensor (and in decode): pass q_offset as an int",
                    decl.loc,
                )
            expected = [_dim_value(d, sizes) for d in decl.dims]
            if any(e is not None and e != n for e, n in zip(expected, tensor.shape, strict=True)):
                shown = ["?" if e is None else e for e in expected]
                raise InputError(
                    f"input '{decl.name}' must have shape {shown}, got {list(tensor.shape)}", decl.loc
                )
        return oracle.Env(
            1 if batch is None else batch,
            1 if num_heads is None else num_heads,
            q_len,
            kv_len,
            device or torch.device("cpu"),
            dict(inputs),
            params=dict(params),
            q_offset=offset,
            kv_offset=0 if chunk is None else chunk[0],
            q_size=None if chunk is None else chunk[1],
            kv_size=None if chunk is None else chunk[2],
        )

    def _q_offset(
        self, value: Any, batch: int | None, q_len: int, device: torch.device | None
    ) -> int | torch.Tensor:
        """`q_offset` checked: an int >= 0, or an int32/int64 tensor [B] of them on the call's device,
        with every query position (offset + q_len - 1) inside `SIZE_LIMIT`. A tensor's values are
        checked on the host when it is on the CPU or `ATTNC_DEBUG` is set (it would wait for the GPU);
        else they are the caller's contract."""
        loc = self._bound.loc
        if isinstance(value, torch.Tensor):
            if value.dtype not in (torch.int32, torch.int64):
                raise InputError(f"q_offset must be an int or an int32/int64 tensor, got {value.dtype}", loc)
            if value.dim() != 1 or (batch is not None and value.shape[0] != batch):
                raise InputError(
                    f"q_offset must be an int or a tensor of shape [batch] = [{batch}], got shape "
                    f"{list(value.shape)}",
                    loc,
                )
            if device is not None and value.device != device:
                raise InputError(f"q_offset is on {value.device}, expected {device}", loc)
            if torch.compiler.is_compiling() or (value.device.type != "cpu" and not config.debug()):
                return value
            largest = int(value.max()) if value.numel() else 0
            if value.numel() and (int(value.min()) < 0 or (largest != 0 and largest + q_len > SIZE_LIMIT)):
                raise InputError(
                    f"q_offset must be >= 0 with q_offset + q_len <= {SIZE_LIMIT} (2**30) in every batch "
                    f"row, got values from {int(value.min())} to {int(value.max())} with q_len={q_len}",
                    loc,
                )
            return value
        if isinstance(value, bool) or not isinstance(value, int | torch.SymInt):
            raise InputTypeError(f"q_offset must be an int or an int tensor [batch], got {value!r}", loc)
        if value < 0 or (value != 0 and value + q_len > SIZE_LIMIT):  # (lengths alone: checked elsewhere)
            raise InputError(
                f"q_offset must be >= 0 with q_offset + q_len <= {SIZE_LIMIT} (2**30), got "
                f"q_offset={value} with q_len={q_len}",
                loc,
            )
        return value

    def mask(
        self,
        q_len: int,
        kv_len: int,
        *,
        batch: int | None = None,
        num_heads: int | None = None,
        q_offset: int | torch.Tensor = 0,
        **inputs: Any,
    ) -> torch.Tensor:
        """The dense bool mask, [B or 1, H or 1, q_len, kv_len]: may query row i see key j. At most
        `DENSE_LIMIT` elements. `inputs`: the pattern's inputs and runtime parameter values; `q_offset`
        as for a call: row i is query position `q_offset + i`."""
        env = self._env(q_len, kv_len, batch, num_heads, *self._split(inputs), None, q_offset)
        self._check_dense("the mask", (env.batch, env.num_heads, q_len, kv_len))
        result = oracle.mask(self._bound, env)
        shape = (
            result.shape[0] if batch is None else batch,
            result.shape[1] if num_heads is None else num_heads,
            q_len,
            kv_len,
        )
        return result.expand(shape).contiguous() if result.shape != shape else result

    def plan(
        self,
        q_len: int,
        kv_len: int,
        *,
        block: tuple[int, int] = (128, 128),
        batch: int | None = None,
        num_heads: int | None = None,
        device: torch.device | str | None = None,
        q_offset: int | torch.Tensor = 0,
        **inputs: Any,
    ) -> Plan:
        """What a launch needs: closed-form tile ranges (no tensors) for analytic patterns, else
        block-sparse metadata on the inputs' device (or `device`) built in O(number of tiles). See
        `attnc.runtime.plan.Plan`. `block` is the (query, key) tile size it is made for: a launch given
        the plan (`kern(q, k, v, plan=plan, **inputs)`) runs with it. `q_offset` as for the call the
        plan is for (a tensor's plan serves calls with that very tensor)."""
        block = self._block(block)
        env = self._env(
            q_len,
            kv_len,
            batch,
            num_heads,
            *self._split(inputs),
            None if device is None else torch.device(device),
            q_offset,
        )
        return make_plan(self.pattern, env, block)

    def block_map(
        self,
        q_len: int,
        kv_len: int,
        *,
        block: tuple[int, int] = (128, 128),
        batch: int | None = None,
        num_heads: int | None = None,
        q_offset: int | torch.Tensor = 0,
        **inputs: Any,
    ) -> torch.Tensor:
        """Exact tile classes, int8 [B or 1, H or 1, ceil(q_len / BM), ceil(kv_len / BN)]: 0 EMPTY, 1
        PARTIAL, 2 FULL, counting only positions inside the lengths. The tile analysis settles most
        tiles; the mask is evaluated only on the positions of the tiles it leaves undecided. At most
        `DENSE_LIMIT` tiles (before broadcasting over batch rows and heads the pattern ignores)."""
        bm, bn = self._block(block)
        env = self._env(q_len, kv_len, batch, num_heads, *self._split(inputs), None, q_offset)
        tiles = () if self.pattern.tiles is None else tuple(self.pattern.tiles.roots())
        roots = [r for r in (self._bound.mask, *tiles) if r is not None]
        batches = env.batch if uses(roots, "b") or per_row_plan(env) else 1
        heads = env.num_heads if uses(roots, "h") else 1
        self._check_dense("the block map", (batches, heads, -(-q_len // bm), -(-kv_len // bn)))
        classes = exact_block_map(self._bound, self.pattern, env, (bm, bn), batches, heads)
        shape = (
            batches if batch is None else batch,
            heads if num_heads is None else num_heads,
            *classes.shape[2:],
        )
        return classes.expand(shape) if classes.shape != shape else classes

    def _check_dense(self, what: str, shape: tuple[int, ...]) -> None:
        """Refuse a dense result of more than `DENSE_LIMIT` elements before it is allocated (a mask of
        2**31 x 2**31 would otherwise be met by the OOM killer, not an error)."""
        if math.prod(shape) > DENSE_LIMIT:
            raise InputError(
                f"{what} would have {math.prod(shape)} elements {list(shape)}, more than "
                f"attnc.api.DENSE_LIMIT ({DENSE_LIMIT}); it is dense by nature (kern.plan is not)",
                self._bound.loc,
            )

    def _block(self, block: Any) -> tuple[int, int]:
        if (
            not isinstance(block, tuple | list)
            or len(block) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in block)
        ):
            raise InputError(
                f"block must be two positive ints (BLOCK_M, BLOCK_N), got {block!r}", self._bound.loc
            )
        return int(block[0]), int(block[1])

    @_raised_when_run
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        return_lse: bool = False,
        plan: Plan | None = None,
        q_offset: int | torch.Tensor = 0,
        kernel_options: Mapping[str, int] | None = None,
        enable_gqa: bool | None = None,
        return_aux: bool = False,
        **inputs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Attention with this pattern, by its fused Triton kernel (on CPU tensors, under Triton's
        interpreter). Differentiable: gradients flow to q, k, v, to the float inputs the score reads
        (one that requires grad but only appears in the mask is an error) and from the lse; the call is
        one custom op (`attnc::attention`) to `torch.compile`.

        q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv], Hq % Hkv == 0 (GQA); float16,
        bfloat16 or float32, all one dtype, on one device; D and Dv at most 256. `inputs` are the
        pattern's input tensors, by name, on the same device, and values of its runtime parameters for
        this call (`window=512`; the others are `self.params`'). Under `torch.compile` an int value
        becomes dynamic on its second value (one graph for all later ones); a float one is specialised.
        `out` [B, Hq, Lq, Dv] has q's dtype; lse [B, Hq, Lq] (natural log, float32) comes with
        `return_lse=True`. A query that may see no key gets output 0 and lse -inf. Zero batch rows,
        heads or lengths give empty results.

        `scale` (default D ** -0.5) must be finite and at most float32's largest value in magnitude.
        The kernels compute scores in float32: keeping the scaled, score-modified scores finite there is
        the caller's part (the float64 oracle may be finite where they overflow). Under `torch.compile`
        a float `scale` is a constant of the graph, one graph per value; to change it every step, fold it
        into q: `kern(q * s, k, v, scale=1.0)` compiles once for a tensor `s` (twice for a float: the
        second value makes it dynamic), and gives `s` a gradient.

        Reverse-mode autograd, once: forward-mode AD (`torch.func.jvp`, `jacfwd`, `forward_ad`) and
        double backward raise `NotImplementedError` (see `attnc/runtime/autograd.py`).

        `plan`: a plan from `self.plan(...)` for this call's lengths, inputs and parameter values (an
        `InputError` otherwise, `Plan.check_call`); the forward and backward launch with its block size
        and metadata. Without one, a call reuses the plan of the last call with the same lengths and
        inputs (`attnc.runtime.launch.PlanCache`).

        `q_offset`: where the queries sit in the pattern (chunked prefill, decoding): row i of batch row
        b is query position `q_offset + i`, or `q_offset[b] + i` for an int32/int64 tensor [B] on q's
        device; the pattern's Q_LEN is then `q_offset + Lq` (where the queries end), its KV_LEN the key
        length, so `kv <= q` is a decoder's causal mask. Offsets are >= 0 with `q_offset + Lq <= 2**30`
        (checked on the host for ints and CPU tensors; for a GPU tensor with `ATTNC_DEBUG=1`). A tensor
        makes plans per batch row, and patterns whose input shapes name Q_LEN need an int.

        `return_aux=True` returns `(out, lse, max_scores)`: besides the lse, each query's largest allowed
        score (after the score function, natural domain, -inf for a query that may see no key; no
        gradient), for logit monitoring.

        `kernel_options`: `{"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}`, any of them,
        for this call's launches, forward and backward; the others are chosen as usual. They take
        precedence over `ATTNC_CONFIG`, the autotuner and a plan's block (the plan is then derived for
        the new block). Blocks are powers of two from 16 to 1024, warps a power of two up to 32, stages
        1 to 16; a configuration the device cannot hold fails in Triton at launch. `"SPLIT_KV": n` (1
        to 1024) splits the forward's keys of each query tile into n parts computed in parallel and
        merged by lse (flash-decoding; analytic patterns only, metadata ones run unsplit); by default
        the launcher splits on a GPU when the query tiles alone cannot fill it (`launch.kv_splits`).
        `"PACK_GQA": True` puts the query heads of each key/value head into the same tiles (each key
        tile read once per group; patterns that do not read `h`), False never; by default on a GPU
        for grouped heads whose queries fill at most half a tile (`launch.pack_gqa`).
        """
        self._check_qkv(q, k, v)
        loc = self._bound.loc
        self._check_gqa(enable_gqa, q, k)
        if q.dtype not in DTYPES and q.dtype != torch.float64:
            raise InputError(f"q must be float16, bfloat16, float32 or float64, got {str(q.dtype)[6:]}", loc)
        # Under autocast the op casts q, k and v to one dtype (`autograd._autocast_rule`), as SDPA does
        # (float64 is left alone).
        autocast = torch.is_autocast_enabled(q.device.type) and q.dtype != torch.float64
        for name, t in (("k", k), ("v", v)):
            if t.dtype != q.dtype and not (autocast and t.dtype in DTYPES):
                raise InputError(
                    f"{name} must have q's dtype {str(q.dtype)[6:]}, got {str(t.dtype)[6:]}", loc
                )
        if not isinstance(return_aux, bool):
            raise InputTypeError(f"return_aux must be a bool, got {return_aux!r}", loc)
        if q.dtype == torch.float64:
            self._kernel_options(kernel_options)  # checked, though they do not apply
            return self._float64(q, k, v, scale, return_lse, return_aux, plan, q_offset, inputs)
        self._check_launchable(q.device, q.shape[3], v.shape[3])
        for name, size in (
            ("batch", q.shape[0]),
            ("heads", q.shape[1]),
            ("q_len", q.shape[2]),
            ("kv_len", k.shape[2]),
        ):
            if size > SIZE_LIMIT:
                raise InputError(f"{name} must be at most {SIZE_LIMIT}, got {size}", loc)
        if not isinstance(return_lse, bool):
            raise InputTypeError(f"return_lse must be a bool, got {return_lse!r}", loc)
        batch, heads, q_len, dim = q.shape
        inputs, params = self._split(inputs)
        env = self._env(q_len, k.shape[2], batch, heads, inputs, params, q.device, q_offset)
        if plan is not None:
            self._use_plan(plan, env)
        self._check_input_grads(inputs)
        tensors = [inputs[d.name] for d in self._bound.inputs]
        autograd.check_no_forward_ad([q, k, v, *tensors])
        ints, floats = autograd.param_lists(self.pattern, params)
        offsets = env.q_offset if isinstance(env.q_offset, torch.Tensor) else None
        out, lse = autograd.attention(
            q, k, v, tensors, self._op_pattern, self._scale(scale, dim), ints, floats,
            0 if offsets is not None else env.q_offset, offsets, self._kernel_options(kernel_options),
            return_max=return_aux,
        )  # fmt: skip
        if return_aux:  # lse and the row maxima, which carry no gradient
            return out, lse[0], lse[1].detach()
        return (out, lse) if return_lse else out

    def _check_one_kernel_dtype(self, **tensors: torch.Tensor) -> None:
        """An `InputError` unless the tensors (q, k, v by their argument names) share one dtype the
        kernels compute in (the calls without a float64 path or autocast: `decode`, `varlen`, `chunk`)."""
        dtypes = [t.dtype for t in tensors.values()]
        if dtypes[0] not in DTYPES or any(d != dtypes[0] for d in dtypes):
            raise InputError(
                f"{', '.join(tensors)} must have one dtype of float16, bfloat16, float32, got "
                f"{', '.join(str(d)[6:] for d in dtypes)}",
                self._bound.loc,
            )

    def _check_launchable(self, device: torch.device, dim: int, dim_v: int) -> None:
        """An `InputError` unless the kernels can run on `device` with these head dims (of q/k and v)."""
        loc = self._bound.loc
        if device.type == "cpu" and backend.active() != backend.INTERPRETER:
            raise InputError(
                "q is on the CPU, but this process runs kernels on the GPU: move the tensors to cuda, or set "
                "TRITON_INTERPRET=1 before importing attnc to run every kernel under Triton's interpreter",
                loc,
            )
        if device.type not in ("cuda", "cpu"):
            raise InputError(
                f"tensors on {device.type} are not supported (cuda, or cpu under Triton's interpreter)", loc
            )
        for name, size in (("q and k", dim), ("v", dim_v)):
            if not 1 <= size <= MAX_HEAD_DIM:
                raise InputError(f"the head dim of {name} must be 1 to {MAX_HEAD_DIM}, got {size}", loc)

    def _check_input_grads(self, inputs: Mapping[str, Any]) -> None:
        """An `InputError` for an input that requires grad but gets none from the kernels."""
        for decl in self._bound.inputs:
            if inputs[decl.name].requires_grad and decl.name not in self._differentiable:
                raise InputError(
                    f"input '{decl.name}' requires grad, but it has no gradient: the score does not depend "
                    f"on its values (a mask has no gradient), or reads it at a loop reduction's variable "
                    f"(unrolled reductions, constant bounds of at most 16 terms, have one); pass it detached",
                    decl.loc,
                )

    def _check_gqa(self, enable_gqa: Any, q: torch.Tensor, k: torch.Tensor) -> None:
        """`enable_gqa` as SDPA takes it: None (attnc's default) and True allow grouped-query attention,
        False refuses it."""
        loc = self._bound.loc
        if enable_gqa is not None and not isinstance(enable_gqa, bool):
            raise InputTypeError(f"enable_gqa must be a bool, got {enable_gqa!r}", loc)
        if enable_gqa is False and q.shape[1] != k.shape[1]:
            raise InputError(
                f"enable_gqa=False, but q has {q.shape[1]} heads and k {k.shape[1]}: pass enable_gqa=True "
                f"(or leave it out) for grouped-query attention",
                loc,
            )

    def _float64(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: Any,
        return_lse: Any,
        return_aux: bool,
        plan: Any,
        q_offset: Any,
        inputs: dict[str, Any],
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """float64 q, k and v: the dense oracle in float64, differentiable by torch's autograd (forward
        and reverse mode, double backward), so that `torch.autograd.gradcheck` runs through a call. Slow
        and O(Lq * Lkv) in memory (at most `DENSE_LIMIT` scores); `kernel_options` do not apply."""
        loc = self._bound.loc
        if not isinstance(return_lse, bool):
            raise InputTypeError(f"return_lse must be a bool, got {return_lse!r}", loc)
        batch, heads, q_len, dim = q.shape
        inputs_, params = self._split(inputs)
        env = self._env(q_len, k.shape[2], batch, heads, inputs_, params, q.device, q_offset)
        if plan is not None:
            self._use_plan(plan, env)
        self._check_dense("the float64 path's scores", (batch, heads, q_len, k.shape[2]))
        self._check_input_grads(inputs_)
        scale = self._scale(scale, dim)
        if heads == 0:
            out = q.new_zeros((batch, 0, q_len, v.shape[3]))
            lse = maxima = q.new_zeros((batch, 0, q_len))
        else:
            out, lse, maxima = oracle.attention(
                self._bound, env, q, k, v, scale, torch.float64, return_max=True
            )
        if return_aux:
            return out, lse, maxima.detach()
        return (out, lse) if return_lse else out

    def _kernel_options(self, options: Any) -> list[int] | None:
        """A call's `kernel_options` checked, as the op's [BLOCK_M, BLOCK_N, num_warps, num_stages,
        SPLIT_KV, PACK_GQA (1 on, 2 off)] (0: not given), or None."""
        if options is None:
            return None
        loc = self._bound.loc
        if not isinstance(options, Mapping):
            raise InputTypeError(f"kernel_options must be a dict, got {type(options).__name__}", loc)
        unknown = sorted(str(key) for key in options if key not in KERNEL_OPTIONS)
        if unknown:
            raise InputError(
                f"kernel_options has no option {', '.join(repr(k) for k in unknown)} (the options: "
                f"{', '.join(KERNEL_OPTIONS)})",
                loc,
            )
        for key, value in options.items():
            if key == "PACK_GQA":
                if not isinstance(value, bool):
                    raise InputTypeError(f"kernel_options['PACK_GQA'] must be a bool, got {value!r}", loc)
            elif isinstance(value, bool) or not isinstance(value, int):
                raise InputTypeError(f"kernel_options[{key!r}] must be an int, got {value!r}", loc)
        # Checked as a whole configuration, the options not given at valid stand-ins.
        given = [options.get(key) for key in KERNEL_OPTIONS[:5]]
        defaults = (16, 16, 4, 2)
        stand_in = Config(
            *(d if value is None else value for value, d in zip(given[:4], defaults, strict=True))
        )
        problem = stand_in.problem()
        if problem is not None:
            raise InputError(f"kernel_options: {problem}, got {dict(options)}", loc)
        splits = given[4]
        if splits is not None and not 1 <= splits <= MAX_SPLIT_KV:
            raise InputError(f"kernel_options: SPLIT_KV must be from 1 to {MAX_SPLIT_KV}, got {splits}", loc)
        pack = {None: 0, True: 1, False: 2}[options.get("PACK_GQA")]
        return [*(value or 0 for value in given), pack]

    def _use_plan(self, plan: Any, env: oracle.Env) -> None:
        """Check a call's plan and file it where the launches find it (see `__call__`)."""
        loc = self._bound.loc
        if not isinstance(plan, Plan):
            raise InputTypeError(f"plan must be a Plan from kern.plan(...), got {type(plan).__name__}", loc)
        compiling = torch.compiler.is_compiling()
        plan.check_call(self.pattern, env, compiling)
        bm, bn = plan.block
        if not all(16 <= b <= MAX_BLOCK and b & (b - 1) == 0 for b in plan.block):
            raise InputError(
                f"this plan was made for block=({bm}, {bn}), but a launch needs powers of two from 16 to "
                f"{MAX_BLOCK}: make it with kern.plan(..., block=(128, 64)) or another such block",
                loc,
            )
        if not compiling:  # under torch.compile the op's launch finds or builds its own
            self._forward.plans.put(plan, env)

    def _scale(self, scale: Any, dim: int) -> float:
        if scale is None:
            return dim**-0.5
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise InputTypeError(f"scale must be a real number, got {scale!r}", self._bound.loc)
        scale = float(scale)
        # The kernels multiply in float32: a scale float32 cannot hold would be inf there (and the
        # output NaN). Scaled scores that overflow float32 are the caller's to avoid, as in any
        # float32 attention kernel. Comparisons, not math.isfinite: under torch.compile the scale may
        # be a SymFloat.
        if scale != scale or abs(scale) > FLOAT32_MAX:  # NaN, infinite or too large
            raise InputError(
                f"scale must be finite and at most {FLOAT32_MAX:.7g} in magnitude (the kernels compute in "
                f"float32), got {scale!r}",
                self._bound.loc,
            )
        return scale

    def _check_qkv(self, q: Any, k: Any, v: Any) -> None:
        loc = self._bound.loc
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise InputTypeError(f"{name} must be a 4-D tensor [B, H, L, D], got {type(t).__name__}", loc)
            if t.is_nested:
                raise InputError(f"{name} is a nested tensor: {NESTED_ADVICE}", loc)
            if t.dim() != 4:
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(f"{name} must be a 4-D tensor [B, H, L, D], got {shape}", loc)
            if not t.is_floating_point():
                raise InputError(f"{name} must be a floating-point tensor, got {t.dtype}", loc)
            if t.device != q.device:
                raise InputError(f"{name} is on {t.device}, q on {q.device}", loc)
        if k.shape[0] != v.shape[0] or k.shape[0] not in (q.shape[0], 1):
            raise InputError(
                f"q, k and v must have one batch size (or k and v a batch of 1, broadcast over q's), got "
                f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]}",
                loc,
            )
        if k.shape[3] != q.shape[3]:
            raise InputError(f"q and k must have one head dim, got {q.shape[3]} and {k.shape[3]}", loc)
        if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
            raise InputError(f"k and v must have one [H, L], got {list(k.shape)} and {list(v.shape)}", loc)
        if (k.shape[1] == 0 and q.shape[1] != 0) or (k.shape[1] != 0 and q.shape[1] % k.shape[1] != 0):
            raise InputError(
                f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})", loc
            )

    @_raised_when_run
    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        cache_seqlens: torch.Tensor,
        block_table: torch.Tensor | None = None,
        scale: float | None = None,
        return_lse: bool = False,
        kernel_options: Mapping[str, int] | None = None,
        **inputs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of new tokens against a KV cache (decoding, chunked prefill), forward only.

        q [B, Hq, Lq, D] holds the new tokens; `cache_seqlens` (int32 or int64 [B]) counts each row's
        valid keys, the new ones included: query i of row b is position `cache_seqlens[b] - Lq + i`, key
        j position j, and the pattern's Q_LEN and KV_LEN are both `cache_seqlens[b]`. A row may hold no
        keys (`cache_seqlens[b] == 0`: output 0, lse -inf); else it holds at least its Lq new ones.
        Without `block_table` the cache is k_cache [B, Hkv, Lmax, D], v_cache [B, Hkv, Lmax, Dv]; with
        it (int32 [B, max_pages]) the cache is paged: k_cache [num_pages, page_size, Hkv, D], v_cache
        [num_pages, page_size, Hkv, Dv], page_size a power of two >= 16, and row r of batch row b lives
        in page `block_table[b, r // page_size]`, slot `r % page_size`. The kernel reads only the valid
        rows of the key tiles the pattern visits: a sliding window reads O(window) pages. Inputs sized
        by KV_LEN are sized by the cache's capacity (Lmax, or max_pages * page_size).

        The values of `cache_seqlens` (at most the capacity; 0 or >= Lq) and of the used entries of
        `block_table` (pages of the cache) are checked on the host for CPU tensors and, on a GPU, with
        `ATTNC_DEBUG=1`, by the op (`autograd.check_cache`: under `torch.compile` they are known only when
        the graph runs); otherwise they are the caller's contract: a table entry outside the cache is
        clamped into it (never read outside it) and lengths past the capacity are cut to it, both
        giving wrong numbers. No backward pass (`NotImplementedError` if one is asked for).
        """
        loc = self._bound.loc
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shown = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(f"{name} must be a 4-D tensor, got {shown}", loc)
        self._check_one_kernel_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.device != q.device:
                raise InputError(f"{name} is on {t.device}, q on {q.device}", loc)
        batch, heads, q_len, dim = q.shape
        lens = self._int_tensor("cache_seqlens", cache_seqlens, (batch,), q.device)
        if block_table is None:
            self._check_qkv(q, k_cache, v_cache)
            capacity, kv_heads = k_cache.shape[2], k_cache.shape[1]
        else:
            table = self._int_tensor("block_table", block_table, (batch, None), q.device, exact=torch.int32)
            pages, page_size, kv_heads, k_dim = k_cache.shape
            if tuple(v_cache.shape[:3]) != (pages, page_size, kv_heads):
                raise InputError(
                    f"k_cache and v_cache must have one [pages, page_size, Hkv], got "
                    f"{list(k_cache.shape)} and {list(v_cache.shape)}",
                    loc,
                )
            if page_size < 16 or page_size & (page_size - 1):
                raise InputError(
                    f"page_size (k_cache.shape[1]) must be a power of two >= 16, got {page_size}", loc
                )
            if k_dim != dim:
                raise InputError(f"q and k_cache must have one head dim, got {dim} and {k_dim}", loc)
            if (kv_heads == 0 and heads != 0) or (kv_heads != 0 and heads % kv_heads != 0):
                raise InputError(
                    f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})", loc
                )
            capacity = table.shape[1] * page_size
        self._check_launchable(q.device, dim, v_cache.shape[3])
        if capacity > SIZE_LIMIT or q_len > capacity:
            raise InputError(
                f"the cache holds {capacity} rows: at most {SIZE_LIMIT} and at least Lq={q_len}", loc
            )
        inputs_, params = self._split(inputs)
        # A row without keys visits nothing anyway. Lengths past the capacity are cut to it before the
        # int32 conversion, as the kernel cuts them: a wrapped or huge offset would fail `_env`'s
        # q_offset check, whose message names no argument of this call, before the op checks the
        # lengths themselves (`autograd.check_cache`).
        offsets = (lens.clamp(max=capacity) - q_len).clamp(min=0).to(torch.int32)
        self._env(q_len, capacity, batch, heads, inputs_, params, q.device, offsets)  # checks the inputs
        if not isinstance(return_lse, bool):
            raise InputTypeError(f"return_lse must be a bool, got {return_lse!r}", loc)
        tensors = [inputs_[d.name] for d in self._bound.inputs]
        ints, floats = autograd.param_lists(self.pattern, params)
        out, lse = autograd.attention(
            q, k_cache, v_cache, tensors, self._op_pattern, self._scale(scale, dim), ints, floats,
            0, offsets, self._kernel_options(kernel_options), lens, block_table, where=self._where,
        )  # fmt: skip
        return (out, lse) if return_lse else out

    @_raised_when_run
    def varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        scale: float | None = None,
        return_lse: bool = False,
        kernel_options: Mapping[str, int] | None = None,
        **inputs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention over packed sequences of different lengths (FlashAttention's varlen layout),
        forward only.

        q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv]; sequence i holds rows `cu_seqlens_q[i]` to
        `cu_seqlens_q[i + 1]` of q and `cu_seqlens_k[i]` to `cu_seqlens_k[i + 1]` of k and v
        (int32 or int64 [N + 1], from 0 to Tq / Tk, non-decreasing), and is batch row b = i of the
        pattern, with its own sizes: Q_LEN and KV_LEN are its lengths (b, BATCH = N and positions as
        usual). Tiles never straddle two sequences. `max_seqlen_q`/`max_seqlen_k` are at least every
        sequence's length (they size the launch); inputs indexed by `b` are per sequence, and input
        shapes that name Q_LEN / KV_LEN use max_seqlen_q / max_seqlen_k. Returns out [Tq, Hq, Dv] (and
        lse float32 [Hq, Tq] with `return_lse`). The cumulative lengths are checked on the host for CPU
        tensors and, on a GPU, with `ATTNC_DEBUG=1`, by the op (`autograd.check_cu_seqlens`, as for
        `decode`); otherwise they are the caller's contract (rows past a sequence's `max_seqlen` are not
        computed, and nothing outside the tensors is read). No backward pass (`NotImplementedError` if
        one is asked for).
        """
        loc = self._bound.loc
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                shown = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(
                    f"{name} must be a 3-D tensor [total rows, heads, head dim], got {shown}", loc
                )
        views = [t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)]  # [1, H, T, D], no copy
        self._check_qkv(*views)
        self._check_one_kernel_dtype(q=q, k=k, v=v)
        self._check_launchable(q.device, q.shape[2], v.shape[2])
        cu_q = self._int_tensor("cu_seqlens_q", cu_seqlens_q, (None,), q.device)
        cu_k = self._int_tensor("cu_seqlens_k", cu_seqlens_k, (cu_q.shape[0],), q.device)
        if cu_q.shape[0] < 1:
            raise InputError("cu_seqlens_q must have N + 1 >= 1 entries", loc)
        for name, value, total in (
            ("max_seqlen_q", max_seqlen_q, q.shape[0]),
            ("max_seqlen_k", max_seqlen_k, k.shape[0]),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SIZE_LIMIT:
                raise InputError(f"{name} must be an int from 0 to {SIZE_LIMIT}, got {value!r}", loc)
            if total > SIZE_LIMIT:
                raise InputError(f"the packed tensors may hold at most {SIZE_LIMIT} rows, got {total}", loc)
        if not isinstance(return_lse, bool):
            raise InputTypeError(f"return_lse must be a bool, got {return_lse!r}", loc)
        count = cu_q.shape[0] - 1
        inputs_, params = self._split(inputs)
        env = self._env(max_seqlen_q, max_seqlen_k, count, q.shape[1], inputs_, params, q.device)
        tensors = [inputs_[d.name] for d in self._bound.inputs]
        ints, floats = autograd.param_lists(self.pattern, params)
        out, lse = autograd.attention(
            *views, tensors, self._op_pattern, self._scale(scale, q.shape[2]), ints, floats, 0, None,
            self._kernel_options(kernel_options), None, None, cu_q, cu_k, env.q_len, env.kv_len,
            where=self._where,
        )  # fmt: skip
        out = out[0].transpose(0, 1)
        return (out, lse[0]) if return_lse else out

    @_raised_when_run
    def chunk(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q_offset: int,
        kv_offset: int,
        q_len: int,
        kv_len: int,
        scale: float | None = None,
        return_lse: bool = False,
        kernel_options: Mapping[str, int] | None = None,
        **inputs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of one block of a longer problem of `q_len` queries and `kv_len` keys (context
        parallelism): row i of q is query position `q_offset + i`, row j of k and v key position
        `kv_offset + j`, and the pattern's Q_LEN and KV_LEN are `q_len` and `kv_len` (inputs sized by
        them too). The result is that of the queries over these keys alone: the blocks of one query
        chunk over disjoint key chunks merge by their lse into the whole result
        (`attnc.runtime.launch.merge_splits`). Differentiable, as `__call__` is; q, k, v as there."""
        self._check_qkv(q, k, v)
        loc = self._bound.loc
        self._check_one_kernel_dtype(q=q, k=k, v=v)
        self._check_launchable(q.device, q.shape[3], v.shape[3])
        for name, value in (
            ("q_offset", q_offset),
            ("kv_offset", kv_offset),
            ("q_len", q_len),
            ("kv_len", kv_len),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SIZE_LIMIT:
                raise InputError(f"{name} must be an int from 0 to {SIZE_LIMIT}, got {value!r}", loc)
        if q_offset + q.shape[2] > q_len or kv_offset + k.shape[2] > kv_len:
            raise InputError(
                f"the block (queries {q_offset} to {q_offset + q.shape[2]}, keys {kv_offset} to "
                f"{kv_offset + k.shape[2]}) must lie inside q_len={q_len}, kv_len={kv_len}",
                loc,
            )
        if not isinstance(return_lse, bool):
            raise InputTypeError(f"return_lse must be a bool, got {return_lse!r}", loc)
        batch, heads, rows, dim = q.shape
        inputs_, params = self._split(inputs)
        chunk = (kv_offset, q_len, kv_len)
        self._env(rows, k.shape[2], batch, heads, inputs_, params, q.device, q_offset, chunk)  # checks inputs
        self._check_input_grads(inputs_)
        tensors = [inputs_[d.name] for d in self._bound.inputs]
        autograd.check_no_forward_ad([q, k, v, *tensors])
        ints, floats = autograd.param_lists(self.pattern, params)
        out, lse = autograd.attention(
            q, k, v, tensors, self._op_pattern, self._scale(scale, dim), ints, floats, q_offset, None,
            self._kernel_options(kernel_options), None, None, None, None, 0, 0, kv_offset, q_len, kv_len,
        )  # fmt: skip
        return (out, lse) if return_lse else out

    def _int_tensor(
        self,
        name: str,
        value: Any,
        shape: tuple[int | None, ...],
        device: torch.device,
        exact: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A call's int tensor argument checked: dtype (int32 or int64, or `exact`), shape (None: any
        size there) and device."""
        loc = self._bound.loc
        dtypes = (exact,) if exact is not None else (torch.int32, torch.int64)
        if not isinstance(value, torch.Tensor) or value.dtype not in dtypes:
            shown = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            wanted = " or ".join(str(d)[6:] for d in dtypes)
            raise InputTypeError(f"{name} must be a {wanted} tensor, got {shown}", loc)
        if value.dim() != len(shape) or any(
            s is not None and s != n for s, n in zip(shape, value.shape, strict=True)
        ):
            shown_shape = ["?" if s is None else s for s in shape]
            raise InputError(f"{name} must have shape {shown_shape}, got {list(value.shape)}", loc)
        if value.device != device:
            raise InputError(f"{name} is on {value.device}, q on {device}", loc)
        return value

    def reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        return_lse: bool = False,
        out_dtype: torch.dtype | None = None,
        precision: torch.dtype = torch.float64,
        q_offset: int | torch.Tensor = 0,
        **inputs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Dense attention with this pattern, computed in float64 (the oracle).

        q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv], Hq % Hkv == 0. `out` has q's dtype
        unless `out_dtype` is given; lse (natural log) is float32, or float64 with out_dtype=float64.
        `precision` computes scores, score function and softmax in another float type instead (the
        mask stays exact): the same-dtype dense computation that kernel errors are judged against.
        Its dense scores, B * Hq * Lq * Lkv, may have at most `DENSE_LIMIT` elements.
        """
        self._check_qkv(q, k, v)
        if precision not in (torch.float64, *DTYPES):
            raise InputError(f"precision must be a float dtype, got {precision!r}", self._bound.loc)
        batch, heads, q_len, dim = q.shape
        env = self._env(q_len, k.shape[2], batch, heads, *self._split(inputs), q.device, q_offset)
        self._check_dense("the reference's scores", (batch, heads, q_len, k.shape[2]))
        scale = self._scale(scale, dim)
        if heads == 0:  # no heads: nothing to compute (and no key/value heads to group queries by)
            out = q.new_zeros((batch, 0, q_len, v.shape[3]), dtype=torch.float64)
            lse = q.new_zeros((batch, 0, q_len), dtype=torch.float64)
        else:
            out, lse = oracle.attention(self._bound, env, q, k, v, scale, precision)
        target = q.dtype if out_dtype is None else out_dtype
        out = out.to(target)
        lse = lse.to(torch.float64 if target == torch.float64 else torch.float32)
        return (out, lse) if return_lse else out

    def __repr__(self) -> str:
        """The parameter values, `static` marking those the kernel is specialised on (as in the source);
        the others are the values calls use unless they give their own."""
        params = ", ".join(
            f"{'' if k in self._runtime else 'static '}{k}={v!r}" for k, v in self.params.items()
        )
        return f"<attnc.Kernel {self.name}({params})>"


__all__ = ["INPUT_DTYPES", "INPUT_STAGE", "Kernel", "Loc", "Module", "Pattern", "load", "loads", "stdlib"]
