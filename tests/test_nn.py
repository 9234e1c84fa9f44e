"""`attnc.nn.Attention`: a kernel as a torch.nn.Module holding its pattern's inputs (a learnable bias
table as a parameter, document ids as a buffer). Gradients are judged against autograd through the
float64 oracle."""

from __future__ import annotations

import pytest
import torch
from cases import DEVICE, qkv

import attnc
from attnc.nn import Attention

# Causal attention within documents, with a learned relative-position bias per head.
BIASED_DOCUMENTS = attnc.loads(
    """
pattern biased_documents(static max_distance: int = 4) {
    input bias: float32[NUM_HEADS, 2 * max_distance + 1]
    input doc: int32[BATCH, KV_LEN]
    mask = doc[b, q] == doc[b, kv] and kv <= q
    score = s + bias[h, clamp(q - kv, -max_distance, max_distance) + max_distance]
}
"""
).biased_documents()
HEADS, LENGTH = 2, 20


def documents() -> torch.Tensor:
    return torch.tensor([[0] * 7 + [1] * 13, [0] * 12 + [1] * 8], dtype=torch.int32, device=DEVICE)


def layer(seed: int = 0) -> Attention:
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(HEADS, 9, generator=g).to(DEVICE)
    return Attention(BIASED_DOCUMENTS, parameters={"bias": bias}, buffers={"doc": documents()})


def test_held_inputs_are_a_parameter_and_a_buffer() -> None:
    module = layer()
    assert [name for name, _ in module.named_parameters()] == ["bias"]
    assert [name for name, _ in module.named_buffers()] == ["doc"]
    assert module.held == {"bias": "parameter", "doc": "buffer"}


def test_forward_is_the_kernel_with_the_held_inputs() -> None:
    module = layer()
    q, k, v = qkv(2, HEADS, HEADS, LENGTH, LENGTH, 16)
    expected = BIASED_DOCUMENTS(q, k, v, bias=module.bias.detach(), doc=documents())
    assert torch.equal(module(q, k, v), expected)


def test_gradients_reach_the_bias_parameter_as_through_the_oracle() -> None:
    module = layer()
    q, k, v = qkv(2, HEADS, 1, LENGTH, LENGTH, 16)  # GQA: two query heads per key head
    module(q, k, v).square().sum().backward()
    kernel_grad = module.bias.grad.clone()
    module.zero_grad()
    module.reference(q.double(), k.double(), v.double()).square().sum().backward()  # float64, autograd
    assert kernel_grad.abs().max() > 0
    torch.testing.assert_close(kernel_grad, module.bias.grad, rtol=1e-4, atol=1e-4)


def test_an_optimiser_step_changes_the_bias() -> None:
    module = layer()
    q, k, v = qkv(2, HEADS, HEADS, LENGTH, LENGTH, 16)
    before = module.bias.detach().clone()
    optimiser = torch.optim.SGD(module.parameters(), lr=0.1)
    module(q, k, v).square().sum().backward()
    optimiser.step()
    assert not torch.equal(module.bias.detach(), before)


def test_state_dict_round_trip_restores_the_outputs() -> None:
    trained, fresh = layer(seed=0), layer(seed=1)
    q, k, v = qkv(2, HEADS, HEADS, LENGTH, LENGTH, 16)
    assert sorted(trained.state_dict()) == ["bias", "doc"]
    assert not torch.equal(fresh(q, k, v), trained(q, k, v))
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(q, k, v), trained(q, k, v))


def test_to_moves_the_held_inputs() -> None:
    module = layer().to("meta")
    assert module.bias.device.type == "meta" and module.doc.device.type == "meta"
    assert isinstance(module.bias, torch.nn.Parameter)


def test_to_a_float_dtype_is_cast_back_to_the_declared_dtype_by_the_call() -> None:
    module = layer()
    q, k, v = qkv(2, HEADS, HEADS, LENGTH, LENGTH, 16)
    expected = module(q, k, v)
    module.to(torch.float64)
    assert module.bias.dtype == torch.float64 and module.doc.dtype == torch.int32
    out = module(q, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    assert module.bias.grad.dtype == torch.float64


def test_extra_keywords_reach_the_kernel() -> None:
    causal = attnc.stdlib().causal()
    module = Attention(causal)
    q, k, v = qkv(1, 2, 2, 3, 10, 16)
    out, lse = module(q, k, v, q_offset=7, return_lse=True)
    ref_out, ref_lse = causal.reference(q, k, v, q_offset=7, return_lse=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-4, atol=1e-5)


def test_a_mask_only_input_cannot_be_a_parameter() -> None:
    gated = attnc.loads("pattern gated {\n input gate: float32[NUM_HEADS]\n mask = gate[h] > 0.0\n}").gated()
    with pytest.raises(attnc.InputError, match=r"'gate' cannot be an nn\.Parameter: the kernel gives it no"):
        Attention(gated, parameters={"gate": torch.ones(HEADS)})


def test_an_unknown_input_is_an_error_naming_the_inputs() -> None:
    with pytest.raises(attnc.InputError, match=r"no input 'slopes' \(its inputs: 'bias', 'doc'\)"):
        Attention(BIASED_DOCUMENTS, buffers={"slopes": torch.zeros(2)})


def test_a_held_input_of_the_wrong_dtype_is_an_error() -> None:
    with pytest.raises(attnc.InputError, match="declared int32 of rank 2, got a int64"):
        Attention(BIASED_DOCUMENTS, buffers={"doc": documents().long()})


def test_passing_a_held_input_again_is_an_error() -> None:
    module = layer()
    q, k, v = qkv(2, HEADS, HEADS, LENGTH, LENGTH, 16)
    with pytest.raises(attnc.InputError, match="'doc' is held by the module"):
        module(q, k, v, doc=documents())


def test_only_a_kernel_is_accepted() -> None:
    with pytest.raises(attnc.InputTypeError, match=r"needs an attnc\.Kernel"):
        Attention(attnc.stdlib().causal)  # a Pattern, not yet bound
