"""The compilation pipeline: a flat list of passes, then the lowering to Triton (DESIGN.md section 4).

`compile_pattern` runs all of it on a module from the front end; `optimize` runs any part of it on a
module or on IR text (`attnc opt`), checking before each pass what that pass requires of its input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, TextIO, overload

from attnc.analysis.normal_form import shared_tables
from attnc.codegen.lower import build_spec
from attnc.codegen.spec import KernelSpec
from attnc.errors import AttnError, InternalError, Loc, ParameterError, SourceFile
from attnc.ir.nodes import ModuleIR, Op, ParamDecl, PatternIR, Type, deep_recursion
from attnc.ir.parser import IRParseError, parse_module
from attnc.ir.printer import print_module
from attnc.ir.verify import verify
from attnc.passes import (
    BindParams,
    BlockSparsify,
    Canonicalize,
    ClassifyTiles,
    DeriveRanges,
    Fuse,
    Inline,
    Pass,
    PassManager,
    requirements,
)
from attnc.passes.bind_params import static_params
from attnc.passes.manager import INPUT_STAGE, Compiled
from attnc.passes.requirements import LOWER_STAGE, PipelineError
from attnc.runtime import cache

Value = int | float | bool

PIPELINE: tuple[type[Pass], ...] = (
    Inline,
    BindParams,
    Canonicalize,
    ClassifyTiles,
    DeriveRanges,
    BlockSparsify,
    Fuse,
)
"""The passes of a compilation, in order; `lower-triton` (spec and Triton source) follows them."""
STAGES: tuple[str, ...] = (INPUT_STAGE, *(p.name for p in PIPELINE), LOWER_STAGE)
"""Every stage's name, in pipeline order: the input, the passes, `lower-triton`."""


@dataclass(frozen=True)
class CompiledPattern:
    """Every stage of one compilation: the IR after each pass, the kernel spec and its Triton source."""

    passes: Compiled
    spec: KernelSpec
    source: cache.KernelSource

    @property
    def final(self) -> ModuleIR:
        return self.passes.final

    @property
    def entry(self) -> PatternIR:
        return self.passes.final.entry

    @property
    def stages(self) -> Mapping[str, str]:
        """Text of every stage by name, in pipeline order; `lower-triton` is the Triton source. A pass's
        stage is printed when first read."""
        return self.passes.stages.with_text(LOWER_STAGE, self.source.text)


@dataclass(frozen=True)
class _Inlined:
    """`inline` of a module whose result the caller has already (`Pattern.static_names` inlines to
    decide the static parameters): that result, for that very module; any other module is inlined."""

    name: ClassVar[str] = Inline.name
    source: ModuleIR
    result: ModuleIR

    def run(self, module: ModuleIR) -> ModuleIR:
        return self.result if module is self.source else Inline().run(module)


def compile_pattern(
    module: ModuleIR,
    values: tuple[tuple[str, Value], ...],
    print_between: TextIO | None = None,
    specialize: frozenset[str] = frozenset(),
    inlined: ModuleIR | None = None,
) -> CompiledPattern:
    """Run the pipeline on a pattern (the module's entry) with its parameter values. The kernel is
    specialised on the static parameters and on those named in `specialize`; the others are runtime
    arguments (`bind-params`), whose values here are not part of the result. `inlined`: what `inline`
    makes of `module`, where the caller has it (then the pipeline does not inline it again)."""
    pm = PassManager(print_between=print_between)
    for pass_class in PIPELINE:
        if pass_class is BindParams:
            pm.add(BindParams(values, specialize))
        elif pass_class is Inline and inlined is not None:
            pm.add(_Inlined(module, inlined))
        else:
            pm.add(pass_class())
    # The spec is built in the tables the passes shared: it takes their value ranges.
    with deep_recursion(), shared_tables():
        passes = pm.run(module)
        spec = build_spec(passes.final.entry)
    source = cache.source(passes.final.entry, spec)  # rendered only if neither memory nor disk has it
    pm.emit(len(pm.passes) + 1, LOWER_STAGE, passes.final.entry.name, source.text)
    return CompiledPattern(passes, spec, source)


class IRTextError(AttnError):
    """IR text given to the pass driver that does not parse, or that breaks an IR invariant."""


