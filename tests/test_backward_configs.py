"""The backward's two kernels have launch configurations of their own (issue 18 item 5): the dQ kernel
owns a query tile, the dK/dV kernel a key tile (the MMA's M side of S^T = K Q^T), so each gets the
tiles, warps and stages that fit its registers. A forced configuration (`ATTNC_CONFIG`, kernel
options) and the interpreter's serve both. Gradients are judged against the dense oracle."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnc
from attnc import bench
from attnc.runtime import autotune, registry
from attnc.runtime import launch as launching
from attnc.runtime.autotune import Config, LaunchShape
from attnc.runtime.launch import Backward, counting_visits
from attnc.testing import compare_gradients

STD = attnc.stdlib()
DOC = attnc.load("examples/document_causal.attn").document_causal()
H100_SHARED = 227 * 1024


def backward_of(kern: attnc.Kernel) -> Backward:
    """The backward the kernel's calls run (the registry's forward's, shared by its structure)."""
    return registry.find(kern._op_pattern).backward


def qkv(length: int = 40) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(1, 2, length, 16) for _ in range(3))


@pytest.mark.parametrize("which", ["causal", "document_causal"])
def test_dq_and_dkv_kernels_with_blocks_of_their_own_have_the_oracles_gradients(
    which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Other query and key tiles in each kernel: a metadata plan is derived for each kernel's block.
    chosen = {False: Config(32, 16, 1, 1), True: Config(16, 32, 1, 1)}

    def config(*args: Any, dkv: bool = False, **kwargs: Any) -> Config:
        return chosen[dkv]

    monkeypatch.setattr(launching, "_config", config)
    kern = STD.causal() if which == "causal" else DOC
    q, k, v = qkv()
    doc = torch.tensor([[0] * 11 + [1] * 20 + [2] * 9], dtype=torch.int32)
    inputs = {} if which == "causal" else {"doc": doc}
    with counting_visits() as visits:
        comparison = compare_gradients(kern, q, k, v, **inputs)
    assert comparison.ok, comparison.describe()
    assert backward_of(kern).last_config == chosen[False]
    assert backward_of(kern).last_dkv_config == chosen[True]
    # `attnc bench` reports both
    assert bench.launch_config(kern, "backward") == f"dQ {chosen[False]}; dK/dV {chosen[True]}"
    assert visits["dq"].shape[-2:] == (2, 3)  # 40 queries in tiles of 32, 40 keys in tiles of 16
    assert visits["dkv"].shape[-2:] == (2, 3)  # 40 keys in tiles of 32, 40 queries in tiles of 16


def test_a_forced_configuration_serves_both_backward_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "16,32,2,1")
    kern = STD.sliding_window(window=12)
    q, k, v = (t.requires_grad_() for t in qkv())
    kern(q, k, v).sum().backward()
    assert backward_of(kern).last_config == Config(16, 32, 2, 1)
    assert backward_of(kern).last_dkv_config == Config(16, 32, 2, 1)


def test_on_a_gpu_dq_and_dkv_take_their_own_heuristics_first_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        launching, "_device_limits", lambda index: launching.DeviceLimits("a GPU", H100_SHARED, 90)
    )
    monkeypatch.setenv("ATTNC_AUTOTUNE", "0")
    device = torch.device("cuda", 0)
    for dim in (64, 128, 256):
        shape = LaunchShape("bfloat16", dim, dim, 1, 4096, 4096, 32)

        def choose(dkv: bool, shape: LaunchShape = shape) -> Config:
            return launching._config({}, "key", "p", "cuda", device, shape, lambda c: 1.0, True, None, dkv)

        assert choose(False) == autotune.heuristic(shape, H100_SHARED, backward=True)
        assert choose(True) == autotune.heuristic(shape, H100_SHARED, backward=True, dkv=True)


