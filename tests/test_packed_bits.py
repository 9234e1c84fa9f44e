"""Bool key columns read as packed bits (issue 18 item 2).

A bool input read at `[..., kv]` with its other indices the same over a tile (`flag[b, kv]`:
Longformer's global tokens) is passed to the forward and dQ kernels as its bits packed 32 to an int32
word as well (`launch.pack_bits`, `spec.InputArg.bits`). Over an aligned tile of a multiple of 32 keys
the tile's words are scalar loads and each key column's value one test of its bit
(`emit.Emitter._load_bits`); other tiles (16 keys, or shifted by a key offset) read the bytes.

The oracle judges both forms, forward and backward, at the interpreter's 32-key tiles and at 64 and 16,
on ragged lengths, leading indices that vary per program or lie outside the input, an input shorter
than the keys, strided and broadcast tensors, a score that reads the column, chunks at a key offset,
packed sequences and decoding. Tests that spoil the packed words show which form each tile size takes.
"""

from __future__ import annotations

import re

import pytest
import torch
from cases import matches_oracle

import attnc
from attnc.runtime import launch
from attnc.runtime.launch import merge_splits, pack_bits

SOURCE = """
pattern global_keys(w: int = 3) {
    input g: bool[BATCH, KV_LEN]
    mask = abs(q - kv) <= w or g[b, q] or g[b, kv]
}
pattern head_keys {
    input keep: bool[BATCH, NUM_HEADS, KV_LEN]
    mask = kv <= q and keep[b, h, kv]
}
pattern short_flags {
    input f: bool[40]
    mask = kv <= q - 20 or f[kv]
}
pattern table_row(row: int = 1) {
    input table: bool[3, KV_LEN]
    mask = kv <= q + 2 and (table[row, kv] or kv == q)
}
pattern flag_score {
    input f: bool[BATCH, KV_LEN]
    mask = kv <= q
    score = where(f[b, kv], s, s * 0.5 - 1.0)
}
pattern shifted_flags {
    input f: bool[BATCH, KV_LEN]
    mask = kv <= q and f[b, kv + 1]
}
"""
PATTERNS = attnc.loads(SOURCE)


def _qkv(batch: int, heads: int, length: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, heads, length, 16, generator=generator).requires_grad_() for _ in range(3)
    )


def _flags(*shape: int, seed: int = 3, rate: float = 0.2) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < rate


# ---- packing ---------------------------------------------------------------------------------------------


