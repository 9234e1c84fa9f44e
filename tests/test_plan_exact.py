"""Exact launch plans for table lookups: range summaries are exact, so plans of block maps are exact.

A launch plan bounds a load like `blocks[b, h, q // block, kv // block]` over a tile by the minimum and
maximum of the input over the box of indices the tile reads (`analysis/summaries.py`). These tests hold
the summaries to brute force over every box, and the plans of every example and stdlib pattern to the
exact `block_map` (the oracle's): a plan never calls a tile EMPTY or FULL that is not, and it visits a
tile that `block_map` calls EMPTY only within the allowance measured below for that pattern (zero for
every pattern whose tiles follow from per-tile bounds of its inputs: block maps, MoBA, BigBird's table,
vertical-slash, documents).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_canonicalize_soundness import SOUNDNESS
from test_examples import CASES, case_id
from torch.utils._python_dispatch import TorchDispatchMode

import attnc
from attnc.analysis.summaries import (
    CAPTURED_STEPS,
    MAX_ENUMERATED,
    RangeTable,
    TileSpan,
    box_bounds,
    static_width,
)
from attnc.bench import block_map as random_block_map
from attnc.ir.nodes import Node, Op, Type, const, make, param, var
from attnc.runtime.plan import EMPTY, FULL, PARTIAL
from attnc.testing import compare, tile_problems

STD = attnc.stdlib()
SPARSE = attnc.load("examples/dynamic_sparse.attn")


def brute_bounds(values: torch.Tensor, lows: list[int], highs: list[int]) -> tuple[int, int]:
    """(min, max) over the box, reading 0 outside the tensor; 0 for an empty box."""
    if any(lo > hi for lo, hi in zip(lows, highs, strict=True)):
        return 0, 0
    seen = []
    for index in itertools.product(*(range(lo, hi + 1) for lo, hi in zip(lows, highs, strict=True))):
        inside = all(0 <= i < n for i, n in zip(index, values.shape, strict=True))
        seen.append(int(values[index]) if inside else 0)
    return min(seen), max(seen)


# ---- range summaries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int8])
@pytest.mark.parametrize("extent", [0, 1, 7, 16, 17, 40])
def test_range_table_is_exact_over_every_interval(extent: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(extent)
    values = torch.randint(-40, 40, (2, extent), generator=g)
    values = values > 0 if dtype is torch.bool else values.to(dtype)
    table = RangeTable.build(values, axis=1)
    pairs = [(lo, hi) for lo in range(-2, extent + 2) for hi in range(lo - 1, extent + 3)]
    lo = torch.tensor([p[0] for p in pairs]).reshape(1, -1)
    hi = torch.tensor([p[1] for p in pairs]).reshape(1, -1)
    low, high = table.query([torch.arange(2).reshape(-1, 1), None], lo, hi)
    for row in range(2):
        for i, (a, z) in enumerate(pairs):
            expected = brute_bounds(values[row].to(torch.int64), [a], [z])
            assert (int(low[row, i]), int(high[row, i])) == expected, (row, a, z)


@pytest.mark.parametrize("reach", [2, 30], ids=["positions_read_directly", "tabled_along_one_axis"])
def test_box_bounds_are_exact_over_boxes_of_several_axes(reach: int) -> None:
    g = torch.Generator().manual_seed(reach)
    values = torch.randint(-9, 9, (2, 6, 35), generator=g, dtype=torch.int32)
    tables: dict[int, RangeTable] = {}

    def table(axis: int) -> RangeTable:
        return tables.setdefault(axis, RangeTable.build(values, axis))

    boxes = 300
    lows = [torch.randint(-2, 3, (boxes,), generator=g) for _ in range(3)]
    lows[1] = torch.randint(-2, 7, (boxes,), generator=g)
    lows[2] = torch.randint(-3, 37, (boxes,), generator=g)
    spans = [
        torch.randint(-1, min(reach, 5), (boxes,), generator=g),
        torch.randint(-1, reach, (boxes,), generator=g),
    ]
    for ranged in ([1, 2], [0, 1, 2]):
        highs = [lows[0] + (1 if 0 in ranged else 0), lows[1] + spans[0], lows[2] + spans[1]]
        low, high = box_bounds(values, lows, highs, ranged, table)
        for i in range(boxes):
            expected = brute_bounds(values, [int(x[i]) for x in lows], [int(x[i]) for x in highs])
            assert (int(low[i]), int(high[i])) == expected, (ranged, i)


class HostReads(TorchDispatchMode):
    """Records every op that copies a tensor's value to the host (a device synchronisation on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if str(func.overloadpacket) in ("aten._local_scalar_dense", "aten.item", "aten.nonzero"):
            self.seen.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_box_bounds_without_synchronising_are_exact_within_the_captured_steps_and_sound_beyond() -> None:
    # While a CUDA graph captures a plan's build nothing may read a value on the host: the positions
    # off the tabled axis are enumerated a fixed number of times, and a box wider than that gets the
    # whole input's bounds, chosen on the device.
    g = torch.Generator().manual_seed(5)
    values = torch.randint(-9, 9, (40, 12), generator=g, dtype=torch.int32)
    lows = [torch.randint(-2, 42, (400,), generator=g), torch.randint(-2, 14, (400,), generator=g)]
    highs = [
        lows[0] + torch.randint(0, 7, (400,), generator=g),
        lows[1] + torch.randint(0, 6, (400,), generator=g),
    ]
    with HostReads() as reads:
        low, high = box_bounds(values, lows, highs, [0, 1], lambda a: RangeTable.build(values, a), False)
    assert reads.seen == []
    whole = (min(int(values.min()), 0), max(int(values.max()), 0))
    for i in range(400):
        expected = brute_bounds(values, [int(x[i]) for x in lows], [int(x[i]) for x in highs])
        # Axis 1 is enumerated, over the box cut to the positions -1 ..= 12 (one outside reads 0).
        narrow = min(int(highs[1][i]), 12) - max(int(lows[1][i]), -1) < CAPTURED_STEPS
        assert (int(low[i]), int(high[i])) == (expected if narrow else whole), i