def parse_ir(text: str, filename: str = "<ir>") -> ModuleIR:
    """The module written as IR text (by `attnc ir`, or by hand), verified; a located `IRTextError`
    where the text is not IR."""
    source = SourceFile(filename, text)
    try:
        module = parse_module(text)
    except IRParseError as err:
        if err.line is None:
            raise IRTextError(f"{filename}: {err.reason}", None) from None
        line = source.line(err.line)
        column = len(line) - len(line.lstrip()) + 1
        raise IRTextError(err.reason, Loc(source, err.line, column, len(line.rstrip()) + 1)) from None
    try:
        verify(module)
    except InternalError as err:  # the verifier's first complaint; the IR text is the user's own
        lines = str(err).splitlines()
        problem = lines[1 if len(lines) > 1 else 0].strip()
        raise IRTextError(f"{filename}: the IR does not verify: {problem}", None) from None
    _check_acyclic(module, filename)
    return module


def _check_acyclic(module: ModuleIR, filename: str) -> None:
    """Refuse a fn or pattern that calls or refers to itself, directly or not: the front end never
    writes one (a located `CycleError`), and `inline` would never end."""
    symbols = (Op.CALL, Op.PATTERN)
    refers: dict[str, set[str]] = {
        f.name: {str(n.attr) for n in f.body.walk() if n.op in symbols} for f in module.fns
    }
    for pattern in module.patterns:
        refers[pattern.name] = {
            str(n.attr) for root in pattern.roots() for n in root.walk() if n.op in symbols
        }
    done: set[str] = set()
    for start in refers:
        if start in done:
            continue
        path, stack = [start], [iter(sorted(refers[start]))]
        while stack:  # depth first, without recursion: a chain of references may be long
            name = next(stack[-1], None)
            if name is None:
                done.add(path.pop())
                stack.pop()
            elif name in path:
                cycle = " -> ".join([*path[path.index(name) :], name])
                raise IRTextError(f"{filename}: a definition refers to itself: {cycle}", None)
            elif name not in done and name in refers:
                path.append(name)
                stack.append(iter(sorted(refers[name])))


def _typed(decl: ParamDecl, value: Value, pattern: str) -> Value:
    """A value given for a parameter, as its type (an int where a float is declared is promoted)."""
    if decl.type is Type.BOOL and isinstance(value, bool):
        return value
    if decl.type is Type.INT and type(value) is int and -(2**63) <= value < 2**63:
        return value
    if decl.type is Type.FLOAT and type(value) in (int, float):
        return float(value)
    raise ParameterError(
        f"parameter '{decl.name}' of pattern '{pattern}' is {decl.type}, got {value!r}", None
    )


def _bind_values(entry: PatternIR, values: Mapping[str, Value]) -> BindParams:
    """`bind-params` for the entry as it reaches that pass: the given values specialise their
    parameters (as `attnc ir -D` does), static parameters not given take their defaults."""
    if entry.bindings is not None and values:
        given = ", ".join(values)
        raise PipelineError(f"pattern '{entry.name}' is bound already: no value to give ({given})", None)
    decls = {d.name: d for d in entry.params}
    for name in values:
        if name not in decls:
            listed = ", ".join(decls) or "none"
            raise ParameterError(
                f"pattern '{entry.name}' has no parameter '{name}' (its parameters: {listed})", entry.loc
            )
    static = static_params(entry, frozenset(values))
    bound: list[tuple[str, Value]] = []
    for decl in entry.params:
        if decl.name in values:
            bound.append((decl.name, _typed(decl, values[decl.name], entry.name)))
        elif decl.default is not None:
            bound.append((decl.name, decl.default.attr))  # type: ignore[arg-type]
        elif decl.name in static:
            raise ParameterError(
                f"parameter '{decl.name}' of pattern '{entry.name}' has no default and was not given",
                decl.loc,
            )
    return BindParams(tuple(bound), frozenset(values))


