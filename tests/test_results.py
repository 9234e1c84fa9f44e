"""The typed analysis results (`attnc/ir/results.py`): the verifier rejects each malformed one with its
reason, each is printed and parsed back exactly, and codegen and the runtime read the fields.

Malformed results are made from a well-formed compiled pattern by replacing one field, so each case
breaks exactly one rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

import attnc
from attnc.codegen.lower import build_backward_spec, build_spec
from attnc.errors import InternalError
from attnc.ir.nodes import ModuleIR, Node, Op, PatternIR, Type, const, var
from attnc.ir.parser import IRParseError, parse_module
from attnc.ir.printer import print_module
from attnc.ir.results import (
    AxisRange,
    KernelValues,
    Ranges,
    ScoreGradient,
    Sparsity,
    TileClasses,
    differentiable_inputs,
)
from attnc.ir.verify import verify

STREAMING = """
pattern streaming(window: int = 64, sinks: int = 4) {
    mask = kv <= q and (q - kv < window or kv < sinks)
}"""
PER_HEAD = """
pattern per_head {
    input keep: bool[NUM_HEADS, KV_LEN]
    mask = keep[h, kv]
}"""
PER_BATCH_AND_HEAD = """
pattern per_bh {
    input keep: bool[BATCH, NUM_HEADS, KV_LEN]
    mask = keep[b, h, kv]
}"""
NO_CLOSED_FORM = "pattern scattered { mask = (q * kv) % 5 == 1 }"
BIASED = """
pattern biased {
    input slopes: float32[NUM_HEADS]
    input table: float16[64]
    input doc: int32[KV_LEN]
    mask = doc[q] == doc[kv]
    score = s - slopes[h] * (q - kv) + table[(q - kv) % 64]
}"""
EVERYTHING = "pattern everything { }"
NOTHING = "pattern nothing { mask = false }"


def compiled(source: str, stage: str = "fuse") -> ModuleIR:
    """The module after `stage` of the source's only pattern, compiled with its defaults."""
    module = attnc.loads(source)
    kernel = module[module.patterns[0]]()
    return kernel._compiled.passes.modules[stage]


def with_entry(module: ModuleIR, **fields: object) -> ModuleIR:
    return module.with_entry(replace(module.entry, **fields))


def _reject(source: str, change: Callable[[PatternIR], dict[str, object]]) -> Callable[[], ModuleIR]:
    def build() -> ModuleIR:
        module = compiled(source)
        return with_entry(module, **change(module.entry))

    return build


def _ranges(p: PatternIR) -> Ranges:
    assert p.ranges is not None
    return p.ranges


def _kernel(p: PatternIR) -> KernelValues:
    assert p.kernel is not None
    return p.kernel


def _tiles(p: PatternIR) -> TileClasses:
    assert p.tiles is not None
    return p.tiles


Q = var("q")
KV = var("kv")
Q_FIRST = var("q_first")
KV_FIRST = var("kv_first")

