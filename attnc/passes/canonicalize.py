"""`canonicalize`: the entry pattern's dims, mask and score in the normal form of
`analysis/normal_form.py` (constant folding, algebraic and boolean simplification, a normal form for
integer comparisons that later analyses match).

**Requires:** an inlined module (lets and calls expanded).
**Ensures:** every expression of the entry is a fixed point of the normal form's rules, built of
interned nodes (without source locations).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.analysis.normal_form import canonicalize_all
from attnc.ir.nodes import ModuleIR


@dataclass(frozen=True)
class Canonicalize:
    name: ClassVar[str] = "canonicalize"

    def run(self, module: ModuleIR) -> ModuleIR:
        entry = module.entry
        # Source locations have served their purpose by now (bind-params reported what it had to at
        # the user's source): the normal form is built of interned nodes, which hash and compare in C.
        # One rewrite for every expression of the pattern: they share parts.
        dims = [x.canonical for d in entry.inputs for x in d.dims]
        roots = [x.canonical for x in (entry.mask, entry.score) if x is not None]
        forms = iter(canonicalize_all((*dims, *roots), entry))
        inputs = tuple(replace(d, dims=tuple(next(forms) for _ in d.dims)) for d in entry.inputs)
        mask = None if entry.mask is None else next(forms)
        score = None if entry.score is None else next(forms)
        return module.with_entry(replace(entry, inputs=inputs, mask=mask, score=score))
