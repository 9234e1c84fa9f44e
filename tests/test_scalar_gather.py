"""Input loads whose indices take few values over a tile, read as scalars (`codegen/gather.py`).

A block map `blocks[b, h, q // block, kv // block]` takes at most two values along each axis of a tile
no larger than the block (or aligned with it): the kernels load the four scalars at the tile's first
row and key blocks and their successors and choose per row and key column, instead of gathering per
element. The bound on the values (`tile_width`) decides, per tile size, by a constexpr condition;
the same source keeps the per-element gather for tiles where the bound fails (shifted or larger
tiles). Both forms are judged by the dense oracle, forward and backward, with tiles that straddle
blocks (a block of 24 positions under 32-position tiles), ragged lengths, GQA, and shifted chunks.
"""

from __future__ import annotations

import pytest
import torch
from cases import matches_oracle

import attnc
from attnc.codegen.gather import TileAxis, largest_tile, tile_condition, tile_width
from attnc.ir.nodes import Node, Op, const, make, var
from attnc.runtime.launch import merge_splits

SPARSE = attnc.load("examples/dynamic_sparse.attn")
Q = var("q")


# ---- the bound on an index's values over a tile ---------------------------------------------------------


def test_a_block_index_moves_by_one_over_a_tile_no_larger_than_its_block() -> None:
    index = make(Op.FLOORDIV, Q, const(128))
    assert tile_width(index, "q", 127) == 1  # any 128 consecutive positions: two blocks at most
    assert tile_width(index, "q", 127, modulus=128) == 0  # aligned 128-position tiles: one block
    assert tile_width(index, "q", 255) == 2


def test_alignment_narrows_the_bound_of_a_smaller_block() -> None:
    index = make(Op.FLOORDIV, Q, const(64))
    assert tile_width(index, "q", 127) == 2  # 128 positions from anywhere: three blocks of 64
    assert tile_width(index, "q", 127, modulus=128) == 1  # from a multiple of 128: exactly two
    # A block of 24 under 32-position tiles starting at multiples of 32: 32 = 24 + 8 fits two.
    assert tile_width(make(Op.FLOORDIV, Q, const(24)), "q", 31, modulus=32) == 1
    assert tile_width(make(Op.FLOORDIV, Q, const(24)), "q", 31) == 2


def test_shifts_sums_clamps_and_factors_keep_the_bound() -> None:
    shifted = make(Op.SHR, make(Op.ADD, Q, var("b")), const(7))  # (q + b) >> 7
    assert tile_width(shifted, "q", 127) == 1
    clamped = make(Op.MIN, make(Op.UDIV, Q, const(64)), const(3))
    assert tile_width(clamped, "q", 63) == 1
    assert tile_width(make(Op.MUL, const(2), make(Op.FLOORDIV, Q, const(64))), "q", 63) == 2
    assert tile_width(var("h"), "q", 127) == 0  # constant over the tile


@pytest.mark.parametrize(
    "index",
    [
        make(Op.MOD, Q, const(8)),  # wraps around
        make(Op.NEG, Q),  # decreasing
        make(Op.MUL, const(-1), Q),
        make(Op.SUB, const(100), Q),
        make(Op.FLOORDIV, Q, var("h")),  # by a value other than a constant
        make(Op.FLOORDIV, Q, const(0)),  # q // 0 is 0
    ],
    ids=["mod", "neg", "negative factor", "reversed", "runtime divisor", "zero divisor"],
)
def test_an_index_not_provably_non_decreasing_has_no_bound(index: Node) -> None:
    assert tile_width(index, "q", 15) is None


def test_the_constexpr_condition_allows_tiles_up_to_the_largest_that_keeps_two_values() -> None:
    axis = TileAxis("q_first", "BLOCK_M", "SHIFTED == 0", "PACK_GQA == 0")
    index = make(Op.FLOORDIV, Q, const(64))
    assert (largest_tile(index, "q", False), largest_tile(index, "q", True)) == (64, 128)
    assert tile_condition(index, "q", axis) == (
        "(((BLOCK_M <= 64) | ((SHIFTED == 0) & (BLOCK_M <= 128))) & (PACK_GQA == 0))"
    )
    assert tile_condition(make(Op.FLOORDIV, Q, const(4)), "q", axis) is None  # more than two at 16


