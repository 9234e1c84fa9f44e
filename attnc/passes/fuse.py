"""`fuse`: the mask and the score as the kernel's loop body computes them.

A kernel program owns one query tile and loops over key tiles; each iteration evaluates the score
function and, on PARTIAL tiles only, the mask, over a `[BLOCK_M, BLOCK_N]` grid. This pass rewrites both
expressions into the form that body runs, and adds the derivatives the backward kernels need: the
entry's `KernelValues` (`ir/results.py`):

    kernel mask = ..., score = ..., dscore = ...
        mask     the mask (none when every key is allowed)
        score    the score function of `s` (none when the score is `s`)
        dscore   d score / d s, for the backward kernels (none when it is 1: no score function, or
                 `s + bias`)
    kernel grad K: load = ..., value = ...
                 for the K-th load of a float input in the score whose derivative is not identically
                 zero (`analysis/derivative.py`): the load, and d score / d load (`ScoreGradient`)

Three rewrites, each keeping every value the same:

- **Comparisons by axis.** An int comparison `E op c` whose atoms depend on `q` and on `kv` becomes
  `L op R + c` with the atoms over `kv` in R (`q - kv <= 1023` becomes `q <= kv + 1023`, and
  `doc[b, q] - doc[b, kv] == 0` becomes `doc[b, q] == doc[b, kv]`): each side is computed at the size
  of one axis of the grid, only the comparison at the size of the grid, and no difference of two input
  values can overflow int32. Not made where the moved form could leave int64 (`q - kv <= c` with c
  near 2**63: `kv + c` would wrap), see `value_ranges.py`.
- **Cheap division.** `a // d` and `a % d` where `a >= 0` and `d > 0` for every launch
  (`value_ranges.py`) become `udiv` / `umod`: truncating division, no sign fix-up.
- **Hoisting.** Every largest sub-expression that depends on neither `kv` nor `s` (on `q`, `b`, `h`,
  the sizes, and inputs read at those) is the same for every key tile of a program: it becomes a let
  `row_N`, computed once per query tile before the loop, and the kernel values refer to it.

The pattern's own `mask` and `score` stay as they are: the tile analyses and the oracle read those.

**Requires:** a canonicalized, bound entry pattern without lets. **Ensures:** the entry's `kernel`, as
above; lets `row_N` (hoisted values, used only by them), each used at least once. A kernel computes
only the lets its own values use (the forward kernel never computes a derivative's).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.analysis.derivative import derivative
from attnc.analysis.normal_form import split_comparison, value_ranges
from attnc.ir.nodes import BOUND_MARK, ModuleIR, Node, Op, PatternIR, Type, const
from attnc.ir.results import KernelValues, ScoreGradient
from attnc.ir.rewrite import rewrite

HOIST_PREFIX = "row_"
_LEAVES = (Op.CONST, Op.VAR, Op.SIZE, Op.PARAM, Op.SCORE, Op.REF)


def _uses_kv(node: Node) -> bool:
    return "kv" in node.free


def _loop_invariant(node: Node) -> bool:
    """Whether the value is the same for every key tile of a query tile: it reads neither kv nor s
    (nor a reduction's variable: it is computed inside that reduction's loop)."""
    free = node.free
    return "kv" not in free and "s" not in free and not any(n[0] == BOUND_MARK for n in free)


def kernel_form(root: Node, pattern: PatternIR) -> Node:
    """Comparisons split by axis and division made cheap where proven safe (values unchanged)."""
    ranges = value_ranges(pattern)
    cheap = {Op.FLOORDIV: Op.UDIV, Op.MOD: Op.UMOD}

    def rule(node: Node) -> Node | None:
        split = split_comparison(node, _uses_kv)
        if split is not None and (ranges.fits(split) or not ranges.fits(node)):
            return split  # not where `kv + c` could leave int64 (`sliding_window(window=2**63 - 1)`)
        if node.op in cheap and ranges.nonnegative(node.args[0]) and ranges.positive(node.args[1]):
            return replace(node, op=cheap[node.op])
        return None

    return rewrite(root, rule)


def hoist(roots: dict[Hashable, Node], taken: set[str]) -> tuple[dict[str, Node], dict[Hashable, Node]]:
    """The largest loop-invariant interior sub-expressions of the roots as lets, and the roots
    referring to them: (lets by name, in dependency order; the rewritten roots by key). A node is
    hoisted when it is loop invariant and is a root or has a user that is not."""
    invariant: dict[Node, bool] = {}
    variant_user: dict[Node, bool] = {}
    for root in roots.values():
        variant_user[root] = True
        for n in root.walk():
            invariant.setdefault(n, _loop_invariant(n))
            for a in n.args:
                variant_user[a] = variant_user.get(a, False) or not invariant[n]
    lets: dict[str, Node] = {}
    memo: dict[Node, Node] = {}
    for root in roots.values():
        for n in root.walk(skip=memo.__contains__):
            rebuilt = n.with_args(tuple(memo[a] for a in n.args))
            if invariant[n] and n.op not in _LEAVES and variant_user.get(n, False):
                name = _fresh(len(lets), taken)
                lets[name] = rebuilt
                rebuilt = Node(Op.REF, n.type, (), name)
            memo[n] = rebuilt
    return lets, {key: memo[root] for key, root in roots.items()}


def _fresh(index: int, taken: set[str]) -> str:
    while f"{HOIST_PREFIX}{index}" in taken:
        index += 1
    taken.add(f"{HOIST_PREFIX}{index}")
    return f"{HOIST_PREFIX}{index}"


def score_gradients(pattern: PatternIR) -> tuple[Node | None, list[tuple[Node, Node]]]:
    """d score / d s (None when it is 1), and (load, d score / d load) for each load of a float input
    in the score whose derivative is not identically zero, in a fixed order."""
    score = pattern.score
    if score is None or score.op is Op.SCORE:
        return None, []
    scores = [n for n in score.walk() if n.op is Op.SCORE]
    dscore = derivative(score, scores[0], pattern) if scores else None
    dscore = const(0.0) if dscore is None else None if dscore == const(1.0) else dscore
    loads = []
    for n in score.walk():
        # A load inside a reduction's loop reads a new position on each step: it has no gradient
        # (an input requiring grad there is refused at the call); unrolled reductions have none.
        if n.op is Op.LOAD and n.type is Type.FLOAT and not any(v[0] == BOUND_MARK for v in n.free):
            grad = derivative(score, n, pattern)
            if grad is not None:
                loads.append((n, grad))
    return dscore, loads


def fuse(pattern: PatternIR) -> PatternIR:
    """The pattern with its kernel values and hoisted lets (see the module docstring)."""
    pattern = replace(pattern, lets=tuple((n, v) for n, v in pattern.lets if not n.startswith(HOIST_PREFIX)))
    roots: dict[Hashable, Node] = {}
    if pattern.mask is not None and pattern.mask != const(True):
        roots["mask"] = kernel_form(pattern.mask, pattern)
    if pattern.score is not None and pattern.score.op is not Op.SCORE:
        roots["score"] = kernel_form(pattern.score, pattern)
    dscore, loads = score_gradients(pattern)
    if dscore is not None:
        roots["dscore"] = kernel_form(dscore, pattern)
    for k, (load, grad) in enumerate(loads):
        roots["load", k] = kernel_form(load, pattern)
        roots["value", k] = kernel_form(grad, pattern)
    lets, fused = hoist(roots, {d.name for d in pattern.inputs})
    kernel = KernelValues(
        mask=fused.get("mask"),
        score=fused.get("score"),
        dscore=fused.get("dscore"),
        gradients=tuple(ScoreGradient(fused["load", k], fused["value", k]) for k in range(len(loads))),
    )
    return replace(pattern, lets=pattern.lets + tuple(lets.items()), kernel=kernel)


@dataclass(frozen=True)
class Fuse:
    name: ClassVar[str] = "fuse"

    def run(self, module: ModuleIR) -> ModuleIR:
        return module.with_entry(fuse(module.entry))