def test_box_bounds_with_static_widths_are_exact_without_synchronising() -> None:
    # Boxes whose widths are known on the host (from the tile size) are enumerated that many positions
    # per axis: exact, and nothing is read on the host, also while a CUDA graph captures.
    g = torch.Generator().manual_seed(6)
    values = torch.randint(-9, 9, (40, 12, 30), generator=g, dtype=torch.int32)
    lows = [torch.randint(-2, 42, (120,), generator=g) for _ in range(3)]
    spans = [torch.randint(0, w + 1, (120,), generator=g) for w in (3, 5, 4)]
    highs = [lo + span for lo, span in zip(lows, spans, strict=True)]
    tables = {axis: RangeTable.build(values, axis) for axis in range(3)}
    boxes = [([int(x[i]) for x in lows], [int(x[i]) for x in highs]) for i in range(120)]
    expected = [brute_bounds(values.to(torch.int64), *box) for box in boxes]
    for synchronise in (False, True):
        with HostReads() as reads:
            low, high = box_bounds(values, lows, highs, [0, 1, 2], tables.__getitem__, synchronise, [3, 5, 4])
        assert reads.seen == []
        assert list(zip(low.tolist(), high.tolist(), strict=True)) == expected


Q_FIRST, Q_LAST, KV_FIRST, KV_LAST = var("q_first"), var("q_last"), var("kv_first"), var("kv_last")


def ends(op: Op, *args: Node | int) -> tuple[Node, Node]:
    """The (lo, hi) bounds the interval analysis gives `op(args)` over a tile box: each arg in `q`/`kv`
    at its two ends (the operands given as q, kv or constants; `-q` means the axis reversed)."""
    box = {
        "q": (Q_FIRST, Q_LAST),
        "kv": (KV_FIRST, KV_LAST),
        "-q": (Q_LAST, Q_FIRST),
        "-kv": (KV_LAST, KV_FIRST),
    }
    lo = [box[a][0] if isinstance(a, str) else a if isinstance(a, Node) else const(a) for a in args]
    hi = [box[a][1] if isinstance(a, str) else a if isinstance(a, Node) else const(a) for a in args]
    return make(op, *lo), make(op, *hi)


ALIGNED = {"q": TileSpan(127, 128, 0), "kv": TileSpan(63, 64, 0)}
SHIFTED = {"q": TileSpan(127, 128, 37), "kv": TileSpan(63, 64, 0)}
PER_ROW = {"q": TileSpan(127), "kv": TileSpan(63, 64, 0)}