# ---- the kernels, judged by the oracle ------------------------------------------------------------------


def _block_map(block: int, heads: int, q_len: int, kv_len: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (1, heads, -(-q_len // block), -(-kv_len // block))
    return torch.rand(shape, generator=generator) < 0.5


def _qkv(heads: int, kv_heads: int, q_len: int, kv_len: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, heads, q_len, 16, generator=generator)
    k, v = (torch.randn(1, kv_heads, kv_len, 16, generator=generator) for _ in range(2))
    return q, k, v


def test_a_block_map_straddling_tiles_is_read_as_scalars_and_matches_the_oracle() -> None:
    kern = SPARSE.block_sparse(block=24)  # 32-position tiles (the interpreter's) hold two blocks
    source = kern._forward.source.text
    assert "_11 = tl.load(in_blocks_ptr" in source  # the scalar at (row block + 1, key block + 1)
    q, k, v = _qkv(2, 1, 50, 45)  # GQA, lengths not multiples of the tile or the block
    blocks = _block_map(24, 2, 50, 45)
    matches_oracle(kern, q, k, v, blocks=blocks)


@pytest.mark.parametrize("config", [None, "16,16"], ids=["per-element", "scalars"])
def test_chunks_at_unaligned_offsets_match_the_oracle(
    monkeypatch: pytest.MonkeyPatch, config: str | None
) -> None:
    # Offsets shift the tiles off the block grid: at 32-position tiles a block of 24 may then take three
    # values (the chunks at q 20 and kv 17 start tiles over blocks 0, 1 and 2), so the per-element
    # gather is taken; at 16-position tiles still two (the scalars).
    if config is not None:
        monkeypatch.setenv("ATTNC_CONFIG", config)
    kern = SPARSE.block_sparse(block=24)
    assert "_11 = tl.load(in_blocks_ptr" in kern._forward.source.text  # both forms: the tiles choose
    length = 56
    q, k, v = (t.requires_grad_() for t in _qkv(1, 1, length, length))
    blocks = _block_map(24, 1, length, length, seed=3)
    rows = []
    for q0, q1 in [(0, 20), (20, 56)]:
        parts = [
            kern.chunk(
                q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], q_offset=q0, kv_offset=k0,
                q_len=length, kv_len=length, return_lse=True, blocks=blocks,
            )
            for k0, k1 in [(0, 17), (17, 56)]
        ]  # fmt: skip
        out, _ = merge_splits(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
        rows.append(out)
    out = torch.cat(rows, dim=2)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = kern.reference(*leaves, blocks=blocks, out_dtype=torch.float64)
    wanted = torch.autograd.grad(expected, leaves, grad.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, wanted, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


# A load with one varying index, read as scalars where a tile may hold two of its blocks: the index at
# the tile's first position and the scalar loads are named apart (the first load's name was the
# index's, which it overwrote: the select then compared positions with a loaded value).
ONE_INDEX = attnc.loads(
    """
pattern key_block_bias(static block: int = 16) {
    input bias: float32[BATCH, (KV_LEN + block - 1) // block]
    score = s + bias[b, kv // block]
}
pattern key_block_mask(static block: int = 16) {
    input blocks: bool[BATCH, (KV_LEN + block - 1) // block]
    mask = blocks[b, kv // block] or kv <= q
}
"""
)


@pytest.mark.parametrize("config", [None, "16,32", "32,32"], ids=["default", "16x32", "32x32"])
def test_one_varying_index_read_as_scalars_matches_the_oracle(
    monkeypatch: pytest.MonkeyPatch, config: str | None
) -> None:
    if config is not None:
        monkeypatch.setenv("ATTNC_CONFIG", config)
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=generator).requires_grad_() for _ in range(3))
    bias = torch.randn(1, 3, generator=generator)
    blocks = torch.tensor([[True, False, True]])
    for kern, inputs in (
        (ONE_INDEX.key_block_bias(), {"bias": bias}),
        (ONE_INDEX.key_block_mask(), {"blocks": blocks}),
    ):
        assert "_1 = tl" in kern._forward.source.text  # the second block's scalar load
        matches_oracle(kern, q, k, v, **inputs)
