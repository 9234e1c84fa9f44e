"""`fuse`: the mask and the score as the kernel's loop body computes them.

A kernel program owns one query tile and loops over key tiles; each iteration evaluates the score
function and, on PARTIAL tiles only, the mask, over a `[BLOCK_M, BLOCK_N]` grid. This pass rewrites both
expressions into the form that body runs, written back as derived values:

    derive kernel_mask = ...    the mask (absent when every key is allowed)
    derive kernel_score = ...   the score function of `s` (absent when the score is `s`)

and what the backward kernels need, the score's derivatives (`analysis/derivative.py`):

    derive kernel_dscore = ...  d score / d s (absent when it is 1: no score function, or `s + bias`)
    derive kernel_grad_load_K = load x[...]
    derive kernel_grad_K = ...  for the K-th load of a float input in the score with a derivative
                                that is not zero: the load, and d score / d load

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

**Requires:** a canonicalized, bound entry pattern without lets. **Ensures:** the derived kernel values
above; lets `row_N` (hoisted values, used only by them), each used at least once. A kernel computes
only the lets its own values use (the forward kernel never computes a derivative's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from attnc.analysis.derivative import derivative
from attnc.analysis.normal_form import split_comparison
from attnc.analysis.value_ranges import ValueRanges
from attnc.ir.nodes import ModuleIR, Node, Op, PatternIR, Type, const
from attnc.ir.rewrite import rewrite
from attnc.passes.classify_tiles import with_derived

HOIST_PREFIX = "row_"
KERNEL_VALUES = ("kernel_mask", "kernel_score", "kernel_dscore")
GRAD_PREFIX = "kernel_grad_"
GRAD_LOAD_PREFIX = "kernel_grad_load_"
_LEAVES = (Op.CONST, Op.VAR, Op.SIZE, Op.SCORE, Op.REF)


def _uses_kv(node: Node) -> bool:
    return "kv" in node.free


def _loop_invariant(node: Node) -> bool:
    """Whether the value is the same for every key tile of a query tile: it reads neither kv nor s."""
    return "kv" not in node.free and "s" not in node.free


def kernel_form(root: Node, pattern: PatternIR) -> Node:
    """Comparisons split by axis and division made cheap where proven safe (values unchanged)."""
    ranges = ValueRanges(pattern)
    cheap = {Op.FLOORDIV: Op.UDIV, Op.MOD: Op.UMOD}

    def rule(node: Node) -> Node | None:
        split = split_comparison(node, _uses_kv)
        if split is not None and (ranges.fits(split) or not ranges.fits(node)):
            return split  # not where `kv + c` could leave int64 (`sliding_window(window=2**63 - 1)`)
        if node.op in cheap and ranges.nonnegative(node.args[0]) and ranges.positive(node.args[1]):
            return replace(node, op=cheap[node.op])
        return None

    return rewrite(root, rule)


def hoist(roots: dict[str, Node], taken: set[str]) -> tuple[dict[str, Node], dict[str, Node]]:
    """The largest loop-invariant interior sub-expressions of the roots as lets, and the roots
    referring to them: (lets by name, in dependency order; the rewritten roots by name). A node is
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
        if n.op is Op.LOAD and n.type is Type.FLOAT:
            grad = derivative(score, n, pattern)
            if grad is not None:
                loads.append((n, grad))
    return dscore, loads


def grad_loads(pattern: PatternIR) -> list[tuple[Node, Node]]:
    """(load, d score / d load) for each `kernel_grad_K` of a fused pattern, in order of K; a load that
    `fuse` hoisted is given as the load itself, not its let."""
    lets = dict(pattern.lets)
    found = []
    k = 0
    while (value := pattern.derived_value(f"{GRAD_PREFIX}{k}")) is not None:
        load = pattern.derived_value(f"{GRAD_LOAD_PREFIX}{k}")
        assert load is not None
        while load.op is Op.REF and str(load.attr) in lets:
            load = lets[str(load.attr)]
        found.append((load, value))
        k += 1
    return found


def differentiable_inputs(pattern: PatternIR) -> set[str]:
    """The inputs of a fused pattern that can have a gradient: float inputs the score reads where
    its derivative is not identically zero."""
    return {str(load.attr) for load, _ in grad_loads(pattern)}


def _is_kernel_value(name: str) -> bool:
    return name in KERNEL_VALUES or name.startswith(GRAD_PREFIX)


def fuse(pattern: PatternIR) -> PatternIR:
    """The pattern with its kernel values and hoisted lets (see the module docstring)."""
    pattern = replace(pattern, lets=tuple((n, v) for n, v in pattern.lets if not n.startswith(HOIST_PREFIX)))
    roots: dict[str, Node] = {}
    if pattern.mask is not None and pattern.mask != const(True):
        roots["kernel_mask"] = kernel_form(pattern.mask, pattern)
    if pattern.score is not None and pattern.score.op is not Op.SCORE:
        roots["kernel_score"] = kernel_form(pattern.score, pattern)
    dscore, loads = score_gradients(pattern)
    if dscore is not None:
        roots["kernel_dscore"] = kernel_form(dscore, pattern)
    for k, (load, grad) in enumerate(loads):
        roots[f"{GRAD_LOAD_PREFIX}{k}"] = kernel_form(load, pattern)
        roots[f"{GRAD_PREFIX}{k}"] = kernel_form(grad, pattern)
    lets, fused = hoist(roots, {d.name for d in pattern.inputs})
    derived = tuple((n, v) for n, v in pattern.derived if not _is_kernel_value(n))
    result = replace(pattern, lets=pattern.lets + tuple(lets.items()), derived=derived)
    return with_derived(result, fused)


@dataclass(frozen=True)
class Fuse:
    name: ClassVar[str] = "fuse"

    def run(self, module: ModuleIR) -> ModuleIR:
        return module.with_entry(fuse(module.entry))
