"""`inline`: expand fn calls, pattern references and lets into the entry pattern.

**Requires:** a verified module whose last pattern is the entry.
**Ensures:** the module holds only the entry pattern, with no `call`, `pattern` or let `ref` left
(only parameter refs), no lets, and the inputs of every referenced pattern merged into its own.
A referenced pattern's input that clashes with one of the same name is a located user error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.errors import DuplicateError, Loc
from attnc.ir.nodes import FnIR, InputDecl, ModuleIR, Node, Op, PatternIR, const
from attnc.ir.printer import print_pattern
from attnc.ir.rewrite import rewrite, substitute

# Members read on hot paths, as module constants: a read of `Op.X` or `Type.X` costs Python 3.10 and
# 3.11 a call of `EnumType.__getattr__`'s hook (`ir/nodes.py`).
_CALL = Op.CALL
_PATTERN = Op.PATTERN
_REF = Op.REF
_VAR = Op.VAR


@dataclass(frozen=True)
class Inline:
    name: ClassVar[str] = "inline"

    def run(self, module: ModuleIR) -> ModuleIR:
        return ModuleIR((), (_Inliner(module).entry(),))


class _Inliner:
    def __init__(self, module: ModuleIR) -> None:
        self.module = module
        self.calls: dict[tuple[str, tuple[Node, ...]], Node] = {}
        self.pattern_masks: dict[str, tuple[Node, tuple[InputDecl, ...]]] = {}
        self.inputs: dict[str, InputDecl] = {}
        self.input_origin: dict[str, str] = {}

    def expand(self, root: Node) -> Node:
        return rewrite(root, self._expand_one)

    def _expand_one(self, node: Node) -> Node | None:
        if node.op is _CALL:
            fn = self.module.fn(str(node.attr))
            assert fn is not None
            return self.call(fn, node.args)
        if node.op is _PATTERN:
            target = self.module.pattern(str(node.attr))
            assert target is not None
            mask, inputs = self.pattern_mask(target)
            values = {p.name: a for p, a in zip(target.params, node.args, strict=True)}
            for decl in inputs:
                self.merge_input(
                    replace(decl, dims=tuple(substitute(d, values) for d in decl.dims)), target, node.loc
                )
            return substitute(mask, values)
        return None

    def call(self, fn: FnIR, args: tuple[Node, ...]) -> Node:
        """The fn's body on these (expanded) arguments, expanded: built once per distinct call, with the
        arguments put in while its calls are expanded. (Expanding a body once in terms of its own
        parameters and then substituting each call's arguments into it would rebuild the expanded
        body of every fn in a chain of calls once per link: quadratic in the chain's length.)"""
        key = (fn.name, args)
        if key not in self.calls:
            values = {p.name: a for p, a in zip(fn.params, args, strict=True)}

            def expand_one(node: Node) -> Node | None:
                if node.op is _REF and node.attr in values:
                    return values[str(node.attr)]
                return self._expand_one(node)

            self.calls[key] = rewrite(fn.body, expand_one)
        return self.calls[key]

    def pattern_mask(self, pattern: PatternIR) -> tuple[Node, tuple[InputDecl, ...]]:
        """A referenced pattern's mask in terms of its own parameters, and its inputs (own and inherited)."""
        if pattern.name not in self.pattern_masks:
            saved_inputs, saved_origin = self.inputs, self.input_origin
            self.inputs, self.input_origin = {d.name: d for d in pattern.inputs}, {}
            lets = self.lets(pattern)
            mask = const(True) if pattern.mask is None else substitute(self.expand(pattern.mask), lets)
            self.pattern_masks[pattern.name] = (mask, tuple(self.inputs.values()))
            self.inputs, self.input_origin = saved_inputs, saved_origin
        return self.pattern_masks[pattern.name]

    def lets(self, pattern: PatternIR) -> dict[str, Node]:
        values: dict[str, Node] = {}
        for name, value in pattern.lets:  # in dependency order
            values[name] = substitute(self.expand(value), values)
        return values

    def merge_input(self, decl: InputDecl, source: PatternIR, loc: Loc | None) -> None:
        if any(n.op is _VAR for d in decl.dims for n in d.walk()):
            raise DuplicateError(
                f"input '{decl.name}' of pattern '{source.name}' gets a shape that depends on q, kv, b or h "
                "from the arguments here; pass constants for the parameters in its shape",
                loc,
            )
        existing = self.inputs.get(decl.name)
        if existing is None:
            self.inputs[decl.name] = decl
            self.input_origin[decl.name] = source.name
        elif (existing.dtype, existing.dims) != (decl.dtype, decl.dims):
            raise DuplicateError(
                f"input '{decl.name}' of pattern '{source.name}' differs from the input '{decl.name}' "
                f"already declared (dtype or shape)",
                loc,
            )

    def entry(self) -> PatternIR:
        entry = self.module.entry
        self.inputs = {d.name: d for d in entry.inputs}
        lets = self.lets(entry)
        mask = None if entry.mask is None else substitute(self.expand(entry.mask), lets)
        score = None if entry.score is None else substitute(self.expand(entry.score), lets)
        result = replace(entry, inputs=tuple(self.inputs.values()), lets=(), mask=mask, score=score)
        assert not any(n.op in (_CALL, _PATTERN) for r in result.roots() for n in r.walk()), print_pattern(
            result
        )
        return result
