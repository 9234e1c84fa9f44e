"""Tile analysis: `Kernel.block_map` is exact, `Kernel.plan` is sound, analytic patterns need no tensors.

The judge is the dense oracle: tile classes computed from `kern.mask` (all allowed, some, none, counting
only positions inside the lengths). `block_map` must equal them; a plan may call a tile PARTIAL that is
EMPTY or FULL (it then costs a masked iteration) but never the reverse (that would drop keys or skip the
mask); for the analytic stdlib patterns the closed-form ranges are exact as well.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_canonicalize_soundness import PARAMS, SOUNDNESS, bool_exprs, source

import attnc
from attnc import oracle
from attnc.analysis.summaries import CHUNK, RangeTable
from attnc.errors import InputError
from attnc.ir.nodes import Op, Type
from attnc.ir.results import Sparsity
from attnc.runtime.plan import (
    EMPTY,
    FULL,
    PARTIAL,
    BlockSparse,
    separate_axes,
    tile_bounds,
    tile_env,
)
from attnc.testing import tile_classes as oracle_classes
from attnc.testing import tile_problems

STD = attnc.stdlib()
EXAMPLES = attnc.load("examples/streaming_llm.attn"), attnc.load("examples/gemma_local.attn")


def check(
    kern: attnc.Kernel, q_len: int, kv_len: int, block: tuple[int, int], tight: bool, **kw: Any
) -> attnc.runtime.plan.Plan:
    """block_map exact; plan and transposed plan sound (and exact when `tight`)."""
    problems = tile_problems(kern, q_len, kv_len, block, tight, **kw)
    assert not problems, f"{kern} at {q_len}x{kv_len} {block}: {'; '.join(problems)}"
    return kern.plan(q_len, kv_len, block=block, **kw)


def _ids(x: object) -> str:
    return str(x) if isinstance(x, attnc.Kernel) else ""


# (kernel, whether the ranges are exact)
ANALYTIC = [
    (STD.full(), True),
    (STD.causal(), True),
    (STD.causal_bottom_right(), True),
    (STD.sliding_window(window=1), True),
    (STD.sliding_window(window=7), True),
    (STD.sliding_window(window=40), True),
    (STD.local(left=3, right=5), True),
    (STD.local(left=0, right=0), True),
    (STD.sinks(count=5), True),
    (STD.sinks(count=0), True),
    (STD.prefix_lm(prefix=9), True),
    (STD.prefix_lm(prefix=100), True),
    (STD.dilated(window=3, dilation=2), False),
    (STD.dilated(window=2, dilation=5), False),
    (STD.neighborhood_1d(kernel=5), True),
    (STD.neighborhood_1d(kernel=5, is_causal=True), True),
    (EXAMPLES[0].streaming_llm(window=9, sinks=3), True),
    (EXAMPLES[0].streaming_llm(window=1, sinks=0), True),
    (EXAMPLES[1].gemma_local(window=6), True),
    (attnc.loads("pattern p { mask = q // 8 == kv // 8 and kv <= q }").p(), True),
    (attnc.loads("pattern p { mask = q // 8 == kv // 8 or kv < 3 }").p(), True),
    (attnc.loads("pattern p { mask = kv <= q + KV_LEN - Q_LEN and q - kv < 5 }").p(), True),
    (attnc.loads("pattern p { mask = 2 * kv <= q }").p(), True),
    (attnc.loads("pattern p { mask = q < 10 and kv > 20 or kv == q }").p(), True),
    (attnc.loads("pattern p { mask = false }").p(), True),
]
SHAPES = [(37, 37), (30, 45), (64, 48), (1, 1), (0, 5), (5, 0)]
BLOCKS = [(16, 16), (8, 32), (32, 8), (5, 7), (1, 1)]


@pytest.mark.parametrize(("kern", "tight"), ANALYTIC, ids=_ids)
def test_analytic_patterns(kern: attnc.Kernel, tight: bool) -> None:
    assert kern.pattern.sparsity == Sparsity("analytic")
    for (q_len, kv_len), block in itertools.product(SHAPES, BLOCKS):
        plan = check(kern, q_len, kv_len, block, tight)
        assert plan.analytic and plan.tensors() == {}


METADATA = [
    (STD.neighborhood_2d(height=6, width=7, kernel_h=3, kernel_w=3), "metadata", {}),
    (
        STD.neighborhood_2d(height=6, width=7, kernel_h=3, kernel_w=5, dilation_w=2, causal_h=True),
        "metadata",
        {},
    ),
    (
        STD.neighborhood_3d(depth=3, height=4, width=3, kernel_d=3, kernel_h=3, kernel_w=3),
        "metadata",
        {},
    ),
    (STD.dilated(window=2, dilation=20), "metadata", {}),
    (attnc.loads("pattern p { mask = abs(q - kv) == 3 }").p(), "metadata", {}),
    (attnc.loads("pattern p { mask = (q * kv) % 5 == 1 }").p(), "metadata", {}),  # not strided in kv
]


@pytest.mark.parametrize(("kern", "sparsity", "kw"), METADATA, ids=_ids)
def test_patterns_without_closed_form_get_metadata(kern: attnc.Kernel, sparsity: str, kw: dict) -> None:
    assert str(kern.pattern.sparsity) == sparsity
    length = 42 if "neighborhood_2d" in kern.name else 36
    for block in BLOCKS[:4]:
        plan = check(kern, length, length, block, tight=False, **kw)
        assert not plan.analytic
        check_block_sparse(plan.kv_tiles, plan.block_map())
        check_block_sparse(plan.q_tiles, plan.block_map(transposed=True))
        assert torch.equal(plan.block_map(transposed=True), plan.block_map().transpose(-1, -2))


def check_block_sparse(meta: BlockSparse | None, classes: torch.Tensor) -> None:
    """The fixed-capacity rows are well formed and say what the classes say."""
    assert meta is not None
    shape = (meta.batches, meta.heads, meta.rows)
    for counts, indices, value in (
        (meta.partial_counts, meta.partial_indices, PARTIAL),
        (meta.full_counts, meta.full_indices, FULL),
    ):
        assert counts.dtype == torch.int32 and indices.dtype == torch.int32
        assert counts.shape == shape and indices.shape == (*shape, meta.cols)
        flat_counts, flat = counts.reshape(-1), indices.reshape(-1, meta.cols)
        expected = classes.reshape(-1, meta.cols)
        for r in range(len(flat)):
            cols = flat[r, : flat_counts[r]].tolist()
            assert cols == sorted(cols)
            assert cols == (expected[r] == value).nonzero().flatten().tolist()


# ---- inputs, batch rows and heads ---------------------------------------------------------------------


def documents(batch: int, length: int, seed: int, sort: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5, (batch, length), generator=g, dtype=torch.int32)
    return ids.sort(dim=1).values if sort else ids


DOC = attnc.load("examples/document_causal.attn").document_causal()


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (8, 8), (5, 7)])
def test_document_mask(sort: bool, block: tuple[int, int]) -> None:
    doc = documents(3, 70, seed=block[0] + sort, sort=sort)
    plan = check(DOC, 70, 70, block, tight=False, doc=doc)
    assert plan.sparsity == "metadata[b]" and plan.kv_tiles is not None
    assert plan.kv_tiles.batches == 3 and plan.kv_tiles.heads == 1
    check_block_sparse(plan.kv_tiles, plan.block_map())


def test_document_mask_plan_is_exact_for_sorted_documents_and_aligned_tiles() -> None:
    # Sorted ids and tiles that are whole summary chunks: the range summaries are exact, and so is
    # the overlap test of a query tile's and a key tile's documents.
    doc = documents(2, 200, seed=7)
    plan = check(DOC, 200, 200, (CHUNK, 2 * CHUNK), tight=False, doc=doc)
    expected = oracle_classes(DOC.mask(200, 200, doc=doc), (CHUNK, 2 * CHUNK))
    assert torch.equal(plan.block_map() == EMPTY, expected == EMPTY)


def test_per_head_and_per_batch_metadata() -> None:
    kern = attnc.loads(
        "pattern p {\n input keep: bool[BATCH, NUM_HEADS, KV_LEN]\n mask = keep[b, h, kv] and kv <= q\n}"
    ).p()
    keep = torch.rand(2, 3, 40, generator=torch.Generator().manual_seed(0)) < 0.3
    plan = check(kern, 40, 40, (8, 8), tight=False, keep=keep)
    assert plan.sparsity == "metadata[b, h]"
    assert plan.block_map().shape == (2, 3, 5, 5)


def test_head_dependent_ranges_stay_analytic() -> None:
    kern = attnc.loads("pattern p { mask = kv <= q - 3 * h }").p()
    plan = check(kern, 30, 30, (4, 4), tight=True, num_heads=4)
    assert plan.analytic and plan.block_map().shape == (1, 4, 8, 8)


def test_analytic_plan_costs_nothing_at_any_length() -> None:
    for kern in (STD.causal(), EXAMPLES[0].streaming_llm()):
        plan = kern.plan(1 << 40, 1 << 40)
        assert plan.analytic and plan.tensors() == {} and plan.q_len == 1 << 40


def test_plan_metadata_is_on_the_inputs_device_and_size_is_tiles_not_pairs() -> None:
    doc = documents(1, 4096, seed=1)
    plan = DOC.plan(4096, 4096, block=(128, 128), doc=doc)
    tensors = plan.tensors()
    assert tensors and all(t.device == doc.device for t in tensors.values())
    # Four fixed-capacity lists of 32 x 32 tiles and their per-row counts (the sizes follow from the
    # lengths alone: `BlockSparse`).
    assert sum(t.numel() for t in tensors.values()) == 4 * 32 * 32 + 4 * 32


def test_block_argument_is_checked() -> None:
    for bad in [(0, 16), (16,), "16", (16.0, 16), (True, 16)]:
        with pytest.raises(InputError, match="block must be two positive ints"):
            STD.causal().block_map(8, 8, block=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="input 'doc' was not given"):
        DOC.plan(8, 8)


def test_tile_predicates_do_int_arithmetic_per_axis() -> None:
    # Evaluated over every tile at once, int arithmetic that mixes a query tile's and a key tile's
    # bounds would run at the size of the tile grid; after `separate_axes` only comparisons mix them,
    # and the predicates keep their values.
    doc = documents(2, 300, seed=3)
    env = DOC.plan(300, 300, block=(16, 16), doc=doc).env
    q_first, q_last = tile_bounds(19, 16, 300, env.device)
    kv_first, kv_last = tile_bounds(19, 16, 300, env.device)
    tiles = {
        "q_first": q_first.reshape(1, -1, 1),
        "q_last": q_last.reshape(1, -1, 1),
        "kv_first": kv_first.reshape(1, 1, -1),
        "kv_last": kv_last.reshape(1, 1, -1),
    }
    local = tile_env(env, {"b": torch.arange(2).reshape(-1, 1, 1)}, tiles)
    assert DOC.pattern.tiles is not None
    for name, predicate in (("any", DOC.pattern.tiles.any), ("all", DOC.pattern.tiles.all)):
        separated = separate_axes(predicate)
        assert separated != predicate
        for node in separated.walk():
            names = {str(n.attr) for n in node.walk() if n.op is Op.VAR}
            mixed = names >= {"q_first", "kv_first"} or names >= {"q_last", "kv_last"}
            assert not (node.type is Type.INT and mixed), f"{name} mixes the axes in {node.op}"
        expected = oracle.evaluate(predicate, DOC.pattern, local)
        assert torch.equal(oracle.evaluate(separated, DOC.pattern, local), expected)
        assert expected.any() and not expected.all()


# ---- range summaries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extent", [1, 15, 16, 17, 100, 257])
def test_range_table_bounds(extent: int) -> None:
    g = torch.Generator().manual_seed(extent)
    values = torch.randint(-50, 50, (3, extent), generator=g)
    table = RangeTable.build(values, axis=1)
    lo = torch.randint(-5, extent + 5, (400,), generator=g)
    hi = lo + torch.randint(0, extent + 3, (400,), generator=g)
    row = torch.randint(0, 3, (400,), generator=g)
    low, high = table.query([row, None], lo, hi)
    for i in range(400):
        a, z, r = int(lo[i]), int(hi[i]), int(row[i])
        seen = [int(values[r, j]) if 0 <= j < extent else 0 for j in range(a, z + 1)]
        assert low[i] <= min(seen) and high[i] >= max(seen)
        aligned = a % CHUNK == 0 and a >= 0 and ((z + 1) % CHUNK == 0 or z == extent - 1)
        if aligned and z < extent:
            assert (low[i], high[i]) == (min(seen), max(seen)), (a, z)


# ---- random masks ---------------------------------------------------------------------------------------

B, H, LQ, LKV = 2, 3, 9, 7


@SOUNDNESS
@given(expr=bool_exprs(), params=PARAMS, block=st.sampled_from([(2, 3), (4, 4), (1, 2), (16, 16)]))
def test_random_masks(expr: str, params: dict[str, int], block: tuple[int, int]) -> None:
    kern = attnc.loads(source(expr)).p(**params)
    check(kern, LQ, LKV, block, tight=False, batch=B, num_heads=H)


INPUT_MASKS = st.sampled_from(
    [
        "doc[b, q] == doc[b, kv]",
        "doc[b, q] <= doc[b, kv] + m",
        "doc[b, q // 2] != doc[b, kv + n]",
        "keep[kv] or doc[b, kv] == m",
        "not keep[q] and kv <= q",
        "keep[kv - m] == keep[q]",
        "abs(doc[b, kv] - q) < n",
        "doc[b, (q * kv) % 5] > doc[b, m]",
        "where(keep[q], doc[b, kv] >= 2, kv < m)",
    ]
)


@SOUNDNESS
@given(
    expr=INPUT_MASKS,
    params=PARAMS,
    block=st.sampled_from([(2, 3), (4, 4), (16, 16)]),
    seed=st.integers(0, 2**16),
    sort=st.booleans(),
)
def test_random_masks_with_inputs(
    expr: str, params: dict, block: tuple[int, int], seed: int, sort: bool
) -> None:
    text = (
        "pattern p(m: int, n: int) {\n input doc: int32[BATCH, KV_LEN]\n input keep: bool[KV_LEN]\n"
        f" mask = {expr}\n}}"
    )
    kern = attnc.loads(text).p(**params)
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(-2, 4, (B, LKV), generator=g, dtype=torch.int32)
    doc = doc.sort(dim=1).values if sort else doc
    keep = torch.rand(LKV, generator=g) < 0.5
    check(kern, LQ, LKV, block, tight=False, batch=B, num_heads=H, doc=doc, keep=keep)
