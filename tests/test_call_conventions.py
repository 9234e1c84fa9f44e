"""What FlexAttention's and SDPA's callers pass: k/v broadcast over the batch, float64 with gradcheck,
`enable_gqa`, and an output in the query's stride order."""

from __future__ import annotations

import pytest
import torch

import attnc

STD = attnc.stdlib()
ALIBI = attnc.loads(
    "pattern alibi { input slopes: float32[NUM_HEADS]\n mask = kv <= q\n score = s - slopes[h] * (q - kv) }"
).alibi()


def test_k_and_v_with_one_batch_row_are_broadcast_over_q_batch_forward_and_backward() -> None:
    torch.manual_seed(0)
    q = torch.randn(3, 4, 24, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 30, 16, requires_grad=True) for _ in range(2))
    kern = STD.sliding_window(window=9)
    out = kern(q, k, v)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = kern.reference(q64, k64, v64)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    assert got[1].shape == k.shape and got[2].shape == v.shape
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=5e-5)


def test_float64_calls_are_exact_and_pass_gradcheck() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)
    out, lse = ALIBI(q, k, v, slopes=slopes, return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    # The float32 kernel on the same numbers agrees to its precision.
    kernel = ALIBI(*(t.detach().float() for t in (q, k, v)), slopes=slopes.detach())
    torch.testing.assert_close(out.float(), kernel, atol=2e-6, rtol=2e-6)
    assert torch.autograd.gradcheck(lambda q, k, v: ALIBI(q, k, v, slopes=slopes.detach()), (q, k, v))
    out.sum().backward()
    assert slopes.grad is not None and slopes.grad.abs().sum() > 0


def test_float64_needs_float64_keys_and_values() -> None:
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(attnc.InputError, match="k must have q's dtype float64, got float32"):
        STD.causal()(q, q.float(), q)


def test_enable_gqa_is_accepted_and_false_refuses_grouped_heads() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    torch.testing.assert_close(STD.causal()(q, k, v, enable_gqa=True), STD.causal()(q, k, v))
    with pytest.raises(attnc.InputError, match="enable_gqa=False, but q has 4 heads and k 2"):
        STD.causal()(q, k, v, enable_gqa=False)
    same = torch.randn(1, 2, 8, 16)
    torch.testing.assert_close(STD.causal()(same, k, v, enable_gqa=False), STD.causal()(same, k, v))
    with pytest.raises(attnc.InputTypeError, match="enable_gqa must be a bool"):
        STD.causal()(q, k, v, enable_gqa=1)


def test_the_output_keeps_the_query_stride_order() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 24, 4, 16).transpose(1, 2)  # [B, H, L, D] over a [B, L, H, D] tensor
    k, v = (torch.randn(2, 4, 24, 16) for _ in range(2))
    out = STD.causal()(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, STD.causal().reference(q, k, v), atol=2e-6, rtol=2e-6)
    assert STD.causal()(q.contiguous(), k, v).is_contiguous()


SOFTCAP_EMPTY = attnc.loads("pattern p(cap: float) { mask = kv <= q - 2\n score = cap * tanh(s / cap) }").p(
    cap=3.0
)


@pytest.mark.parametrize("splits", [1, 3])
def test_return_aux_gives_each_rows_largest_score_as_the_oracle_does(splits: int) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    options = {"SPLIT_KV": splits, "BLOCK_N": 16}
    out, lse, max_scores = SOFTCAP_EMPTY(q, k, v, return_aux=True, kernel_options=options)
    want_out, want_lse, want_max = SOFTCAP_EMPTY(q.double(), k.double(), v.double(), return_aux=True)
    assert torch.isneginf(max_scores[:, :, :2]).all()  # rows 0 and 1 see no key
    torch.testing.assert_close(max_scores.double(), want_max, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(out.double(), want_out, atol=2e-6, rtol=2e-6)


def test_return_aux_keeps_the_gradients_and_the_maxima_have_none() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    out, lse, max_scores = SOFTCAP_EMPTY(q, k, v, return_aux=True)
    assert not max_scores.requires_grad
    got = torch.autograd.grad((out.sum() + lse[:, :, 2:].sum()), (q, k, v))
    out2, lse2 = SOFTCAP_EMPTY(q, k, v, return_lse=True)
    want = torch.autograd.grad((out2.sum() + lse2[:, :, 2:].sum()), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_float64_calls_still_check_their_kernel_options() -> None:
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(attnc.InputError, match="kernel_options has no option 'bogus'"):
        STD.causal()(q, q, q, kernel_options={"bogus": 1})
