"""Key-tile values the kernels compute once per loop instead of once per tile (issue 18 item 2).

The forward's and dQ's key tiles hold consecutive positions `first + offsets`, `offsets` the same in
every tile (`gather.TileAxis.offsets`), so:

- an input read at `kv` is addressed as the scalar `first` times its stride plus the offsets' (one
  64-bit add per key column, not a product);
- `kv % 2**k` is the offsets' residue where the tiles are aligned to a multiple of `2**k` (a constexpr
  condition: shifted tiles, chunks at a key offset, keep `kv_idx % 2**k`);
- a block index `kv // block` over aligned tiles no larger than the block takes one value: the scalar
  at the tile's block, no select per column and no load of the next block.

And a FULL tile without a score function finds a row's largest score as its largest product times the
scale (its least for a negative scale), so that the scale, log2(e) and the maximum are one multiply-add
per score; and a score that reads `s` only through a factor the same for the whole tile (`s / cap`,
`t * s`) takes the scale into that factor, one multiply per score less (both branches: FAST_MATH's
folded multiply and the exact order for float32 inputs).

Each form is judged by the dense oracle on tiles where it applies and on tiles where it does not (a key
offset that shifts the tiles, tiles larger than the period or the block), forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from cases import matches_oracle

import attnc
from attnc.codegen.gather import TileAxis, tile_condition
from attnc.ir.nodes import Op, const, make, var
from attnc.runtime import launch
from attnc.runtime.launch import merge_splits

SOURCE = """
pattern residues(static period: int = 16) {
    mask = kv % period <= q % period + 2 or kv % 8 == 3
}
pattern marked_keys(w: int = 3) {
    input mark: bool[BATCH, KV_LEN]
    input weight: float32[BATCH, KV_LEN]
    mask = abs(q - kv) <= w or mark[b, kv]
    score = s + weight[b, kv]
}
"""
PATTERNS = attnc.loads(SOURCE)
SPARSE = attnc.load("examples/dynamic_sparse.attn")


def _qkv(length: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, length, 16, generator=generator).requires_grad_() for _ in range(3))


def _inputs(length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return {
        "mark": torch.rand(1, length, generator=generator) < 0.15,
        "weight": torch.randn(1, length, generator=generator).requires_grad_(),
    }


def _chunked(kern: attnc.Kernel, length: int, kv_split: int, **inputs: torch.Tensor) -> None:
    """The output over key chunks split at `kv_split` (a key offset that shifts the tiles), merged,
    against the oracle's, values and gradients."""
    q, k, v = _qkv(length)
    parts = [
        kern.chunk(
            q, k[:, :, k0:k1], v[:, :, k0:k1], q_offset=0, kv_offset=k0, q_len=length, kv_len=length,
            return_lse=True, **inputs,
        )
        for k0, k1 in [(0, kv_split), (kv_split, length)]
    ]  # fmt: skip
    out, _ = merge_splits(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = kern.reference(*leaves, out_dtype=torch.float64, **inputs)
    wanted = torch.autograd.grad(expected, leaves, grad.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, wanted, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


# ---- residues of the key --------------------------------------------------------------------------------


def test_a_key_residue_is_the_offsets_on_aligned_tiles() -> None:
    source = PATTERNS.residues()._forward.source.text
    assert "(offs_n[None, :] & 15) if ((SHIFTED == 0) & (BLOCK_N % 16 == 0))" in source
    assert "(offs_n[None, :] & 7) if ((SHIFTED == 0) & (BLOCK_N % 8 == 0))" in source


@pytest.mark.parametrize("config", [None, "16,16", "16,32"], ids=["default", "16", "32"])
@pytest.mark.parametrize("period", [16, 32])
def test_key_residues_match_the_oracle(
    monkeypatch: pytest.MonkeyPatch, config: str | None, period: int
) -> None:
    # period 32 under 16-key tiles: the tiles are not aligned to it, kv_idx's residue is taken.
    if config is not None:
        monkeypatch.setenv("ATTNC_CONFIG", config)
    matches_oracle(PATTERNS.residues(period=period), *_qkv(45))


def test_key_residues_of_shifted_tiles_match_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "16,16")
    _chunked(PATTERNS.residues(), 40, kv_split=11)  # the second chunk's tiles start at key 11


# ---- inputs read at the key -----------------------------------------------------------------------------


def test_an_input_read_at_the_key_is_addressed_from_the_tiles_first_position() -> None:
    source = PATTERNS.marked_keys()._forward.source.text
    assert "tl.cast((start_n + kv_shift), tl.int64) * in_mark_stride1 + tl.cast(offs_n[None, :]" in source
    assert "tl.cast(kv_idx, tl.int64) * in_mark_stride1" not in source


@pytest.mark.parametrize("config", [None, "16,16"], ids=["default", "16"])
def test_inputs_read_at_the_key_match_the_oracle(monkeypatch: pytest.MonkeyPatch, config: str | None) -> None:
    if config is not None:
        monkeypatch.setenv("ATTNC_CONFIG", config)
    matches_oracle(PATTERNS.marked_keys(), *_qkv(37), **_inputs(37))


def test_inputs_read_at_the_keys_of_shifted_tiles_match_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "16,16")
    inputs = _inputs(40)
    inputs["weight"] = inputs["weight"].detach()  # chunk: no input gradient across the split
    _chunked(PATTERNS.marked_keys(), 40, kv_split=13, **inputs)


