"""`attnc.integrations.transformers`: an attnc kernel as a Hugging Face transformers attention
implementation, judged against transformers' own `sdpa` attention on the same tiny random Llama
(examples/transformers_tiny.py builds it): prefill, GQA, greedy generation with the KV cache (queries
after the cached keys: `q_offset`), padded batches, and what the kernel cannot honour (errors)."""

from __future__ import annotations

import pytest
import torch
from cases import DEVICE, example_script
from transformers import MistralConfig, MistralForCausalLM

import attnc
from attnc.integrations.transformers import KernelAttention, register

TINY = example_script("transformers_tiny")
CAUSAL = attnc.stdlib().causal()
PADDED_CAUSAL = attnc.loads(TINY.PADDED_CAUSAL).padded_causal()
CAUSAL_NAME = register("attnc_test", CAUSAL) and "attnc_test"
PADDED_NAME = register("attnc_test_padded", PADDED_CAUSAL, key_mask="valid") and "attnc_test_padded"


def prompt(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=g).to(DEVICE)


@torch.no_grad()
def logits_difference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |logits - sdpa's| over the real (not padding) positions."""
    logits = model(ids, attention_mask=mask).logits
    expected = TINY.with_sdpa(model)(ids, attention_mask=mask).logits
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return (logits - expected).abs()[real].max().item()


def left_padded(ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ---- agreement with sdpa -----------------------------------------------------------------------------------


def test_prefill_logits_equal_sdpas() -> None:
    assert logits_difference(TINY.tiny_llama(CAUSAL_NAME, kv_heads=4), prompt()) < 1e-4


def test_grouped_query_prefill_logits_equal_sdpas() -> None:
    # One key/value head for four query heads: the kernel reads the shared heads natively.
    assert logits_difference(TINY.tiny_llama(CAUSAL_NAME, kv_heads=1), prompt()) < 1e-4


def test_generation_with_the_cache_equals_sdpas() -> None:
    # After the prompt, each step's one query sits after the cached keys (q_offset = Lk - Lq).
    prompt_diff, steps_diff, same_tokens = TINY.compare(TINY.tiny_llama(CAUSAL_NAME), prompt(), new_tokens=3)
    assert prompt_diff < 1e-4 and steps_diff < 1e-4 and same_tokens


def test_left_padded_generation_with_a_key_mask_input_equals_sdpas() -> None:
    ids, mask = left_padded(prompt(), pad=5)
    prompt_diff, steps_diff, same_tokens = TINY.compare(TINY.tiny_llama(PADDED_NAME), ids, mask, new_tokens=2)
    assert prompt_diff < 1e-4 and steps_diff < 1e-4 and same_tokens


def test_right_padded_prefill_with_a_key_mask_input_equals_sdpas() -> None:
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    assert logits_difference(TINY.tiny_llama(PADDED_NAME), ids, mask) < 1e-4


def test_an_all_ones_attention_mask_needs_no_key_mask_input() -> None:
    ids = prompt()
    assert logits_difference(TINY.tiny_llama(CAUSAL_NAME), ids, torch.ones_like(ids)) < 1e-4


def test_training_gradients_equal_sdpas() -> None:
    # In training mode (attention_dropout 0, Llama's default) the loss backpropagates through the kernel.
    model = TINY.tiny_llama(CAUSAL_NAME).train()
    reference = TINY.with_sdpa(model).train()
    ids = prompt(length=10)
    for m in (model, reference):
        m(ids, labels=ids).loss.backward()
    weight = model.model.layers[0].self_attn.q_proj.weight.grad
    expected = reference.model.layers[0].self_attn.q_proj.weight.grad
    assert weight.abs().max() > 0
    torch.testing.assert_close(weight, expected, rtol=1e-4, atol=1e-5)


def test_the_kernels_pattern_replaces_the_models_mask() -> None:
    # A non-causal kernel in a causal model: the first position, which sdpa lets see only itself, now
    # sees the whole prompt.
    register("attnc_test_full", attnc.stdlib().full())
    model = TINY.tiny_llama("attnc_test_full")
    ids = prompt()
    with torch.no_grad():
        difference = (model(ids).logits - TINY.with_sdpa(model)(ids).logits).abs().amax(dim=(0, 2))
    assert difference[0] > 1e-2


# ---- what the kernel cannot honour is refused --------------------------------------------------------------


def test_padded_keys_without_a_key_mask_input_are_an_error() -> None:
    ids, mask = left_padded(prompt(), pad=5)
    with pytest.raises(attnc.InputError, match="the batch has padded keys"), torch.no_grad():
        TINY.tiny_llama(CAUSAL_NAME)(ids, attention_mask=mask)


def test_attention_dropout_in_training_is_an_error() -> None:
    model = TINY.tiny_llama(CAUSAL_NAME)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(attnc.InputError, match=r"no attention dropout, got dropout=0\.1"):
        model(prompt())


def test_a_sliding_window_layers_mask_is_an_error() -> None:
    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        sliding_window=4,
        attn_implementation=CAUSAL_NAME,
    )
    with pytest.raises(attnc.InputError, match="a mask other than its plain causal one"), torch.no_grad():
        MistralForCausalLM(config).eval()(prompt())


