"""`bind-params`: substitute the pattern's parameter values, then fold constants.

**Requires:** an inlined module; `values` gives every parameter of the entry a constant of its type
(the API checks this against the declarations and reports located errors).
**Ensures:** no parameter refs remain; the entry's `params` are replaced by `bindings`; every int value
of the bound program stays inside int64 for every launch (`value_ranges.check_fits`), else a located
`AttnTypeError` is raised: the oracle, the plans and the kernels all compute ints in int64.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.analysis.normal_form import fold_constant
from attnc.analysis.value_ranges import ValueRanges, check_fits
from attnc.errors import AttnTypeError, InternalError
from attnc.ir.nodes import ModuleIR, Node, PatternIR, Type, const, format_const
from attnc.ir.rewrite import rewrite, substitute


@dataclass(frozen=True)
class BindParams:
    name: ClassVar[str] = "bind-params"
    values: tuple[tuple[str, int | float | bool], ...] = ()

    def run(self, module: ModuleIR) -> ModuleIR:
        entry = module.entry
        given = dict(self.values)
        nodes: dict[str, Node] = {}
        for param in entry.params:
            if param.name not in given:
                raise InternalError(f"bind-params: no value for parameter {param.name}")
            value = given[param.name]
            if param.type is Type.FLOAT:
                value = float(value)
            nodes[param.name] = const(value)
        if entry.bindings is not None and not entry.params:
            return module  # already bound

        def bind(root: Node) -> Node:
            return rewrite(substitute(root, nodes), fold_constant)

        inputs = tuple(replace(d, dims=tuple(bind(x) for x in d.dims)) for d in entry.inputs)
        bound = replace(
            entry,
            params=(),
            inputs=inputs,
            mask=None if entry.mask is None else bind(entry.mask),
            score=None if entry.score is None else bind(entry.score),
            bindings=tuple((p.name, nodes[p.name].attr) for p in entry.params),
        )
        check_fits(bound, bound.roots())
        _check_dimensions(bound)
        return module.with_entry(bound)


def _check_dimensions(pattern: PatternIR) -> None:
    """An input dimension negative for every launch at these parameter values (`input x: bool[w]` with
    `w = -3`) makes a kernel that can never be called: an error where the kernel is made instead."""
    ranges = ValueRanges(pattern, dict(pattern.lets))
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