MALFORMED = {
    "tiles typed int": (
        _reject(STREAMING, lambda p: {"tiles": replace(_tiles(p), any=const(1))}),
        "tiles any is not bool",
    ),
    "tiles reading a position": (
        _reject(STREAMING, lambda p: {"tiles": replace(_tiles(p), all=Node(Op.LE, Type.BOOL, (KV, Q)))}),
        "tiles all reads kv, q",
    ),
    "key range reading the key tile": (
        _reject(
            STREAMING,
            lambda p: {
                "ranges": replace(_ranges(p), kv=(replace(_ranges(p).kv[0], lo=KV_FIRST), *_ranges(p).kv[1:]))
            },
        ),
        "range kv 0 lo reads kv_first",
    ),
    "query range reading the query tile": (
        _reject(
            STREAMING,
            lambda p: {
                "ranges": replace(_ranges(p), q=(*_ranges(p).q[:1], replace(_ranges(p).q[1], hi=Q_FIRST)))
            },
        ),
        "range q 1 hi reads q_first",
    ),
    "range typed bool": (
        _reject(
            STREAMING,
            lambda p: {
                "ranges": replace(
                    _ranges(p), q=(replace(_ranges(p).q[0], full_hi=const(True)), *_ranges(p).q[1:])
                )
            },
        ),
        "range q 0 full_hi is not int",
    ),
    "axes with different conjunct counts": (
        _reject(STREAMING, lambda p: {"ranges": replace(_ranges(p), q=_ranges(p).q[:1])}),
        "ranges have 2 kv conjuncts and 1 q conjuncts",
    ),
    "kernel mask reading a tile bound": (
        _reject(
            STREAMING, lambda p: {"kernel": replace(_kernel(p), mask=Node(Op.LE, Type.BOOL, (KV, Q_FIRST)))}
        ),
        "kernel mask reads q_first",
    ),
    "kernel mask reading the score": (
        _reject(
            STREAMING,
            lambda p: {
                "kernel": replace(
                    _kernel(p), mask=Node(Op.GT, Type.BOOL, (Node(Op.SCORE, Type.FLOAT), const(0.0)))
                )
            },
        ),
        "kernel mask reads s",
    ),
    "kernel mask missing": (
        _reject(STREAMING, lambda p: {"kernel": replace(_kernel(p), mask=None)}),
        "kernel mask missing for a pattern with a mask",
    ),
    "kernel score where the pattern has none": (
        _reject(STREAMING, lambda p: {"kernel": replace(_kernel(p), score=Node(Op.SCORE, Type.FLOAT))}),
        "kernel score for a pattern without a score",
    ),
    "kernel dscore typed bool": (
        _reject(BIASED, lambda p: {"kernel": replace(_kernel(p), dscore=const(True))}),
        "kernel dscore is not float",
    ),
    "gradient of an int input": (
        _reject(
            BIASED,
            lambda p: {
                "kernel": replace(
                    _kernel(p), gradients=(ScoreGradient(Node(Op.LOAD, Type.INT, (KV,), "doc"), const(1.0)),)
                )
            },
        ),
        "kernel grad 0 load is not a load of a float input",
    ),
    "gradient of something not a load": (
        _reject(
            BIASED,
            lambda p: {"kernel": replace(_kernel(p), gradients=(ScoreGradient(const(1.0), const(1.0)),))},
        ),
        "kernel grad 0 load is not a load of a float input",
    ),
    "kernel dscore where the kernel has no score": (
        _reject(STREAMING, lambda p: {"kernel": replace(_kernel(p), dscore=const(2.0))}),
        r"kernel dscore for a kernel without a score",
    ),
    "gradient of a load the kernel score does not read": (
        _reject(
            BIASED,
            lambda p: {
                "kernel": replace(
                    _kernel(p),
                    gradients=(ScoreGradient(Node(Op.LOAD, Type.FLOAT, (KV,), "slopes"), const(1.0)),),
                )
            },
        ),
        "kernel grad 0 load is not read by the kernel score",
    ),
    "two gradients of one load": (
        _reject(
            BIASED,
            lambda p: {
                "kernel": replace(_kernel(p), gradients=(*_kernel(p).gradients, _kernel(p).gradients[1]))
            },
        ),
        "kernel grad 2 load is kernel grad 1's too",
    ),
    "unknown sparsity kind": (
        _reject(NO_CLOSED_FORM, lambda p: {"sparsity": Sparsity("dense")}),  # type: ignore[arg-type]
        "unknown sparsity kind 'dense'",
    ),
    "analytic sparsity without ranges": (
        _reject(NO_CLOSED_FORM, lambda p: {"sparsity": Sparsity("analytic")}),
        "sparsity analytic without ranges",
    ),
    "metadata sparsity for a mask with ranges": (
        _reject(STREAMING, lambda p: {"sparsity": Sparsity("metadata")}),
        "sparsity metadata for a mask with ranges",
    ),
    "analytic sparsity with axes": (
        _reject(STREAMING, lambda p: {"sparsity": Sparsity("analytic", ("b",))}),
        r"sparsity analytic with axes \['b'\]",
    ),
    "metadata per a position": (
        _reject(NO_CLOSED_FORM, lambda p: {"sparsity": Sparsity("metadata", ("q",))}),
        r"sparsity axes must be b and/or h, in that order, got \['q'\]",
    ),
    "metadata axes out of order": (
        _reject(NO_CLOSED_FORM, lambda p: {"sparsity": Sparsity("metadata", ("h", "b"))}),
        r"sparsity axes must be b and/or h, in that order, got \['h', 'b'\]",
    ),
    "metadata not per an axis the tiles read": (
        _reject(PER_BATCH_AND_HEAD, lambda p: {"sparsity": Sparsity("metadata", ("h",))}),
        r"sparsity metadata\[h\] is not per b, which the tiles read",
    ),
    "metadata without tile classes": (
        _reject(NO_CLOSED_FORM, lambda p: {"tiles": None}),
        "sparsity metadata without tile classes",
    ),
}


