"""`Kernel.chunk`: blocks of a longer problem at query and key offsets, which merge by lse into the whole
(what context parallelism computes on each rank), forward and backward, judged by the oracle."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.runtime.launch import merge_splits

STD = attnc.stdlib()
DOC = attnc.load("examples/document_causal.attn").document_causal()
BIAS = attnc.loads(
    "pattern p { input bias: float32[NUM_HEADS]\n mask = kv <= q and q - kv < 40\n"
    " score = s - bias[h] * (Q_LEN - q) * 0.01 }"
).p()
LENGTH = 72
Q_CHUNKS, KV_CHUNKS = [(0, 40), (40, 72)], [(0, 24), (24, 56), (56, 72)]


def blocked(kern: attnc.Kernel, q, k, v, **inputs) -> torch.Tensor:
    """The whole output from blocks: each query chunk over each key chunk, merged by lse."""
    rows = []
    for q0, q1 in Q_CHUNKS:
        parts = [
            kern.chunk(
                q[:, :, q0:q1],
                k[:, :, k0:k1],
                v[:, :, k0:k1],
                q_offset=q0,
                kv_offset=k0,
                q_len=LENGTH,
                kv_len=LENGTH,
                return_lse=True,
                **inputs,
            )
            for k0, k1 in KV_CHUNKS
        ]
        out, _ = merge_splits(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
        rows.append(out)
    return torch.cat(rows, dim=2)


@pytest.mark.parametrize(
    "kern", [STD.causal(), STD.sliding_window(window=20), DOC, BIAS], ids=lambda k: k.name
)
def test_blocks_merged_by_lse_are_the_whole_forward_and_backward(kern) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, LENGTH, 16, requires_grad=True) for _ in range(3))
    inputs = {}
    if kern is DOC:
        inputs["doc"] = torch.tensor([[0] * 30 + [1] * 42, [0] * 50 + [1] * 22], dtype=torch.int32)
    if kern is BIAS:
        inputs["bias"] = torch.tensor([0.5, -1.0], requires_grad=True)
    out = blocked(kern, q, k, v, **inputs)
    grad = torch.randn_like(out)
    leaves = (q, k, v, *(t for t in inputs.values() if t.requires_grad))
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    inputs64 = dict(inputs)
    if kern is BIAS:
        inputs64["bias"] = leaves64[3].float()  # declared float32; the gradient flows to the float64 leaf
    ref = kern.reference(*leaves64[:3], **inputs64)
    want = torch.autograd.grad(ref, leaves64, grad.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.to(torch.float64), atol=5e-5, rtol=5e-5)


def test_a_block_outside_the_problem_is_a_clear_error() -> None:
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(attnc.InputError, match=r"must lie inside q_len=10, kv_len=20"):
        STD.causal().chunk(q, q, q, q_offset=4, kv_offset=0, q_len=10, kv_len=20)
    with pytest.raises(attnc.InputError, match="kv_offset must be an int from 0"):
        STD.causal().chunk(q, q, q, q_offset=0, kv_offset=-1, q_len=10, kv_len=20)


def test_a_block_is_held_to_the_kernels_head_dims() -> None:
    q = torch.randn(1, 1, 4, 300)
    with pytest.raises(attnc.InputError, match="the head dim of q and k must be 1 to 256, got 300"):
        STD.causal().chunk(q, q, q, q_offset=0, kv_offset=0, q_len=4, kv_len=4)