def test_packed_sequences_are_an_error() -> None:
    # Without a cache (training), position ids that restart say that a row packs several sequences, and
    # transformers masks attention between them.
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]] * 2, device=DEVICE)
    with pytest.raises(attnc.InputError, match="a mask other than its plain causal one"), torch.no_grad():
        TINY.tiny_llama(CAUSAL_NAME)(prompt(), position_ids=positions, use_cache=False)


def test_a_static_cache_is_an_error() -> None:
    # A static cache hands the kernel all its slots, the queries not last among them.
    model = TINY.tiny_llama(CAUSAL_NAME)
    with pytest.raises(attnc.InputError, match=r"positions 0\.\.11 are not the last of 13 keys"):
        model.generate(prompt(), max_new_tokens=2, cache_implementation="static", pad_token_id=0)


def test_a_cache_whose_keys_do_not_start_at_position_0_is_an_error() -> None:
    # A sliding-window cache keeps only the last keys: the kernel would take slot 0 for position 0.
    with pytest.raises(attnc.InputError, match="the cache's keys start at position 6"):
        KernelAttention(CAUSAL).mask(batch_size=1, q_length=1, kv_length=4, q_offset=9, kv_offset=6)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("softcap", 30.0),  # Gemma 2's logit soft-capping
        ("sliding_window", 4),
        ("position_bias", torch.zeros(1, 2, 4, 4)),  # T5-style
        ("s_aux", torch.zeros(2)),  # gpt-oss sinks
        ("cu_seq_lens_q", torch.tensor([0, 2, 4], dtype=torch.int32)),  # packed sequences
    ],
)
def test_model_arguments_that_change_the_attention_are_errors(argument: str, value: object) -> None:
    q = k = v = torch.zeros(1, 2, 4, 16)
    with pytest.raises(attnc.InputError, match=f"the model passes {argument}=..., "):
        KernelAttention(CAUSAL)(torch.nn.Module(), q, k, v, None, **{argument: value})


def test_a_mask_of_whole_rows_is_an_error() -> None:
    q = k = v = torch.zeros(1, 2, 4, 16)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    with pytest.raises(attnc.InputError, match=r"shape \[1, 1, 4, 4\] cannot be mapped"):
        KernelAttention(CAUSAL)(torch.nn.Module(), q, k, v, mask)


def test_an_additive_key_mask_is_read_as_padding() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 16, generator=g).to(DEVICE) for _ in range(3))
    valid = torch.tensor([[False, True, True], [True, True, True]], device=DEVICE)
    additive = torch.zeros(2, 1, 1, 3, device=DEVICE).masked_fill(
        ~valid[:, None, None, :], torch.finfo(torch.float32).min
    )
    out, weights = KernelAttention(PADDED_CAUSAL, "valid")(torch.nn.Module(), q, k, v, additive)
    expected = PADDED_CAUSAL.reference(q, k, v, valid=valid).transpose(1, 2)
    assert weights is None and out.shape == (2, 3, 2, 16)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# ---- registration ------------------------------------------------------------------------------------------


def test_transformers_own_implementations_cannot_be_replaced() -> None:
    with pytest.raises(attnc.InputTypeError, match="cannot register attention implementation 'sdpa'"):
        register("sdpa", CAUSAL)


def test_the_key_mask_must_be_a_bool_input_over_batch_and_keys() -> None:
    rows = attnc.loads("pattern rows {\n input valid: bool[BATCH, Q_LEN]\n mask = valid[b, q]\n}").rows()
    with pytest.raises(attnc.InputError, match=r"declared `input valid: bool\[BATCH, KV_LEN\]`"):
        register("attnc_test_rows", rows, key_mask="valid")


def test_a_pattern_with_other_inputs_is_refused() -> None:
    documents = attnc.load("examples/document_causal.attn").document_causal()
    with pytest.raises(attnc.InputError, match="input 'doc' has no value in a transformers model"):
        register("attnc_test_documents", documents)
