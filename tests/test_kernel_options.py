"""Per-call `kernel_options`: a call chooses its launch configuration, forward and backward."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.runtime import registry
from attnc.runtime.autotune import INTERPRETER_CONFIG, Config
from attnc.runtime.launch import Forward, PlanCache, counting_visits

STD = attnc.stdlib()
DOC = attnc.load("examples/document_causal.attn").document_causal()


def launched(kern: attnc.Kernel) -> Forward:
    """The forward the kernel's calls run (the registry's, shared by its structure)."""
    return registry.find(kern._op_pattern)


def qkv(q_len: int = 40, kv_len: int = 40) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(1, 2, n, 16, requires_grad=True) for n in (q_len, kv_len, kv_len))


def test_the_options_set_the_forward_and_backward_launches() -> None:
    kern = STD.sliding_window(window=12)
    q, k, v = qkv()
    options = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2, "num_stages": 3}
    assert Config(32, 16, 2, 3) != INTERPRETER_CONFIG
    with counting_visits() as visits:
        out = kern(q, k, v, kernel_options=options)
        out.sum().backward()
    assert launched(kern).last_config == Config(32, 16, 2, 3)
    assert launched(kern).backward.last_config == Config(32, 16, 2, 3)
    assert visits["forward"].shape[-2:] == (2, 3)  # 40 queries in tiles of 32, 40 keys in tiles of 16
    assert visits["dkv"].shape[-2:] == (3, 2)
    torch.testing.assert_close(out, kern.reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_options_not_given_are_chosen_as_usual(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no plan on file: a plan an earlier call left for these lengths (the registry's forward is
    shared by every pattern of causal's structure) pins its block, which the options then amend."""
    kern = STD.causal()
    monkeypatch.setattr(launched(kern), "plans", PlanCache())
    q, k, v = qkv()
    kern(q, k, v, kernel_options={"BLOCK_N": 32})
    expected = INTERPRETER_CONFIG
    assert launched(kern).last_config == Config(expected.block_m, 32, expected.num_warps, expected.num_stages)


def test_the_options_take_precedence_over_attnc_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "16,16,1,1")
    kern = STD.causal()
    q, k, v = qkv()
    kern(q, k, v, kernel_options={"BLOCK_M": 32})
    assert launched(kern).last_config == Config(32, 16, 1, 1)


def test_a_plan_for_another_block_is_derived_for_the_options_block() -> None:
    doc = torch.tensor([[0] * 15 + [1] * 25], dtype=torch.int32)
    plan = DOC.plan(40, 40, block=(16, 16), doc=doc)
    q, k, v = qkv()
    out = DOC(q, k, v, plan=plan, doc=doc, kernel_options={"BLOCK_M": 32, "BLOCK_N": 32})
    assert launched(DOC).last_config.block_m == 32 and launched(DOC).last_config.block_n == 32
    assert (32, 32) in plan.derived
    torch.testing.assert_close(out, DOC.reference(q, k, v, doc=doc), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"BLOCK_K": 16}, attnc.InputError, "no option 'BLOCK_K'"),
        ({"BLOCK_M": 24}, attnc.InputError, "block sizes must be powers of two from 16"),
        ({"BLOCK_N": 8}, attnc.InputError, "block sizes must be powers of two from 16"),
        ({"num_warps": 3}, attnc.InputError, "warps must be a power of two"),
        ({"num_stages": 0}, attnc.InputError, "stages must be from 1"),
        ({"num_warps": True}, attnc.InputTypeError, "must be an int"),
        ({"BLOCK_M": 32.0}, attnc.InputTypeError, "must be an int"),
        ([("BLOCK_M", 32)], attnc.InputTypeError, "kernel_options must be a dict"),
    ],
    ids=["unknown", "block_m", "block_n", "warps", "stages", "bool", "float", "not_a_dict"],
)
def test_bad_options_are_clear_errors(options, error: type, match: str) -> None:
    q, k, v = qkv(8, 8)
    with pytest.raises(error, match=match):
        STD.causal()(q, k, v, kernel_options=options)