def test_strided_inputs_read_at_the_key_match_the_oracle() -> None:
    # A column of a wider tensor: stride 3 along the key, not 1.
    inputs = _inputs(33)
    wide = torch.zeros(1, 33, 3, dtype=torch.bool)
    wide[..., 1] = inputs["mark"]
    inputs["mark"] = wide[..., 1]
    assert inputs["mark"].stride() == (99, 3)
    matches_oracle(PATTERNS.marked_keys(), *_qkv(33), **inputs)


# ---- block indices that take one value over a tile ------------------------------------------------------


def test_a_block_index_takes_one_value_over_aligned_tiles_no_larger_than_its_block() -> None:
    axis = TileAxis("(start_n + kv_shift)", "BLOCK_N", "SHIFTED == 0")
    assert tile_condition(make(Op.FLOORDIV, var("kv"), const(64)), "kv", axis, most=1) == (
        "(((SHIFTED == 0) & (BLOCK_N <= 64)))"
    )
    assert tile_condition(make(Op.FLOORDIV, var("kv"), const(24)), "kv", axis, most=1) is None
    source = SPARSE.block_sparse(block=32)._forward.source.text
    assert "if (((SHIFTED == 0) & (BLOCK_N <= 32))):" in source


@pytest.mark.parametrize("config", [None, "16,16", "64,64"], ids=["default", "16", "64"])
def test_block_maps_read_as_one_value_match_the_oracle(
    monkeypatch: pytest.MonkeyPatch, config: str | None
) -> None:
    # Blocks of 32: one value over 16- and 32-position tiles, two over 64-position ones.
    if config is not None:
        monkeypatch.setenv("ATTNC_CONFIG", config)
    kern = SPARSE.block_sparse(block=32)
    generator = torch.Generator().manual_seed(5)
    blocks = torch.rand(1, 2, 3, 3, generator=generator) < 0.5
    matches_oracle(kern, *_qkv(70), blocks=blocks)


def test_block_maps_over_shifted_tiles_match_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "16,16")
    # A diagonal map: the shifted tiles that straddle key 32 see two different blocks.
    blocks = torch.eye(2, dtype=torch.bool).expand(1, 2, 2, 2).contiguous()
    _chunked(SPARSE.block_sparse(block=32), 48, kv_split=20, blocks=blocks)


# ---- the FULL tiles' row maximum ------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [-0.9, 0.0, 0.9])
@pytest.mark.parametrize("name", ["full", "causal"])
def test_full_tiles_take_the_row_maximum_of_the_products_at_every_sign_of_the_scale(
    name: str, scale: float
) -> None:
    # FULL tiles find a row's largest score as its largest product times the scale, or, for a negative
    # scale, its least (SCALE_NEGATIVE). Scores spread over hundreds: exp2 of a score minus anything
    # but the row's maximum overflows, and the output is NaN.
    kern = getattr(attnc.stdlib(), name)()
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=generator) for _ in range(3))
    q = (q * 12).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    out, lse = matches_oracle(kern, q, k, v, scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


# ---- the scale taken into the score's own factor of s ---------------------------------------------------

FOLDED = attnc.loads(
    """
pattern temperature(t: float = 0.37) {
    mask = causal
    score = s / t
}
pattern scaled_cap(cap: float = 6.0) {
    score = cap * tanh(s / cap)
}
pattern times_bias(t: float = 1.7) {
    input bias: float32[BATCH, KV_LEN]
    mask = causal
    score = t * s + bias[b, kv]
}
pattern twice(t: float = 1.7) {
    score = s / t + s
}
"""
)


@pytest.mark.parametrize(
    ("name", "folded"),
    [("temperature", True), ("scaled_cap", True), ("times_bias", True), ("twice", False)],
)
def test_the_scale_is_folded_where_the_score_reads_s_only_through_a_tile_constant_factor(
    name: str, folded: bool
) -> None:
    spec = getattr(FOLDED, name)()._compiled.spec
    assert spec.full.scale_folded is folded and spec.masked.scale_folded is folded
    source = getattr(FOLDED, name)()._forward.source.text
    assert ("s = tl.dot(q, kT, input_precision=DOT_PRECISION) * scale" in source) is not folded


def _fast_math(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launches with FAST_MATH set, as on an NVIDIA GPU with 16-bit inputs (the folded multiply's
    branch); only for scores without tanh, whose fast form is inline PTX."""
    constants = launch._constants
    monkeypatch.setattr(launch, "_constants", lambda *a: {**constants(*a), "FAST_MATH": True})


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast-math"])
@pytest.mark.parametrize("scale", [-0.6, 0.45])
def test_folded_scales_match_the_oracle(monkeypatch: pytest.MonkeyPatch, fast: bool, scale: float) -> None:
    if fast:
        _fast_math(monkeypatch)
    generator = torch.Generator().manual_seed(8)
    bias = torch.randn(1, 45, generator=generator)
    for kern, inputs in ((FOLDED.temperature(), {}), (FOLDED.times_bias(), {"bias": bias})):
        q, k, v = (torch.randn(1, 2, 45, 16, generator=generator).requires_grad_() for _ in range(3))
        matches_oracle(kern, q, k, v, scale, **inputs)


def test_a_folded_soft_cap_matches_the_oracle() -> None:
    matches_oracle(FOLDED.scaled_cap(), *_qkv(40))
