"""`q_offset`: queries that sit later in the sequence than their rows (chunked prefill, decoding).

Row i of batch row b is query position `q_offset + i` (or `q_offset[b] + i`), the pattern's Q_LEN is
`q_offset + Lq`. The oracle (`reference`, `mask`, `block_map`, `plan`) takes the same keyword; the
kernels, forward and backward, are judged against it, and plan = kernel holds under offsets too.
"""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.runtime.launch import counting_visits
from attnc.runtime.plan import EMPTY, FULL

STD = attnc.stdlib()
DOC = attnc.load("examples/document_causal.attn").document_causal()
BOTTOM_RIGHT = STD.causal_bottom_right()
SOFTCAP = attnc.loads(
    "pattern p(cap: float) { mask = kv <= q and q - kv < 30\n"
    " score = cap * tanh(s / cap) + (Q_LEN - q) * 0.01 }"
).p(cap=5.0)
BLOCK = (16, 16)


def qkv(batch: int, q_len: int, kv_len: int, grad: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    q = torch.randn(batch, 2, q_len, 16, requires_grad=grad)
    k, v = (torch.randn(batch, 2, kv_len, 16, requires_grad=grad) for _ in range(2))
    return q, k, v


def assert_matches_oracle(
    kern: attnc.Kernel, q_len: int, kv_len: int, q_offset, batch: int = 2, **inputs
) -> None:
    """Output, lse and dq/dk/dv of the kernel against the float64 oracle at the same offsets."""
    q, k, v = qkv(batch, q_len, kv_len, grad=True)
    out, lse = kern(q, k, v, q_offset=q_offset, return_lse=True, **inputs)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = kern.reference(q64, k64, v64, q_offset=q_offset, return_lse=True, **inputs)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=2e-5, rtol=2e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("q_offset", [0, 13, 46], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize(
    "kern", [STD.causal(), STD.sliding_window(window=20), BOTTOM_RIGHT, SOFTCAP], ids=lambda k: k.name
)
def test_forward_and_backward_at_an_int_offset_match_the_oracle(kern: attnc.Kernel, q_offset: int) -> None:
    assert_matches_oracle(kern, 24, 70, q_offset)


def test_per_row_plan_give_each_batch_row_its_own_positions() -> None:
    offsets = torch.tensor([46, 5, 0], dtype=torch.int32)
    assert_matches_oracle(STD.sliding_window(window=20), 24, 70, offsets, batch=3)
    q, k, v = qkv(3, 24, 70)
    out = STD.causal()(q, k, v, q_offset=offsets)
    for b, offset in enumerate(offsets.tolist()):
        row = STD.causal()(q[b : b + 1], k[b : b + 1], v[b : b + 1], q_offset=offset)
        torch.testing.assert_close(out[b : b + 1], row, atol=1e-6, rtol=1e-6)


def test_a_metadata_pattern_at_offsets_matches_the_oracle() -> None:
    doc = torch.tensor([[0] * 10 + [1] * 31 + [2] * 29, [0] * 35 + [1] * 35], dtype=torch.int32)
    assert_matches_oracle(DOC, 24, 70, 37, doc=doc)
    assert_matches_oracle(DOC, 24, 70, torch.tensor([40, 9], dtype=torch.int64), doc=doc)


def test_chunked_prefill_equals_the_same_rows_of_the_full_sequence() -> None:
    # 200 keys already cached, 40 new queries: the new rows of one full causal call.
    q, k, v = qkv(1, 240, 240)
    kern = STD.causal()
    full = kern(q, k, v)
    chunk = kern(q[:, :, 200:], k, v, q_offset=200)
    torch.testing.assert_close(chunk, full[:, :, 200:], atol=1e-6, rtol=1e-6)
    # Q_LEN is where the queries end, so a bottom-right-aligned mask means the same in both calls.
    torch.testing.assert_close(
        BOTTOM_RIGHT(q[:, :, 200:], k, v, q_offset=200),
        BOTTOM_RIGHT(q, k, v)[:, :, 200:],
        atol=1e-6,
        rtol=1e-6,
    )


def test_decoding_one_token_sees_every_cached_key_under_causal() -> None:
    q, k, v = qkv(2, 1, 37)
    out = STD.causal()(q, k, v, q_offset=36)
    torch.testing.assert_close(out, STD.full()(q, k, v), atol=1e-6, rtol=1e-6)


def test_the_mask_and_block_map_at_an_offset_are_rows_of_the_unshifted_ones() -> None:
    kern = STD.sliding_window(window=20)
    whole = kern.mask(70, 70)
    torch.testing.assert_close(kern.mask(24, 70, q_offset=46), whole[:, :, 46:])
    per_row = kern.mask(24, 70, q_offset=torch.tensor([46, 0]))
    assert torch.equal(per_row[0], whole[0, :, 46:]) and torch.equal(per_row[1], whole[0, :, :24])
    # Tiles count rows: the block map at offset 48 (a multiple of 16) is the unshifted one's rows 3-4.
    torch.testing.assert_close(
        kern.block_map(24, 70, block=BLOCK, q_offset=48), kern.block_map(70, 70, block=BLOCK)[:, :, 3:]
    )


@pytest.mark.parametrize("kern", [STD.sliding_window(window=40), DOC], ids=lambda k: k.name)
@pytest.mark.parametrize("q_offset", [13, "rows"], ids=["int", "per_row"])
def test_plan_at_an_offset_is_exact_and_is_what_the_kernels_visit(kern: attnc.Kernel, q_offset) -> None:
    offsets = torch.tensor([13, 40], dtype=torch.int32) if q_offset == "rows" else q_offset
    inputs = {"doc": torch.tensor([[0] * 70, [0] * 45 + [1] * 25], dtype=torch.int32)}
    inputs = inputs if kern is DOC else {}
    plan = kern.plan(24, 70, block=BLOCK, batch=2, q_offset=offsets, **inputs)
    exact = kern.block_map(24, 70, block=BLOCK, batch=2, q_offset=offsets, **inputs)
    classes = plan.block_map().expand_as(exact)
    # Never FULL where the mask is not everywhere true, never EMPTY where some pair is allowed.
    assert (
        not ((classes == FULL) & (exact != FULL)).any() and not ((classes == EMPTY) & (exact != EMPTY)).any()
    )
    assert (exact == FULL).any() and (exact == EMPTY).any()
    q, k, v = qkv(2, 24, 70, grad=True)
    with counting_visits() as visits:
        out = kern(q, k, v, plan=plan, q_offset=offsets, **inputs)
        out.sum().backward()
    torch.testing.assert_close(out, kern.reference(q, k, v, q_offset=offsets, **inputs), atol=1e-5, rtol=1e-5)
    cut = torch.arange(classes.shape[-1]) >= 70 // BLOCK[1]  # the last key tile, cut by the length
    expected = torch.where(classes == EMPTY, 0, torch.where((classes == FULL) & ~cut, 16, 1)).to(torch.int32)
    assert torch.equal(visits["forward"][:, 0], expected[:, 0])
    assert torch.equal(visits["dq"][:, 0], expected[:, 0])
    transposed = plan.block_map(transposed=True).expand(2, 2, -1, -1)
    visited = visits["dkv"][:, 0] > 0
    assert torch.equal(visited, transposed[:, 0] != EMPTY)
    assert visits["dkv"].max() <= 16


def test_a_plan_serves_only_calls_at_its_offset() -> None:
    kern = DOC
    doc = torch.zeros(1, 70, dtype=torch.int32)
    plan = kern.plan(24, 70, block=BLOCK, q_offset=13, doc=doc)
    q, k, v = qkv(1, 24, 70)
    with pytest.raises(attnc.InputError, match="q_offset=13, but this call has q_offset=14"):
        kern(q, k, v, plan=plan, q_offset=14, doc=doc)
    offsets = torch.tensor([13], dtype=torch.int32)
    tensor_plan = kern.plan(24, 70, block=BLOCK, q_offset=offsets, doc=doc)
    with pytest.raises(attnc.InputError, match="q_offset tensor's identity"):
        kern(q, k, v, plan=tensor_plan, q_offset=offsets.clone(), doc=doc)
    offsets += 1
    with pytest.raises(attnc.InputError, match="in-place change"):
        kern(q, k, v, plan=tensor_plan, q_offset=offsets, doc=doc)


@pytest.mark.parametrize(
    ("q_offset", "error", "match"),
    [
        (-1, attnc.InputError, "q_offset must be >= 0"),
        (2**30, attnc.InputError, "q_offset \\+ q_len <= 1073741824"),
        (1.5, attnc.InputTypeError, "q_offset must be an int"),
        (True, attnc.InputTypeError, "q_offset must be an int"),
        (torch.tensor([1.0, 2.0]), attnc.InputError, "int32/int64 tensor"),
        (torch.tensor([1, 2, 3]), attnc.InputError, "shape \\[batch\\] = \\[2\\]"),
        (torch.tensor(3), attnc.InputError, "shape \\[batch\\]"),
        (torch.tensor([0, -4]), attnc.InputError, "values from -4 to 0"),
    ],
    ids=["negative", "too_large", "float", "bool", "float_tensor", "wrong_batch", "zero_dim", "negative_row"],
)
def test_a_bad_q_offset_is_a_clear_error(q_offset, error: type, match: str) -> None:
    q, k, v = qkv(2, 8, 16)
    with pytest.raises(error, match=match):
        STD.causal()(q, k, v, q_offset=q_offset)
    with pytest.raises(error, match=match):
        STD.causal().reference(q, k, v, q_offset=q_offset)


def test_per_row_plan_refuse_inputs_shaped_by_q_len() -> None:
    kern = attnc.loads("pattern p { input bias: float32[Q_LEN]\n score = s + bias[q] }").p()
    q, k, v = qkv(2, 8, 16)
    with pytest.raises(attnc.InputError, match=r"depends on Q_LEN.*pass q_offset as an int") as info:
        kern(q, k, v, q_offset=torch.tensor([1, 2]), bias=torch.zeros(10))
    assert "<string>:1:" in str(info.value)
    # An int offset sizes Q_LEN as q_offset + q_len.
    torch.testing.assert_close(
        kern(q, k, v, q_offset=2, bias=torch.arange(10.0)),
        kern.reference(q, k, v, q_offset=2, bias=torch.arange(10.0)),
        atol=1e-5,
        rtol=1e-5,
    )


def test_a_per_row_offset_tensor_sizes_the_batch_of_plans_and_block_maps() -> None:
    kern = STD.causal()
    offsets = torch.tensor([12, 3])
    tiles = kern.block_map(8, 20, block=(16, 16), q_offset=offsets)
    assert tiles.shape[0] == 2
    assert tiles[0, 0, 0].tolist() == [1, 1] and tiles[1, 0, 0].tolist() == [1, 0]
    assert kern.plan(8, 20, block=(16, 16), q_offset=offsets).block_map().shape[0] == 2
