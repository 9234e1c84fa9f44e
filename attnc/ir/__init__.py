"""The attnc IR: immutable expression nodes, pattern/fn containers, printer, parser, verifier, evaluator."""

from attnc.ir.nodes import (
    FnIR,
    InputDecl,
    ModuleIR,
    Node,
    Op,
    ParamDecl,
    PatternIR,
    Type,
)

__all__ = ["FnIR", "InputDecl", "ModuleIR", "Node", "Op", "ParamDecl", "PatternIR", "Type"]
