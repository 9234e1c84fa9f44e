"""`Kernel.varlen`: packed sequences of different lengths, each its own batch row with its own sizes.

A packed call equals one call per sequence (the kernel on that sequence alone, and the oracle).
"""

from __future__ import annotations

import pytest
import torch
from cases import compile_counter

import attnc
from attnc.runtime.autograd import NO_FLOAT_PARAMS as NO_FLOATS

STD = attnc.stdlib()
DOC = attnc.load("examples/document_causal.attn").document_causal()
KEEP = attnc.loads("pattern keep { input keep: bool[KV_LEN]\n mask = kv <= q and keep[kv] }").keep()
BIASED = attnc.loads(
    "pattern p(cap: float) { input bias: float32[BATCH, NUM_HEADS]\n"
    " mask = kv <= q + 3\n score = cap * tanh(s / cap) + bias[b, h] * (KV_LEN - kv) * 0.01 }"
).p(cap=4.0)
Q_LENGTHS, KV_LENGTHS = [5, 0, 33, 17], [9, 4, 33, 40]


def packed(q_lengths: list[int], kv_lengths: list[int], heads: int = 4, kv_heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    q = torch.randn(sum(q_lengths), heads, 16)
    k, v = (torch.randn(sum(kv_lengths), kv_heads, 16) for _ in range(2))
    cu_q = torch.tensor([0, *torch.tensor(q_lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(kv_lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def sequence(t: torch.Tensor, cu: torch.Tensor, i: int) -> torch.Tensor:
    """Sequence i of a packed tensor as a [1, H, L, D] batch."""
    return t[cu[i] : cu[i + 1]].transpose(0, 1).unsqueeze(0)


def run(kern, q, k, v, cu_q, cu_k, **inputs):
    longest = {"max_seqlen_q": max(Q_LENGTHS), "max_seqlen_k": max(KV_LENGTHS)}
    return kern.varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **longest, **inputs)


def per_sequence_inputs(kern, i: int) -> dict:
    if kern is DOC:
        ids = torch.tensor([0] * 12 + [1] * 28)
        return {"doc": ids[: KV_LENGTHS[i]].reshape(1, -1).to(torch.int32)}
    if kern is BIASED:
        return {"bias": torch.tensor([[1.0, -2.0, 0.5, 3.0]]) * (i + 1)}
    if kern is KEEP:
        return {"keep": KEEP_IDS[: KV_LENGTHS[i]]}
    return {}


KEEP_IDS = torch.arange(40) % 7 != 3  # a metadata pattern that does not read `b`


@pytest.mark.parametrize(
    "kern", [STD.causal(), STD.sliding_window(window=10), DOC, BIASED, KEEP], ids=lambda k: k.name
)
def test_packed_sequences_equal_one_call_per_sequence(kern) -> None:
    q, k, v, cu_q, cu_k = packed(Q_LENGTHS, KV_LENGTHS)
    inputs = {}
    if kern is DOC:  # per sequence: [BATCH, KV_LEN], KV_LEN the longest sequence's
        inputs["doc"] = torch.tensor([[0] * 12 + [1] * 28] * 4, dtype=torch.int32)
    if kern is BIASED:
        inputs["bias"] = torch.cat([per_sequence_inputs(BIASED, i)["bias"] for i in range(4)])
    if kern is KEEP:  # [KV_LEN]: max_seqlen_k entries, the same for every sequence
        inputs["keep"] = KEEP_IDS
    out, lse = run(kern, q, k, v, cu_q, cu_k, **inputs)
    assert out.shape == (sum(Q_LENGTHS), 4, 16) and lse.shape == (4, sum(Q_LENGTHS))
    for i in range(len(Q_LENGTHS)):
        if Q_LENGTHS[i] == 0:
            continue
        args = (sequence(q, cu_q, i), sequence(k, cu_k, i), sequence(v, cu_k, i))
        one, one_lse = kern(*args, return_lse=True, **per_sequence_inputs(kern, i))
        ref = kern.reference(*args, **per_sequence_inputs(kern, i))
        torch.testing.assert_close(sequence(out, cu_q, i), one, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse[:, cu_q[i] : cu_q[i + 1]].unsqueeze(0), one_lse, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sequence(out, cu_q, i), ref, atol=2e-6, rtol=2e-6)


def test_packed_sequences_have_no_backward() -> None:
    q, k, v, cu_q, cu_k = packed(Q_LENGTHS, KV_LENGTHS)
    q.requires_grad_(True)
    out, _ = run(STD.causal(), q, k, v, cu_q, cu_k)
    with pytest.raises(NotImplementedError, match="no backward pass"):
        out.sum().backward()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"cu_seqlens_q": [0, 5, 5, 38, 54]}, attnc.InputError, r"cu_seqlens_q must run from 0 to 55"),
        ({"cu_seqlens_q": [0, 5, 4, 38, 55]}, attnc.InputError, "cu_seqlens_q must not decrease"),
        ({"cu_seqlens_k": [0, 9, 13, 46]}, attnc.InputError, r"cu_seqlens_k must have shape \[5\]"),
        ({"max_seqlen_k": 39}, attnc.InputError, r"max_seqlen_k=39 is below the longest sequence \(40\)"),
        ({"max_seqlen_q": -1}, attnc.InputError, "max_seqlen_q must be an int from 0"),
        ({"cu_seqlens_q": [0.0, 5.0, 5.0, 38.0, 55.0]}, attnc.InputTypeError, "cu_seqlens_q must be a int32"),
    ],
    ids=["end", "decreasing", "count", "max_too_small", "negative_max", "float"],
)
def test_bad_packing_is_a_clear_error(change: dict, error: type, match: str) -> None:
    q, k, v, cu_q, cu_k = packed(Q_LENGTHS, KV_LENGTHS)
    kwargs = {
        "cu_seqlens_q": cu_q,
        "cu_seqlens_k": cu_k,
        "max_seqlen_q": max(Q_LENGTHS),
        "max_seqlen_k": max(KV_LENGTHS),
    }
    for key, value in change.items():
        kwargs[key] = (
            torch.tensor(value, dtype=torch.int32 if isinstance(value[0], int) else None)
            if isinstance(value, list)
            else value
        )
    with pytest.raises(error, match=match):
        STD.causal().varlen(q, k, v, **kwargs)


