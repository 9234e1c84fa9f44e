"""`inline`: expand fn calls, pattern references and lets into the entry pattern.

**Requires:** a verified module whose last pattern is the entry.
**Ensures:** the module holds only the entry pattern, with no `call`, `pattern` or let `ref` left
(only parameter refs), no lets, and the inputs of every referenced pattern merged into its own.
A referenced pattern's input that clashes with one of the same name is a located user error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    """Expands calls, references and lets bottom-up, each distinct fn call and pattern reference once:
    a body is expanded with its arguments (and its lets) put in as it is walked, so that the work is
    linear in the program's DAG. (Expanding a body once in terms of its own parameters and then
    substituting each call's arguments into it would rebuild the expanded body of everything below a
    chain of calls or references once per link: quadratic in the chain's length.)"""

    def __init__(self, module: ModuleIR) -> None:
        self.module = module
        # A fn call's body and the inputs of the patterns it references (each with the pattern that
        # declares it), merged again wherever the call is used.
        self.calls: dict[tuple[str, tuple[Node, ...]], tuple[Node, tuple[tuple[InputDecl, str], ...]]] = {}
        # A referenced pattern's mask and inputs (own and inherited, shapes on these arguments).
        self.references: dict[tuple[str, tuple[Node, ...]], tuple[Node, tuple[InputDecl, ...]]] = {}
        self.inputs: dict[str, InputDecl] = {}
        self.input_origin: dict[str, str] = {}

    def expand(self, root: Node, names: dict[str, Node]) -> Node:
        """`root` with its calls and references expanded and each ref in `names` (parameters, lets)
        replaced by its value, which is not walked again."""

        def expand_one(node: Node) -> Node | None:
            if node.op is _REF and node.attr in names:
                return names[str(node.attr)]
            return self._expand_one(node)

        return rewrite(root, expand_one)

    def _expand_one(self, node: Node) -> Node | None:
        if node.op is _CALL:
            fn = self.module.fn(str(node.attr))
            assert fn is not None
            body, inputs = self.call(fn, node.args)
            for decl, origin in inputs:
                source = self.module.pattern(origin)
                assert source is not None
                self.merge_input(decl, source, node.loc)
            return body
        if node.op is _PATTERN:
            target = self.module.pattern(str(node.attr))
            assert target is not None
            mask, inputs = self.reference(target, node.args)
            for decl in inputs:
                self.merge_input(decl, target, node.loc)
            return mask
        return None

    def call(self, fn: FnIR, args: tuple[Node, ...]) -> tuple[Node, tuple[tuple[InputDecl, str], ...]]:
        """The fn's body on these (expanded) arguments, expanded, and the inputs of the patterns it
        references, each with the pattern declaring it; built once per distinct call. (The inputs are
        kept apart, not merged where the call is first expanded, so that each use merges them where
        it is, and a clash is located at that call.)"""
        key = (fn.name, args)
        if key not in self.calls:
            with self._scope({}):
                body = self.expand(fn.body, {p.name: a for p, a in zip(fn.params, args, strict=True)})
                inputs = tuple((d, self.input_origin[d.name]) for d in self.inputs.values())
            self.calls[key] = (body, inputs)
        return self.calls[key]

    def reference(self, pattern: PatternIR, args: tuple[Node, ...]) -> tuple[Node, tuple[InputDecl, ...]]:
        """A referenced pattern's mask on these (expanded) arguments, and its inputs (own and inherited)
        with their shapes on them; built once per distinct reference."""
        key = (pattern.name, args)
        if key not in self.references:
            values = {p.name: a for p, a in zip(pattern.params, args, strict=True)}
            own = {
                d.name: replace(d, dims=tuple(substitute(dim, values) for dim in d.dims))
                for d in pattern.inputs
            }
            with self._scope(own):
                names = self.lets(pattern, values)
                mask = const(True) if pattern.mask is None else self.expand(pattern.mask, names)
                self.references[key] = (mask, tuple(self.inputs.values()))
        return self.references[key]

    @contextmanager
    def _scope(self, inputs: dict[str, InputDecl]) -> Iterator[None]:
        """Inputs merged while a body built once for all its uses is expanded go to `inputs` (a scope of
        its own, which each use then merges where it is); the caller's scope is back after."""
        saved = self.inputs, self.input_origin
        self.inputs, self.input_origin = inputs, {}
        try:
            yield
        finally:
            self.inputs, self.input_origin = saved

    def lets(self, pattern: PatternIR, values: dict[str, Node]) -> dict[str, Node]:
        """`values` and the pattern's lets, each expanded with those before it put in."""
        names = dict(values)
        for name, value in pattern.lets:  # in dependency order
            names[name] = self.expand(value, names)
        return names

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
        lets = self.lets(entry, {})
        mask = None if entry.mask is None else self.expand(entry.mask, lets)
        score = None if entry.score is None else self.expand(entry.score, lets)
        result = replace(entry, inputs=tuple(self.inputs.values()), lets=(), mask=mask, score=score)
        assert not any(n.op in (_CALL, _PATTERN) for r in result.roots() for n in r.walk()), print_pattern(
            result
        )
        return result
