"""`bind-params`: substitute the pattern's parameter values, then fold constants.

**Requires:** an inlined module; `values` gives every parameter of the entry a constant of its type
(the API checks this against the declarations and reports located errors).
**Ensures:** no parameter refs remain; the entry's `params` are replaced by `bindings`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.errors import InternalError
from attnc.ir.nodes import ModuleIR, Node, Type, const
from attnc.ir.rewrite import rewrite, substitute
from attnc.passes.canonicalize import fold_constant


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
        return module.with_entry(bound)