def _packed_by_hand(flags: torch.Tensor) -> torch.Tensor:
    *lead, length = flags.shape
    words = torch.zeros((*lead, -(-length // 32)), dtype=torch.int64)
    for i in range(length):
        words[..., i // 32] |= flags[..., i].to(torch.int64) << (i % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("shape", [(0,), (1,), (31,), (32,), (33,), (2, 70), (2, 3, 65), (3, 0)])
def test_bits_are_packed_32_to_a_word_along_the_last_axis(shape: tuple[int, ...]) -> None:
    flags = _flags(*shape, rate=0.5)
    packed = pack_bits(flags)
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], -(-shape[-1] // 32))
    assert torch.equal(packed, _packed_by_hand(flags))


def test_the_last_bit_of_a_word_is_its_sign_and_bits_past_the_end_are_zero() -> None:
    flags = torch.zeros(40, dtype=torch.bool)
    flags[31] = flags[32] = True
    assert pack_bits(flags).tolist() == [-(2**31), 1]
    assert pack_bits(torch.ones(33, dtype=torch.bool)).tolist() == [-1, 1]


def test_bytes_other_than_0_and_1_pack_as_true() -> None:
    # As the kernels read the bytes: nonzero is true (a uint8 buffer passed past the call's checks).
    raw = torch.tensor([2, 0, 255, 1], dtype=torch.uint8)
    assert pack_bits(raw).tolist() == [0b1101]
    assert pack_bits(raw.view(torch.bool)).tolist() == [0b1101]  # a bool tensor's raw bytes


def test_packing_copies_nothing_from_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CUDA graph can capture a call that packs: no tensor is made from host data.
    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor made from host data")

    flags = _flags(2, 70, rate=0.5)
    monkeypatch.setattr(launch, "_BIT_VALUES", {})  # the bit values made again, not kept from before
    monkeypatch.setattr(torch, "tensor", refused)
    monkeypatch.setattr(torch, "as_tensor", refused)
    assert torch.equal(pack_bits(flags), _packed_by_hand(flags))
    assert list(launch._BIT_VALUES) == [flags.device]  # kept for the next call (not while capturing)


def test_strided_and_broadcast_flags_are_packed_by_value() -> None:
    wide = _flags(2, 70, 3, rate=0.5)
    assert torch.equal(pack_bits(wide[..., 1]), _packed_by_hand(wide[..., 1].contiguous()))
    row = _flags(1, 45, rate=0.5).expand(3, 45)
    assert torch.equal(pack_bits(row), _packed_by_hand(row.contiguous()))


# ---- which loads are read as bits ------------------------------------------------------------------------


def _functions(source: str) -> dict[str, str]:
    """The generated module's top-level functions' text, by name."""
    parts = re.split(r"^def (\w+)", source, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_a_bool_key_column_is_read_as_bits_in_the_forward_and_dq_only() -> None:
    kern = PATTERNS.global_keys()
    (arg,) = kern._forward.spec.inputs
    assert arg.bits and arg.bit_args == ("in_g_bits", "in_g_bitwords", ("in_g_bitstride0", "in_g_bitstride1"))
    forward = _functions(kern._forward.source.text)["_fwd_partial_tile"]
    assert "(SHIFTED == 0) & (BLOCK_N % 32 == 0)" in forward
    assert "tl.static_range(BLOCK_N // 32)" in forward and "in_g_bits +" in forward
    backward = _functions(kern._forward.backward.source.text)
    assert "in_g_bits +" in backward["_dq_partial_tile"]
    # dK/dV's key columns are the program's own, read once: the bytes.
    assert "in_g_bits +" not in backward["_dkv_partial_tile"]


@pytest.mark.parametrize(
    "source, bits",
    [
        ("input f: bool[KV_LEN]\n mask = kv <= q and f[kv]", True),
        ("input f: bool[BATCH, KV_LEN]\n mask = kv <= q and f[b, kv]", True),
        ("input f: bool[Q_LEN]\n mask = kv <= q and f[q]", False),  # a row: one per query, not a column
        ("input f: bool[KV_LEN]\n mask = kv <= q and f[kv // 2]", False),  # not the position itself
        ("input f: bool[Q_LEN, KV_LEN]\n mask = kv <= q and f[q, kv]", False),  # varies per row
        ("input f: int32[KV_LEN]\n mask = kv <= q and f[kv] > 0", False),  # not a bool
    ],
)
def test_only_bool_key_columns_are_read_as_bits(source: str, bits: bool) -> None:
    kern = attnc.loads(f"pattern p {{ {source} }}").p()
    (arg,) = kern._forward.spec.inputs
    assert arg.bits is bits
    assert ("_bits +" in kern._forward.source.text) is bits


# ---- against the oracle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, "16,64", "32,32", "16,16"], ids=["default", "64", "32", "16"])
@pytest.mark.parametrize("length", [29, 64, 101])
def test_global_key_columns_match_the_oracle(
    monkeypatch: pytest.MonkeyPatch, config: str | None, length: int
) -> None:
    if config is not None:
        monkeypatch.setenv("ATTNC_CONFIG", config)
    matches_oracle(PATTERNS.global_keys(), *_qkv(2, 2, length), g=_flags(2, length))


@pytest.mark.parametrize("config", ["16,32", "16,64"])
def test_spoiled_words_are_read_at_32_and_64_key_tiles(monkeypatch: pytest.MonkeyPatch, config: str) -> None:
    # The words decide: packed as all ones, the PARTIAL tiles (the plan's, from the true flags) take
    # every key column for a global token's, and the output is wrong.
    monkeypatch.setenv("ATTNC_CONFIG", config)
    monkeypatch.setattr(launch, "pack_bits", lambda flags: pack_bits(torch.ones_like(flags)))
    q, k, v = _qkv(1, 1, 70)
    flags = _flags(1, 70)
    kern = PATTERNS.global_keys()
    assert not torch.allclose(kern(q, k, v, g=flags), kern.reference(q, k, v, g=flags), atol=1e-2)


def test_the_bytes_are_read_at_16_key_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "16,16")
    monkeypatch.setattr(launch, "pack_bits", lambda flags: pack_bits(torch.ones_like(flags)))
    q, k, v = _qkv(1, 1, 70)
    flags = _flags(1, 70)
    kern = PATTERNS.global_keys()
    assert torch.allclose(kern(q, k, v, g=flags), kern.reference(q, k, v, g=flags), atol=1e-5)


@pytest.mark.parametrize("config", [None, "16,64"], ids=["default", "64"])
def test_columns_per_batch_row_and_head_match_the_oracle(
    monkeypatch: pytest.MonkeyPatch, config: str | None
) -> None:
    if config is not None:
        monkeypatch.setenv("ATTNC_CONFIG", config)
    keep = _flags(2, 3, 75, rate=0.7)
    keep[..., 0] = True
    matches_oracle(PATTERNS.head_keys(), *_qkv(2, 3, 75), keep=keep)
    # Broadcast along the heads (stride 0) and a column of a wider tensor (stride 2 along the keys).
    matches_oracle(PATTERNS.head_keys(), *_qkv(2, 3, 75), keep=keep[:, :1].expand(2, 3, 75))
    wide = torch.zeros(2, 3, 75, 2, dtype=torch.bool)
    wide[..., 1] = keep
    matches_oracle(PATTERNS.head_keys(), *_qkv(2, 3, 75), keep=wide[..., 1])


@pytest.mark.parametrize("config", [None, "16,64"], ids=["default", "64"])
def test_an_input_shorter_than_the_keys_reads_false_past_its_end(
    monkeypatch: pytest.MonkeyPatch, config: str | None
) -> None:
    # f has 40 entries (2 words) and the keys run to 99: key tiles past it read no word.
    if config is not None:
        monkeypatch.setenv("ATTNC_CONFIG", config)
    matches_oracle(PATTERNS.short_flags(), *_qkv(1, 2, 100), f=_flags(40, rate=0.5))


@pytest.mark.parametrize("row", [0, 2, 3, -1])
def test_a_leading_index_outside_the_input_reads_false(monkeypatch: pytest.MonkeyPatch, row: int) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "16,32")
    matches_oracle(PATTERNS.table_row(row=row), *_qkv(1, 1, 50), table=_flags(3, 50, rate=0.5))


def test_a_score_reading_a_key_column_matches_the_oracle_in_full_tiles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "32,32")
    kern = PATTERNS.flag_score()
    assert "in_f_bits +" in _functions(kern._forward.source.text)["_fwd_full_tile"]
    matches_oracle(kern, *_qkv(2, 1, 90), f=_flags(2, 90, rate=0.5))


def test_a_column_at_a_shifted_key_is_read_as_bytes() -> None:
    kern = PATTERNS.shifted_flags()
    assert not kern._forward.spec.inputs[0].bits
    flags = _flags(1, 60, rate=0.7)
    flags[0, 1] = True
    matches_oracle(kern, *_qkv(1, 1, 60), f=flags)


@pytest.mark.parametrize("split", [13, 32])
def test_chunks_at_a_key_offset_match_the_oracle(monkeypatch: pytest.MonkeyPatch, split: int) -> None:
    # A key offset shifts the tiles (even one a multiple of 32: SHIFTED): those read the bytes.
    monkeypatch.setenv("ATTNC_CONFIG", "16,32")
    kern, length = PATTERNS.global_keys(), 80
    flags = _flags(1, length)
    q, k, v = _qkv(1, 2, length)
    parts = [
        kern.chunk(
            q, k[:, :, k0:k1], v[:, :, k0:k1], q_offset=0, kv_offset=k0, q_len=length, kv_len=length,
            return_lse=True, g=flags,
        )
        for k0, k1 in [(0, split), (split, length)]
    ]  # fmt: skip
    out, _ = merge_splits(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    expected = kern.reference(q, k, v, g=flags)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_packed_sequences_read_each_sequences_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "16,32")
    kern = PATTERNS.global_keys()
    lengths = [37, 70, 5]
    longest = max(lengths)
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=generator) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    flags = _flags(len(lengths), longest)
    out = kern.varlen(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, g=flags
    )
    for i, n in enumerate(lengths):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        args = (t[rows].transpose(0, 1)[None] for t in (q, k, v))
        want = kern.reference(*args, g=flags[i : i + 1, :n])
        torch.testing.assert_close(out[rows].transpose(0, 1)[None], want, atol=1e-5, rtol=1e-5)


def test_decoding_reads_each_rows_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "16,32")
    kern = PATTERNS.global_keys()
    lens = torch.tensor([70, 33], dtype=torch.int32)
    generator = torch.Generator().manual_seed(6)
    q = torch.randn(2, 2, 3, 16, generator=generator)
    k, v = (torch.randn(2, 2, 70, 16, generator=generator) for _ in range(2))
    flags = _flags(2, 70)
    out = kern.decode(q, k, v, cache_seqlens=lens, g=flags)
    for b, n in enumerate(lens.tolist()):
        want = kern.reference(
            q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], q_offset=n - 3, g=flags[b : b + 1, :n]
        )
        torch.testing.assert_close(out[b : b + 1], want, atol=1e-5, rtol=1e-5)