@pytest.mark.parametrize(("build", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_verifier_rejects_a_malformed_result(build: Callable[[], ModuleIR], message: str) -> None:
    with pytest.raises(InternalError, match=message):
        verify(build())


# ---- the IR text -------------------------------------------------------------------------------------

ROUND_TRIPS = {
    "tiles": (STREAMING, "classify-tiles", "tiles"),
    "tiles over inputs": (PER_HEAD, "classify-tiles", "tiles"),
    "ranges": (STREAMING, "derive-ranges", "ranges"),
    "ranges of no conjunct": (NOTHING, "derive-ranges", "ranges"),
    "sparsity analytic": (STREAMING, "block-sparsify", "sparsity"),
    "sparsity metadata": (NO_CLOSED_FORM, "block-sparsify", "sparsity"),
    "sparsity metadata per head": (PER_HEAD, "block-sparsify", "sparsity"),
    "sparsity metadata per batch and head": (PER_BATCH_AND_HEAD, "block-sparsify", "sparsity"),
    "kernel mask": (STREAMING, "fuse", "kernel"),
    "kernel score and gradients": (BIASED, "fuse", "kernel"),
    "kernel of no values": (EVERYTHING, "fuse", "kernel"),
}


@pytest.mark.parametrize(("source", "stage", "field"), ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_result_round_trips_through_the_text(source: str, stage: str, field: str) -> None:
    module = compiled(source, stage)
    assert getattr(module.entry, field) is not None
    text = print_module(module)
    parsed = parse_module(text)
    assert getattr(parsed.entry, field) == getattr(module.entry, field)
    assert print_module(parsed) == text


def test_results_are_printed_one_line_each() -> None:
    text = print_module(compiled(STREAMING, "block-sparsify"))
    lines = [line.split(":")[0].split("=")[0].strip() for line in text.splitlines()]
    assert [line for line in lines if line.startswith(("tiles", "range", "sparsity"))] == [
        "tiles any",
        "ranges conjuncts",
        "range kv 0",
        "range kv 1",
        "range q 0",
        "range q 1",
        "sparsity analytic",
    ]


def test_kernel_values_print_absent_ones_as_none() -> None:
    assert "  kernel mask = none, score = none, dscore = none\n" in print_module(compiled(EVERYTHING))


def test_sparsity_text_names_its_axes() -> None:
    assert [
        str(s) for s in (Sparsity("analytic"), Sparsity("metadata"), Sparsity("metadata", ("b", "h")))
    ] == [
        "analytic",
        "metadata",
        "metadata[b, h]",
    ]


def _edit_line(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_parser_rejects_a_range_out_of_order() -> None:
    text = _edit_line(print_module(compiled(STREAMING, "derive-ranges")), "range kv 1:", "range kv 2:")
    with pytest.raises(IRParseError, match="expected index 1"):
        parse_module(text)


def test_parser_rejects_fewer_ranges_than_announced() -> None:
    text = _edit_line(
        print_module(compiled(STREAMING, "derive-ranges")), "ranges conjuncts = 2", "ranges conjuncts = 3"
    )
    with pytest.raises(IRParseError, match="'ranges' announces 3 conjuncts per axis"):
        parse_module(text)


def test_parser_rejects_kernel_values_out_of_order() -> None:
    text = _edit_line(
        print_module(compiled(EVERYTHING)), "mask = none, score = none", "score = none, mask = none"
    )
    with pytest.raises(IRParseError, match="expected mask"):
        parse_module(text)


@pytest.mark.parametrize("prefix", ["tiles ", "ranges ", "kernel mask", "sparsity ", "mask = ", "score = "])
def test_parser_rejects_a_second_line_of_a_kind_a_pattern_has_once(prefix: str) -> None:
    """Read on, the second line would silently replace the first (the printer never writes two)."""
    text = print_module(compiled(STREAMING.replace("}", "    score = s * 0.5\n}")))
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith(prefix))
    parse_module(text)  # once: accepted
    doubled = "\n".join([*lines[: first + 1], lines[first], *lines[first + 1 :]])
    with pytest.raises(IRParseError, match=f"a second '{prefix.split()[0]}' line in one pattern") as raised:
        parse_module(doubled)
    assert raised.value.line == first + 2


# ---- readers of the fields ---------------------------------------------------------------------------


def test_codegen_builds_metadata_per_the_sparsity_axes() -> None:
    module = with_entry(compiled(NO_CLOSED_FORM), sparsity=Sparsity("metadata", ("h",)))
    verify(module)  # more axes than the tiles read is sound, only wasteful
    spec, backward = build_spec(module.entry), build_backward_spec(module.entry)
    assert (spec.metadata_b, spec.metadata_h) == (False, True)
    assert (backward.metadata_b, backward.metadata_h) == (False, True)


def test_codegen_takes_one_key_range_per_conjunct() -> None:
    entry = compiled(STREAMING).entry
    assert entry.ranges is not None and entry.ranges.conjuncts == 2
    spec = build_spec(entry)
    assert spec.kv_ranges is not None and len(spec.kv_ranges) == 2
    one = replace(entry, ranges=Ranges(entry.ranges.kv[:1], entry.ranges.q[:1]))
    assert len(build_spec(one).kv_ranges or ()) == 1
    assert build_backward_spec(one).q_ranges is not None and len(build_backward_spec(one).q_ranges or ()) == 1


def test_codegen_masks_only_where_the_kernel_has_a_mask() -> None:
    entry = compiled(STREAMING).entry
    assert build_spec(entry).masked.mask is not None
    unmasked = replace(entry, kernel=KernelValues())
    assert build_spec(unmasked).masked.mask is None


def test_codegen_refuses_a_pattern_without_kernel_values() -> None:
    with pytest.raises(InternalError, match="lower-triton runs after block-sparsify and fuse"):
        build_spec(compiled(STREAMING, "block-sparsify").entry)


def test_analytic_plan_carries_the_patterns_ranges() -> None:
    kernel = attnc.loads(STREAMING).streaming()
    plan = kernel.plan(100, 100, block=(16, 16))
    assert kernel.pattern.ranges is not None
    assert plan.sparsity == "analytic"
    assert plan.kv_ranges == kernel.pattern.ranges.kv and plan.q_ranges == kernel.pattern.ranges.q
    assert all(isinstance(r, AxisRange) for r in plan.kv_ranges)


def test_metadata_plan_is_built_per_the_sparsity_axes() -> None:
    kernel = attnc.loads(PER_HEAD).per_head()
    keep = torch.ones(3, 40, dtype=torch.bool)
    plan = kernel.plan(40, 40, block=(16, 16), batch=2, keep=keep)
    assert kernel.pattern.sparsity == Sparsity("metadata", ("h",))
    assert plan.sparsity == "metadata[h]"
    assert plan.kv_tiles is not None and (plan.kv_tiles.batches, plan.kv_tiles.heads) == (1, 3)


def test_differentiable_inputs_are_the_float_loads_of_the_score() -> None:
    entry = compiled(BIASED).entry
    assert differentiable_inputs(entry) == {"slopes", "table"}
    assert differentiable_inputs(compiled(BIASED, "block-sparsify").entry) == frozenset()
