"""A tiny Llama from Hugging Face transformers, randomly initialised (no weights are downloaded), with an
attnc kernel as its attention (`attnc.integrations.transformers`), checked against transformers' own
`sdpa` attention on the same weights: the logits of a prompt, greedy generation with the KV cache (the
kernel's queries then sit after the cached keys), and a left-padded batch (a pattern that reads which
keys are real tokens). Needs `pip install 'attnc[transformers]'`.

    .venv/bin/python examples/transformers_tiny.py --length 24 --new-tokens 4
"""

from __future__ import annotations

import argparse
import copy

import torch

# attnc first: without a GPU it chooses Triton's interpreter, which must happen before transformers
# imports Triton.
import attnc

# isort: split
from transformers import LlamaConfig, LlamaForCausalLM

from attnc.integrations.transformers import register

TOLERANCE = 1e-4  # float32 logits: the kernel and SDPA differ in rounding only
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # without a GPU: Triton's interpreter

# A padded batch needs the pattern to see which keys are real tokens (True) and which are padding.
PADDED_CAUSAL = """
pattern padded_causal {
    input valid: bool[BATCH, KV_LEN]
    mask = causal and valid[b, kv]
}
"""


def tiny_llama(attn_implementation: str, *, kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with 4 query heads of dimension 16 sharing `kv_heads` key/value heads (GQA),
    vocabulary 128, in eval mode on `DEVICE`; the same weights for the same seed."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=128,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().to(DEVICE)


def with_sdpa(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The same model (a copy of its weights) on transformers' `sdpa` attention."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = "sdpa"  # (`set_attn_implementation` is newer than transformers 4.53)
    twin = type(model)(config).eval().to(model.device)
    twin.load_state_dict(model.state_dict())
    return twin


@torch.no_grad()
def compare(
    model: LlamaForCausalLM,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    new_tokens: int = 4,
) -> tuple[float, float, bool]:
    """Largest |logit difference| against `sdpa` for the prompt and for the generated steps, and whether
    greedy generation chose the same tokens. Rows of padding are left out of the prompt's logits."""
    reference = with_sdpa(model)
    logits = model(ids, attention_mask=attention_mask).logits
    expected = reference(ids, attention_mask=attention_mask).logits
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prompt = (logits - expected).abs()[real].max().item()
    options = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    options |= {"output_logits": True, "return_dict_in_generate": True, "attention_mask": attention_mask}
    ours, theirs = model.generate(ids, **options), reference.generate(ids, **options)
    steps = max((a - b).abs().max().item() for a, b in zip(ours.logits, theirs.logits, strict=True))
    return prompt, steps, torch.equal(ours.sequences, theirs.sequences)


def report(what: str, prompt: float, steps: float, same_tokens: bool) -> bool:
    ok = prompt <= TOLERANCE and steps <= TOLERANCE and same_tokens
    print(
        f"{what}: max |logits - sdpa| prompt {prompt:.2e}, generation {steps:.2e}; "
        f"tokens {'equal' if same_tokens else 'DIFFER'}: {'ok' if ok else 'MISMATCH'}"
    )
    return ok


def main(length: int = 24, new_tokens: int = 4, batch: int = 2, seed: int = 0) -> bool:
    """Run both checks (a causal kernel, then a left-padded batch); True if both agree with sdpa."""
    register("attnc", attnc.stdlib().causal())
    register("attnc_padded", attnc.loads(PADDED_CAUSAL).padded_causal(), key_mask="valid")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=generator).to(DEVICE)

    ok = report("causal, GQA 4/2", *compare(tiny_llama("attnc", seed=seed), ids, new_tokens=new_tokens))

    attention_mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    attention_mask[0, : length // 3] = 0  # left padding: the first row's prompt is shorter
    padded = ids.masked_fill(attention_mask == 0, 0)
    model = tiny_llama("attnc_padded", seed=seed)
    return report("left-padded batch", *compare(model, padded, attention_mask, new_tokens)) and ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=24, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens generated greedily")
    parser.add_argument("--batch", type=int, default=2, help="prompts in the batch")
    arguments = parser.parse_args()
    main(arguments.length, arguments.new_tokens, arguments.batch)