@pytest.mark.parametrize(
    ("bounds", "spans", "width"),
    [
        (ends(Op.FLOORDIV, "q", 64), ALIGNED, 1),  # 128 aligned rows: 2 blocks of 64
        (ends(Op.FLOORDIV, "q", 64), SHIFTED, 2),  # starting at 37 mod 64: 3 blocks
        (ends(Op.FLOORDIV, "q", 64), PER_ROW, 2),  # a per-row offset: any start
        (ends(Op.FLOORDIV, "kv", 128), ALIGNED, 0),  # a 64-tile inside one 128-block
        (ends(Op.FLOORDIV, "q", 48), ALIGNED, 3),  # gcd(128, 48) = 16: a start at 16 mod 48 at worst
        (ends(Op.SUB, "q", "-kv"), ALIGNED, 190),  # q - kv: both widths
        (ends(Op.MUL, "-kv", -3), ALIGNED, 189),  # decreasing: its ends come from the other tile ends
        (ends(Op.MOD, "q", 10), ALIGNED, 9),
        (ends(Op.MIN, "q", "kv"), ALIGNED, 127),
        (ends(Op.FLOORDIV, "q", param("m", Type.INT)), ALIGNED, 3),  # m = 32, read on the host
        (ends(Op.FLOORDIV, "q", param("m", Type.INT)), {**ALIGNED, "q": TileSpan(127, 1, 0)}, 4),
        (ends(Op.ABS, "q"), ALIGNED, None),  # no static shape: measured on the device
    ],
    ids=[
        "q//64",
        "q//64 shifted",
        "q//64 per-row",
        "kv//128",
        "q//48",
        "q-kv",
        "-3*kv",
        "q%10",
        "min(q,kv)",
        "q//m",
        "q//m per-row",
        "abs(q)",
    ],
)
def test_static_width_of_an_index_follows_from_the_tile_size_and_alignment(
    bounds: tuple[Node, Node], spans: dict[str, TileSpan], width: int | None
) -> None:
    assert static_width(*bounds, spans, {"m": 32}) == width


def test_box_bounds_beyond_the_enumeration_budget_are_the_whole_inputs() -> None:
    # Enumerating more positions per box than the budget allows, and more than a few per element of
    # the input in all, would cost more than the input's size: the bounds of the whole input (and 0)
    # are sound instead.
    values = torch.arange(1, 201, dtype=torch.int32).reshape(200, 1).expand(200, 200).contiguous()
    wide = MAX_ENUMERATED + 1
    lows = [torch.zeros(10_000, dtype=torch.int64), torch.zeros(10_000, dtype=torch.int64)]
    highs = [torch.full((10_000,), wide), torch.full((10_000,), wide)]
    low, high = box_bounds(values, lows, highs, [0, 1], lambda axis: RangeTable.build(values, axis))
    assert (int(low.min()), int(high.max())) == (0, 200)


EXACT_TABLE_MASK = "t[q // m, kv // n] > 0"  # a tile's class follows from its box of the table
TABLE_MASKS = st.sampled_from(
    [
        EXACT_TABLE_MASK,
        "t[q // 3, kv // 2] == t[kv // 4, q // 5]",
        "t[q % 4, kv] < m or kv <= q",
        "t[q - kv + 3, kv // 3] >= n and t[q, q] != 0",
        "t[kv, q] <= t[q + m, kv - n]",
        "not (t[q // 2, kv // 2] == 1) and kv < q + m",
        "t[abs(q - kv), min(q, kv)] == 0",
    ]
)


