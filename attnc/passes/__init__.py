"""Compiler passes over `ModuleIR`, one per file, and the manager that runs them."""

from attnc.passes.bind_params import BindParams
from attnc.passes.canonicalize import Canonicalize
from attnc.passes.inline import Inline
from attnc.passes.manager import Pass, PassManager

PASSES: dict[str, type] = {
    Inline.name: Inline,
    BindParams.name: BindParams,
    Canonicalize.name: Canonicalize,
}
"""Every pass by its CLI name, in pipeline order."""

__all__ = ["PASSES", "BindParams", "Canonicalize", "Inline", "Pass", "PassManager"]