def test_a_four_dimensional_q_is_refused() -> None:
    q, k, v, cu_q, cu_k = packed(Q_LENGTHS, KV_LENGTHS)
    with pytest.raises(attnc.InputError, match=r"q must be a 3-D tensor \[total rows, heads, head dim\]"):
        STD.causal().varlen(
            q[None], k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=33, max_seqlen_k=40
        )


def test_lengths_past_the_packed_tensors_never_read_outside_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the op refuses when it reads the values, given to it where it does not (a GPU caller's broken
    # contract without ATTNC_DEBUG): sequence 1 claims keys 4 to 2000 of 8; the kernel cuts it to rows 4-7.
    from attnc.runtime import autograd

    monkeypatch.setattr(autograd, "_readable", lambda t: False)
    torch.manual_seed(0)
    q, k, v = torch.randn(10, 2, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    cu_q, cu_k = torch.tensor([0, 5, 10], dtype=torch.int32), torch.tensor([0, 4, 2000], dtype=torch.int32)
    kern = STD.full()
    views = [t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)]
    out, _ = autograd.attention(
        *views, [], kern._op_pattern, 0.25, [], NO_FLOATS, 0, None, None, None, None, cu_q, cu_k, 5, 2000
    )
    want = kern.reference(
        sequence(q, cu_q, 1), k[4:].transpose(0, 1)[None], v[4:].transpose(0, 1)[None], scale=0.25
    )
    torch.testing.assert_close(out[:, :, 5:], want, atol=1e-6, rtol=1e-6)


# ---- torch.compile: the cumulative lengths' values are checked in the op --------------------------------


def compiled_varlen(kern, **fixed):
    """`run` under `torch.compile(fullgraph=True)`: one graph, no break around the call."""
    return torch.compile(
        lambda q, k, v, cu_q, cu_k, **inputs: run(kern, q, k, v, cu_q, cu_k, **fixed, **inputs),
        fullgraph=True,
        backend=compile_counter(),
    )


def test_a_fullgraph_compiled_varlen_with_a_float_parameter_matches_the_oracle() -> None:
    q, k, v, cu_q, cu_k = packed(Q_LENGTHS, KV_LENGTHS)
    bias = torch.cat([per_sequence_inputs(BIASED, i)["bias"] for i in range(4)])
    out, lse = compiled_varlen(BIASED, cap=2.0)(q, k, v, cu_q, cu_k, bias=bias)
    for i in range(len(Q_LENGTHS)):
        args = (sequence(q, cu_q, i), sequence(k, cu_k, i), sequence(v, cu_k, i))
        ref, ref_lse = BIASED.reference(*args, cap=2.0, return_lse=True, **per_sequence_inputs(BIASED, i))
        torch.testing.assert_close(sequence(out, cu_q, i), ref, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse[:, cu_q[i] : cu_q[i + 1]].unsqueeze(0), ref_lse, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize(
    ("name", "values", "match"),
    [
        ("cu_seqlens_q", [0, 5, 5, 38, 54], r"cu_seqlens_q must run from 0 to 55 \(the packed rows\)"),
        ("cu_seqlens_k", [0, 9, 8, 45, 86], "cu_seqlens_k must not decrease"),
        ("cu_seqlens_k", [0, 8, 12, 45, 86], r"max_seqlen_k=40 is below the longest sequence \(41\)"),
        ("cu_seqlens_q", [0, 5, 5, 38, 2**32 + 55], r"cu_seqlens_q must run from 0 to 55"),  # not wrapped
    ],
    ids=["end", "decreasing", "max_too_small", "past_int32"],
)
def test_bad_cumulative_lengths_are_the_same_errors_compiled(
    name: str, values: list[int], match: str
) -> None:
    q, k, v, cu_q, cu_k = packed(Q_LENGTHS, KV_LENGTHS)
    cu = {"cu_q": cu_q.long(), "cu_k": cu_k.long()} | {name.replace("seqlens_", ""): torch.tensor(values)}
    with pytest.raises(attnc.InputError, match=match) as eager:
        run(STD.causal(), q, k, v, **cu)
    with pytest.raises(attnc.InputError, match=match) as compiled:
        compiled_varlen(STD.causal())(q, k, v, **cu)
    assert str(compiled.value) == str(eager.value)
