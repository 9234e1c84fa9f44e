"""`canonicalize`: the entry pattern's dims, mask and score in the normal form of
`analysis/normal_form.py` (constant folding, algebraic and boolean simplification, a normal form for
integer comparisons that later analyses match).

**Requires:** an inlined module (lets and calls expanded).
**Ensures:** every expression of the entry is a fixed point of the normal form's rules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.analysis.normal_form import canonicalize
from attnc.ir.nodes import ModuleIR


@dataclass(frozen=True)
class Canonicalize:
    name: ClassVar[str] = "canonicalize"

    def run(self, module: ModuleIR) -> ModuleIR:
        entry = module.entry
        result = replace(
            entry,
            inputs=tuple(
                replace(d, dims=tuple(canonicalize(x, entry) for x in d.dims)) for d in entry.inputs
            ),
            mask=None if entry.mask is None else canonicalize(entry.mask, entry),
            score=None if entry.score is None else canonicalize(entry.score, entry),
        )
        return module.with_entry(result)