# `ptxas -v` for sm_90 (Triton 3.9's wheel, causal bf16, `python -m attnc.testing.static causal --backward
# --kernel attnc_bwd_dkv --dim D --config C`): registers of those that fit, None for those that spill.
DKV_REGISTERS = {
    (64, Config(16, 128, 8, 3)): 190,
    (64, Config(16, 64, 8, 3)): 156,
    (64, Config(32, 64, 8, 3)): 200,
    (64, Config(32, 128, 8, 3)): 233,
    (64, Config(16, 128, 4, 3)): None,  # 68 bytes
    (128, Config(16, 64, 8, 3)): 208,
    (128, Config(16, 64, 8, 2)): 184,
    (128, Config(16, 128, 8, 3)): 242,
    (128, Config(16, 128, 8, 2)): 232,
    (128, Config(32, 32, 8, 3)): 157,
    (128, Config(32, 64, 8, 3)): None,  # 8 bytes
    (128, Config(16, 64, 4, 3)): None,  # 28 bytes
    (256, Config(16, 32, 8, 3)): 167,
    (256, Config(16, 32, 8, 2)): 162,
    (256, Config(32, 32, 8, 3)): 171,
    (256, Config(32, 32, 8, 1)): 162,
    (256, Config(16, 32, 4, 3)): 248,
    (256, Config(16, 64, 8, 3)): None,  # 220 bytes
    (256, Config(16, 64, 8, 2)): None,  # 192 bytes
}


def test_the_dkv_kernel_of_an_analytic_plan_of_several_conjuncts_takes_its_own_first_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its ranges (one per conjunct) cost registers: 128-key tiles at head dim 128 spill for prefix LM
    # and sinks + window (tests/test_static_sm90.py), 64-key tiles do not. The launcher passes the
    # spec's conjuncts to the heuristic.
    assert autotune.kernel_conjuncts(None) == 1  # a metadata plan
    specs = {
        "causal": STD.causal(),
        "prefix_lm": STD.prefix_lm(prefix=16),
        "document": attnc.load("examples/document_causal.attn").document_causal(),
    }
    conjuncts = {name: autotune.kernel_conjuncts(backward_of(k).spec.q_ranges) for name, k in specs.items()}
    assert conjuncts == {"causal": 1, "prefix_lm": 2, "document": 1}
    real = launching._config
    passed: dict[str, int] = {}

    def recorded(*args: Any, **kwargs: Any) -> Config:
        if kwargs.get("dkv"):
            passed[name] = kwargs.get("conjuncts", 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(launching, "_config", recorded)
    for name, kern in specs.items():
        q, k, v = (t.requires_grad_() for t in qkv())
        inputs = {"doc": torch.zeros(1, q.shape[2], dtype=torch.int32)} if name == "document" else {}
        kern(q, k, v, **inputs).sum().backward()
    assert passed == conjuncts
    # On an H100 (shared memory and heuristics; autotuning off): 64-key tiles for prefix LM only.
    monkeypatch.setattr(
        launching, "_device_limits", lambda index: launching.DeviceLimits("a GPU", H100_SHARED, 90)
    )
    monkeypatch.setenv("ATTNC_AUTOTUNE", "0")
    shape = LaunchShape("bfloat16", 128, 128, 1, 4096, 4096, 32)
    for name, count in conjuncts.items():
        chosen = real(
            {}, "key", "p", "cuda", torch.device("cuda", 0), shape, lambda c: 1.0, True, None, True,
            conjuncts=count,
        )  # fmt: skip
        assert chosen == (Config(16, 64, 8, 3) if name == "prefix_lm" else Config(16, 128, 8, 3))


def test_the_dkv_register_estimate_errs_high_and_rules_out_what_spills() -> None:
    # What `candidates` relies on to leave spilling configurations out, and the heuristic's fallbacks.
    for (dim, config), measured in DKV_REGISTERS.items():
        shape = LaunchShape("bfloat16", dim, dim, 1, 4096, 4096, 8)
        estimate = autotune.registers(config, shape, dkv=True)
        if measured is None:
            assert estimate > autotune.MAX_REGISTERS, (dim, config, estimate)
        else:
            assert measured <= estimate <= autotune.MAX_REGISTERS, (dim, config, estimate, measured)


def test_at_head_dim_256_dkv_keeps_two_tiles_in_flight() -> None:
    # 32 queries by 32 keys, 3 stages: no pattern spills (tests/test_static_sm90.py compiles causal's),
    # with 0.58x the SASS instructions per score of 16 x 32 (FULL tile: 379 for 1,024 scores against
    # 331 for 512); 16 x 32 stays a candidate.
    shape = LaunchShape("bfloat16", 256, 256, 1, 4096, 4096, 8)
    first = autotune.heuristic(shape, H100_SHARED, dkv=True)
    assert first == Config(32, 32, 8, 3)
    assert first in autotune.candidates(shape, H100_SHARED, dkv=True)
    assert Config(16, 32, 8, 3) in autotune.candidates(shape, H100_SHARED, dkv=True)