@dataclass(frozen=True)
class _Checked:
    """A pass as the driver runs it: made for the module that reaches it (`bind-params` needs the
    entry's parameters), after checking the requirements no earlier pass of the run provides. `name`
    is its stage's name: the pass's own, numbered from its second run on (`fuse (2)`), so that every
    stage of the run is kept and printed apart."""

    name: str
    pass_name: str
    make: Callable[[ModuleIR], Pass]
    ran: frozenset[str]

    def run(self, module: ModuleIR) -> ModuleIR:
        requirements.check(self.pass_name, module, self.ran)
        return self.make(module).run(module)


def _maker(name: str, values: Mapping[str, Value]) -> Callable[[ModuleIR], Pass]:
    if name == BindParams.name:
        return lambda module: _bind_values(module.entry, values)
    pass_class = next(p for p in PIPELINE if p.name == name)
    return lambda module: pass_class()


def _check_names(passes: Sequence[str], values: Mapping[str, Value]) -> None:
    known = STAGES[1:]
    for index, name in enumerate(passes):
        if name not in known:
            raise PipelineError(f"unknown pass '{name}' (passes: {', '.join(known)})", None)
        if name == LOWER_STAGE and index != len(passes) - 1:
            raise PipelineError(f"{LOWER_STAGE} makes Triton source, not IR: it can only come last", None)
    if values and BindParams.name not in passes:
        given = ", ".join(values)
        raise PipelineError(f"values for parameters ({given}) need {BindParams.name} among the passes", None)


@overload
def optimize(
    ir: str,
    passes: Sequence[str],
    values: Mapping[str, Value] | None = None,
    print_between: TextIO | None = None,
    filename: str = "<ir>",
) -> str: ...


@overload
def optimize(
    ir: ModuleIR,
    passes: Sequence[str],
    values: Mapping[str, Value] | None = None,
    print_between: TextIO | None = None,
    filename: str = "<ir>",
) -> ModuleIR | str: ...


def optimize(
    ir: ModuleIR | str,
    passes: Sequence[str],
    values: Mapping[str, Value] | None = None,
    print_between: TextIO | None = None,
    filename: str = "<ir>",
) -> ModuleIR | str:
    """Run the named passes, in the order given, on a module or on IR text (`attnc opt`).

    `passes` are names of `STAGES` (not `input`), any of them, repeated or out of pipeline order;
    `lower-triton` may come last, and then the result is the kernel's Triton source. Otherwise the
    result is the module, or its IR text if `ir` was text (`filename` names it in errors). `values`
    gives parameters for `bind-params`, specialising each one named, as `attnc ir -D` does; static
    parameters not named take their defaults. The IR is verified before the first pass and after each;
    `print_between` receives the IR after every stage, as `attnc ir --print-between-passes` prints it
    (a pass's second run is the stage `NAME (2)`).

    Errors, each an `AttnError`: `PipelineError` for an unknown pass name, or a pass whose input lacks
    what it requires (`block-sparsify` before `classify-tiles`), naming what is missing and which pass
    provides it (`passes/requirements.py`); `IRTextError` for text that does not parse (located at its
    line) or verify; `ParameterError` for a value the pattern's parameters refuse.
    """
    values = dict(values or {})
    _check_names(passes, values)
    module = parse_ir(ir, filename) if isinstance(ir, str) else ir
    lower = bool(passes) and passes[-1] == LOWER_STAGE
    pm = PassManager(print_between=print_between)
    # What the passes run so far provide: a pass earlier in the pipeline than one that ran may undo
    # what that one ensured (`bind-params` after `canonicalize` folds into a form not canonical).
    order = {p.name: i for i, p in enumerate(PIPELINE)}
    ran: set[str] = set()
    runs: dict[str, int] = {}
    for name in passes[:-1] if lower else passes:
        runs[name] = runs.get(name, 0) + 1
        stage = name if runs[name] == 1 else f"{name} ({runs[name]})"
        pm.add(_Checked(stage, name, _maker(name, values), frozenset(ran)))
        ran = {done for done in ran if order[done] <= order[name]} | {name}
    with deep_recursion():
        final = pm.run(module).final
        if not lower:
            return print_module(final) if isinstance(ir, str) else final
        requirements.check(LOWER_STAGE, final, ran)
        spec = build_spec(final.entry)
    source = cache.source(final.entry, spec)
    pm.emit(len(pm.passes) + 1, LOWER_STAGE, final.entry.name, source.text)
    return source.text
