"""The compiled patterns the custom ops run, named by their IR text, so that a saved program reloads.

`attnc::attention` and `attnc::attention_backward` (`runtime/autograd.py`) take plain values only, and a
program that `torch.export` saves keeps those values and nothing of the process that made them. So the
ops name a compiled pattern by its IR after `fuse` (`print_pattern`): the pattern with its static values
bound, its runtime parameters (`!window`, whose values are separate arguments) and every analysis result
the kernels are built from. That text is complete (the kernel spec and the Triton source follow from it
alone: `build_spec`, `cache.source`) and stable across processes (it is what the kernel key hashes), so
a fresh process that has imported attnc (which registers the ops) runs a loaded program: its first call
parses the text and compiles the kernels, or finds them in the on-disk cache.

Why not the `.attn` source and parameter values: compiling source needs the front end and the pass
pipeline (`attnc.compiler`, floor 6), which the runtime (floor 5) must not import; the IR text needs
only the parser and the lowering, which lie below it. The cost is that the text is a saved format: a
program saved by an attnc whose IR text this one cannot read fails with `SavedPatternError`.

A lookup is a dictionary hit on the text (its hash computed once per string object); patterns of one
structure share one `Forward` (its kernels and autotuning), as the kernel key names them.
"""

from __future__ import annotations

import threading

from attnc.codegen.lower import build_spec
from attnc.errors import AttnError, InternalError
from attnc.ir.nodes import ParamDecl, deep_recursion
from attnc.ir.parser import parse_module
from attnc.ir.printer import pattern_header, print_pattern
from attnc.ir.verify import verify
from attnc.runtime import cache
from attnc.runtime.launch import Forward
from attnc.version import __version__


class SavedPatternError(AttnError):
    """The pattern text an op was called with (as a saved program holds it) is not a compiled pattern
    this version of attnc can read."""


_BY_KEY: dict[str, Forward] = {}
"""Every compiled pattern by its kernel key: patterns of one structure share an entry."""

_BY_TEXT: dict[str, Forward] = {}
"""Every pattern text the ops were given or `register` returned, by text."""

_TEXTS: dict[tuple[str, str, tuple[ParamDecl, ...], tuple | None], str] = {}
"""The text of each registered pattern by (kernel key, name, parameters, bindings), which determine it:
a kernel of the same pattern for new parameter values is not printed again."""

_LOCK = threading.Lock()


def register(forward: Forward) -> tuple[Forward, str]:
    """File a compiled pattern's kernels; returns the entry the ops run (shared by every pattern of
    its structure) and the text that names it to them: its header line over the structure text the
    kernel key was computed from (`cache.KernelSource.structure`), which together are `print_pattern`'s
    text, so a build prints the pattern once."""
    pattern = forward.pattern
    # Bindings by `repr`: 0.0 and -0.0, 1 and 1.0 are equal values that print differently.
    bindings = None if pattern.bindings is None else tuple((n, repr(v)) for n, v in pattern.bindings)
    ident = (forward.source.key, pattern.name, pattern.params, bindings)
    with _LOCK:
        shared = _BY_KEY.setdefault(forward.source.key, forward)
        text = _TEXTS.get(ident)
        if text is None:
            structure = forward.source.structure
            text = f"{pattern_header(pattern)}\n{structure}" if structure else print_pattern(pattern)
            _TEXTS[ident] = text
            _BY_TEXT.setdefault(text, shared)
    return shared, text


def find(text: str) -> Forward:
    """The compiled pattern `text` names: filed by `register`, or (in a process that loaded a saved
    program) parsed and compiled now, once."""
    found = _BY_TEXT.get(text)
    if found is not None:
        return found
    forward = _compile(text)
    with _LOCK:
        shared = _BY_KEY.setdefault(forward.source.key, forward)
        return _BY_TEXT.setdefault(text, shared)


def _compile(text: str) -> Forward:
    try:
        with deep_recursion():
            module = parse_module(text)
            verify(module)
    except InternalError as err:  # IRParseError too: the printer of this version did not write it
        first = str(err).strip().splitlines()[0]
        raise SavedPatternError(
            f"the attnc op was given a pattern that attnc {__version__} cannot read ({first}); "
            f"save the program again with this version",
            None,
        ) from None
    pattern = module.entry
    if len(module.patterns) != 1 or module.fns or pattern.kernel is None:
        raise SavedPatternError(
            f"the attnc op was given IR that is not one compiled pattern (after fuse): '{pattern.name}'", None
        )
    with deep_recursion():
        spec = build_spec(pattern)
    return Forward(pattern.name, pattern, spec, cache.source(pattern, spec))
