"""`bind-params`: substitute the values of the static parameters and fold constants; the runtime
parameters become `Op.PARAM` leaves, symbols whose values each launch passes.

A parameter is static if it is declared `static`, is a bool, is named in `specialize` (`attnc ir -D`,
the golden tests), or appears in an input's shape (the shape checks, and the kernel's load guards, need
the dimension's value before the launch); every other int or float parameter is runtime, so that all
its values share one kernel.

**Requires:** an inlined module; `values` gives every static parameter of the entry a constant of its
type (the API checks this against the declarations and reports located errors); values of runtime
parameters are ignored.
**Ensures:** no parameter refs remain; the entry's `bindings` hold the static parameters' values and its
`params` exactly the runtime parameters (in declaration order, not static); every int value
of the bound program stays inside int64 for every launch (`value_ranges.check_fits`), else a located
`AttnTypeError` is raised: the oracle, the plans and the kernels all compute ints in int64.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.analysis.normal_form import fold_constant, value_ranges
from attnc.analysis.value_ranges import ValueRanges, check_fits
from attnc.errors import AttnTypeError, InternalError
from attnc.ir.nodes import ModuleIR, Node, Op, ParamDecl, PatternIR, Type, const, format_const, param
from attnc.ir.reduce import unroll_all
from attnc.ir.rewrite import rewrite


@dataclass(frozen=True)
class BindParams:
    name: ClassVar[str] = "bind-params"
    values: tuple[tuple[str, int | float | bool], ...] = ()
    specialize: frozenset[str] = frozenset()

    def run(self, module: ModuleIR) -> ModuleIR:
        entry = module.entry
        if entry.bindings is not None:
            return module  # already bound
        given = dict(self.values)
        static = static_params(entry, self.specialize)
        nodes: dict[str, Node] = {}
        for decl in entry.params:
            if decl.name not in static:
                nodes[decl.name] = param(decl.name, decl.type)
                continue
            if decl.name not in given:
                raise InternalError(f"bind-params: no value for parameter {decl.name}")
            value = given[decl.name]
            if decl.type is Type.FLOAT:
                value = float(value)
            nodes[decl.name] = const(value)

        def substitute_and_fold(node: Node) -> Node | None:
            # One bottom-up rewrite does both: a parameter is a leaf, so its users are rebuilt on its
            # value before `fold_constant` sees them, as a substitution and then a fold would.
            if node.op is Op.REF and node.attr in nodes:
                return nodes[str(node.attr)]
            return fold_constant(node)

        def bind(root: Node) -> Node:
            # Reductions whose bounds are now constants are unrolled (`ir/reduce.py`), then folded
            # (folded already where there was none to unroll: a fold leaves its own result as it is).
            folded = rewrite(root, substitute_and_fold)
            unrolled = unroll_all(folded)
            return folded if unrolled is folded else rewrite(unrolled, fold_constant)

        inputs = tuple(replace(d, dims=tuple(bind(x) for x in d.dims)) for d in entry.inputs)
        bound = replace(
            entry,
            params=tuple(p for p in entry.params if p.name not in static),
            inputs=inputs,
            mask=None if entry.mask is None else bind(entry.mask),
            score=None if entry.score is None else bind(entry.score),
            bindings=tuple((p.name, nodes[p.name].attr) for p in entry.params if p.name in static),
        )
        # Without lets (an inlined module) these are the ranges the later passes bound the same nodes
        # with (`normal_form.value_ranges`): each node is bounded once in a compilation.
        ranges = value_ranges(bound) if not bound.lets else ValueRanges(bound, dict(bound.lets))
        check_fits(bound, bound.roots(), ranges)
        _check_dimensions(bound, ranges)
        return module.with_entry(bound)


def static_params(pattern: PatternIR, specialize: frozenset[str] = frozenset()) -> frozenset[str]:
    """The names of the parameters the kernel of `pattern` (unbound) is specialised on (see above)."""
    in_shapes = {
        str(n.attr) for decl in pattern.inputs for dim in decl.dims for n in dim.walk() if n.op is Op.REF
    }
    return frozenset(
        p.name for p in pattern.params if p.static or p.type is Type.BOOL or p.name in specialize | in_shapes
    )


def runtime_params(pattern: PatternIR, specialize: frozenset[str] = frozenset()) -> tuple[ParamDecl, ...]:
    """The parameters of `pattern` (unbound) that its kernel takes as arguments, in declaration order."""
    static = static_params(pattern, specialize)
    return tuple(p for p in pattern.params if p.name not in static)


def _check_dimensions(pattern: PatternIR, ranges: ValueRanges) -> None:
    """An input dimension negative for every launch at these parameter values (`input x: bool[w]` with
    `w = -3`) makes a kernel that can never be called: an error where the kernel is made instead.
    `ranges`: the pattern's value ranges, its lets known."""
    given = ", ".join(f"{k}={format_const(v)}" for k, v in pattern.bindings or ())
    for decl in pattern.inputs:
        for dim in decl.dims:
            lowest, highest = ranges.of(dim)
            if highest < 0:
                shown = f"{highest}" if lowest == highest else f"at most {highest}"
                raise AttnTypeError(
                    f"a dimension of input '{decl.name}' cannot be negative, and with {given} it is {shown}",
                    dim.loc or decl.loc,
                )