@settings(SOUNDNESS, max_examples=100)
@given(
    expr=TABLE_MASKS,
    m=st.integers(1, 6),
    n=st.integers(1, 6),
    block=st.sampled_from([(2, 3), (4, 4), (8, 2)]),
    seed=st.integers(0, 2**16),
)
def test_plans_of_two_dimensional_tables_are_sound(
    expr: str, m: int, n: int, block: tuple[int, int], seed: int
) -> None:
    # Random 2-D tables read at indices of both q and kv, some reaching outside the table: the plan
    # may leave a tile PARTIAL but never calls one EMPTY or FULL that is not, and where a tile's class
    # follows from its box of the table alone, the plan is exact.
    kern = attnc.loads(
        f"pattern p(static m: int, static n: int) {{\n input t: int32[7, 9]\n mask = {expr}\n}}"
    ).p(m=m, n=n)
    t = torch.randint(-1, 3, (7, 9), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    problems = tile_problems(kern, 11, 10, block, tight=expr == EXACT_TABLE_MASK, t=t)
    assert not problems, problems


@pytest.mark.parametrize(("m", "n"), [(2, 3), (1, 1), (-2, 3), (0, 2), (5, -1)])
def test_table_indices_divided_by_runtime_parameters_are_bounded_exactly(m: int, n: int) -> None:
    # One kernel for every divisor (runtime parameters): the plan follows the value at each call,
    # whatever its sign (x // 0 is 0).
    kern = attnc.loads(
        "pattern p(m: int, n: int) {\n input t: int32[7, 9]\n mask = t[q // m, kv // n] > 0\n}"
    ).p(m=1, n=1)
    t = torch.randint(-1, 3, (7, 9), generator=torch.Generator().manual_seed(7 * m + n), dtype=torch.int32)
    assert not tile_problems(kern, 11, 10, (4, 2), tight=True, t=t, m=m, n=n)


# ---- plans of block maps ----------------------------------------------------------------------------------


def visited(classes: torch.Tensor) -> int:
    return int((classes != EMPTY).sum())


@pytest.mark.parametrize(
    ("block", "tile"),
    [(4, (8, 8)), (8, (8, 8)), (6, (8, 8)), (16, (8, 16)), (2, (16, 16)), (3, (16, 8))],
    ids=str,
)
@pytest.mark.parametrize("pattern", ["block_sparse", "moba"])
def test_block_map_plans_are_exact(pattern: str, block: int, tile: tuple[int, int]) -> None:
    # Every tile's box of blocks is read exactly: the plan and its transpose are block_map itself.
    length = 50
    name = "blocks" if pattern == "block_sparse" else "selected"
    g = torch.Generator().manual_seed(block)
    shape = (2, 2, -(-length // block), -(-length // block))
    inputs = {name: torch.rand(shape, generator=g) < 0.15}
    kern = SPARSE[pattern](block=block)
    exact = kern.block_map(length, length, block=tile, batch=2, num_heads=2, **inputs)
    plan = kern.plan(length, length, block=tile, batch=2, num_heads=2, **inputs)
    assert torch.equal(plan.block_map(), exact)
    assert torch.equal(plan.block_map(transposed=True).transpose(-1, -2), exact)
    assert visited(exact) < exact.numel()


@pytest.mark.parametrize("pattern", ["block_sparse", "moba"])
def test_kernels_skipping_the_empty_blocks_equal_the_oracle(pattern: str) -> None:
    # Query blocks that select nothing (their rows see no key at all in block_sparse) and sparse
    # selections elsewhere: the kernel visits only the plan's tiles and must still be exact.
    name = "blocks" if pattern == "block_sparse" else "selected"
    g = torch.Generator().manual_seed(3)
    selection = torch.rand(1, 2, 8, 8, generator=g) < 0.2
    selection[:, :, 2] = False
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    kern = SPARSE[pattern](block=8)
    kw = {"batch": 1, "num_heads": 2, name: selection}
    plan = kern.plan(64, 64, block=(16, 16), **kw)
    assert torch.equal(plan.block_map(), kern.block_map(64, 64, block=(16, 16), **kw))
    out, lse = kern(q, k, v, return_lse=True, **{name: selection})
    comparison = compare(kern, out, lse, q, k, v, **{name: selection})
    assert comparison.ok, comparison.describe()


def test_benchmark_block_map_plan_visits_only_the_selected_blocks_at_8k() -> None:
    # The benchmark's block map (attnc/bench.py): 128-position blocks, 10% of the key blocks per query
    # block. The plan's 128 x 128 tiles are the blocks: visited work = ideal work, and all of it FULL.
    blocks = random_block_map(1, 2, 64, 64, 0.1, seed=0)
    kern = SPARSE.block_sparse(block=128)
    plan = kern.plan(8192, 8192, block=(128, 128), batch=1, num_heads=2, blocks=blocks)
    classes = plan.block_map()
    assert visited(classes) == int(blocks.sum())
    assert torch.equal(classes == FULL, blocks)


def test_vertical_slash_plan_reads_each_tiles_columns_and_diagonals_exactly() -> None:
    # Tiles whose box of diagonals starts one position before a multiple of the old summaries' 16-wide
    # chunks: the diagonal just outside the tile must not make it visited.
    length, tile = 64, (16, 16)
    is_column = torch.zeros(1, 1, length, dtype=torch.bool)
    is_diagonal = torch.zeros(1, 1, length, dtype=torch.bool)
    is_diagonal[..., 32] = True  # q - kv == 32 meets the tiles (m, n) with m - n == 2 only
    kern = SPARSE.vertical_slash()
    inputs = {"is_column": is_column, "is_diagonal": is_diagonal}
    exact = kern.block_map(length, length, block=tile, **inputs)
    plan = kern.plan(length, length, block=tile, **inputs)
    assert visited(exact) == 2
    assert torch.equal(plan.block_map(), exact)


# ---- every example and stdlib pattern: plan against block_map --------------------------------------------

BLOCKS = [(4, 4), (8, 16)]
# Tiles a plan visits that block_map calls EMPTY, measured at the tests' sizes (test_examples' cases),
# by (pattern, tile): interval bounds that lose the correlation between two terms, not table lookups —
# `kv - doc_start[b, kv]` in the document prefix LM, the grid coordinates `q // width` and `q % width`
# of the neighbourhood patterns, Swin and STA, a marked column whose pairs in a tile straddling the
# diagonal all lie above it (vertical-slash). Every other pattern: 0.
ALLOWANCE = {
    ("documents.document_prefix_lm", (4, 4)): 10,
    ("documents.document_prefix_lm", (8, 16)): 6,
    ("natten.nat_2d", (4, 4)): 8,
    ("natten.dinat_2d", (4, 4)): 4,
    ("natten.na_3d_video", (8, 16)): 4,
    ("swin.swin_window", (4, 4)): 48,
    ("swin.swin_shifted", (4, 4)): 16,
    ("sliding_tile.sta_2d", (4, 4)): 80,
    ("sliding_tile.sta_2d", (8, 16)): 8,
    ("dynamic_sparse.vertical_slash", (8, 16)): 1,
    ("std.neighborhood_2d", (4, 4)): 8,
    ("std.neighborhood_3d", (8, 16)): 4,
}
STDLIB = {
    "std.full": (STD.full, {}, 29),
    "std.causal": (STD.causal, {}, 29),
    "std.causal_bottom_right": (STD.causal_bottom_right, {}, 29),
    "std.sliding_window": (STD.sliding_window, {"window": 5}, 29),
    "std.local": (STD.local, {"left": 3, "right": 2}, 29),
    "std.sinks": (STD.sinks, {"count": 3}, 29),
    "std.prefix_lm": (STD.prefix_lm, {"prefix": 7}, 29),
    "std.dilated": (STD.dilated, {"window": 3, "dilation": 2}, 29),
    "std.neighborhood_1d": (STD.neighborhood_1d, {"kernel": 5, "dilation": 2, "is_causal": True}, 29),
    "std.neighborhood_2d": (STD.neighborhood_2d, {"height": 5, "width": 6, "kernel_h": 3, "kernel_w": 3}, 30),
    "std.neighborhood_3d": (
        STD.neighborhood_3d,
        {"depth": 3, "height": 4, "width": 5, "kernel_d": 2, "kernel_h": 3, "kernel_w": 3},
        60,
    ),
}


def excess_visits(kern: attnc.Kernel, q_len: int, kv_len: int, block: tuple[int, int], **kw: Any) -> int:
    """Tiles the plan (or its transpose) visits that block_map calls EMPTY; asserts the plan sound."""
    exact = kern.block_map(q_len, kv_len, block=block, **kw)
    plan = kern.plan(q_len, kv_len, block=block, **kw)
    excess = 0
    for planned in (plan.block_map(), plan.block_map(transposed=True).transpose(-1, -2)):
        shape = torch.broadcast_shapes(planned.shape, exact.shape)
        planned, expected = planned.expand(shape), exact.expand(shape)
        wrong = (planned != expected) & (planned != PARTIAL)
        assert not wrong.any(), f"the plan claims a class the tile does not have at {wrong.nonzero()[0]}"
        excess = max(excess, int(((planned != EMPTY) & (expected == EMPTY)).sum()))
    return excess


@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_example_plan_visits_no_empty_tile_beyond_its_allowance(case: Any, block: tuple[int, int]) -> None:
    inputs = case.inputs(case.batch, case.heads, case.length, case.kv_len)
    kw = dict(batch=case.batch, num_heads=case.heads, **inputs)
    excess = excess_visits(case.kernel(), case.length, case.kv_len, block, **kw)
    assert excess <= ALLOWANCE.get((case.id, block), 0)


@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("name", sorted(STDLIB))
def test_stdlib_plan_visits_no_empty_tile_beyond_its_allowance(name: str, block: tuple[int, int]) -> None:
    make, params, length = STDLIB[name]
    excess = excess_visits(make(**params), length, length, block)
    assert excess <= ALLOWANCE.get((name, block), 0)
