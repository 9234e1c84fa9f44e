"""Kernels at blocks of their own, judged by the dense oracle: a bounded run of both campaigns of
`scripts/fuzz_mixed_blocks.py`.

Everywhere else in the suite the interpreter runs the forward, dQ and dK/dV kernels at one
configuration, so a backward kernel that assumed its blocks equal to another kernel's (a tile index, a
row count, a plan's block) would pass. Here each kernel gets its own block from 16, 32 and 64 per side:
random programs with gradients (`attnc.testing.fuzz`), and masks that are an `or` of 2 to 5 ranges
through forward, gradients, chunks merged by lse and decode.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import attnc
from attnc.runtime import launch
from attnc.runtime.autotune import Config
from attnc.testing import compare_gradients, fuzz

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("fuzz_mixed_blocks", ROOT / "scripts" / "fuzz_mixed_blocks.py")
assert SPEC is not None and SPEC.loader is not None
mixed = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(mixed)

SEED = 20261207


def _recording(choose: Any, chosen: list[tuple[str, Config]]) -> Any:
    """`choose` (a `launch._config`), keeping which kernel got which configuration."""

    def config(*args: Any, **kw: Any) -> Config:
        found = choose(*args, **kw)
        chosen.append((mixed._kernel_name(kw.get("backward", False), bool(kw.get("dkv"))), found))
        return found

    return config


def _blocks_differ(chosen: list[tuple[str, Config]]) -> bool:
    """Some backward ran its dQ and dK/dV kernels at different blocks."""
    kinds = [name for name, _ in chosen]
    return any(
        name == "dq" and kinds[i + 1 : i + 2] == ["dkv"] and config != chosen[i + 1][1]
        for i, (name, config) in enumerate(chosen)
    )


def test_random_programs_with_gradients_at_mixed_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[tuple[str, Config]] = []
    monkeypatch.setattr(launch, "_config", _recording(mixed._hashed_config(SEED), chosen))
    report = fuzz.fuzz(fuzz.cases(grads=True, max_len=70), 300, seed=SEED, max_cases=10, batch=10)
    assert report.failure is None, f"{report.failure.describe()}\n{report.error}\n{report.failure.source}"
    assert report.cases >= 10
    assert _blocks_differ(chosen), chosen


@pytest.mark.parametrize("index", range(3))
def test_overlapping_ranges_at_mixed_blocks(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    chosen: list[tuple[str, Config]] = []
    monkeypatch.setattr(launch, "_config", _recording(mixed._chosen_config, chosen))
    mixed._check_conjuncts(random.Random(SEED * 100_003 + index), index)
    blocks = {name: config for name, config in chosen}
    assert set(blocks) == {"forward", "dq", "dkv"}, chosen


@pytest.mark.parametrize(
    ("forward", "dq", "dkv"),
    [((32, 16), (16, 64), (64, 16)), ((16, 32), (32, 16), (16, 32))],
    ids=["dkv-wide-rows", "dq-wide-rows"],
)
def test_metadata_plans_are_built_per_kernel_block(
    monkeypatch: pytest.MonkeyPatch, forward: tuple[int, int], dq: tuple[int, int], dkv: tuple[int, int]
) -> None:
    """Document masking's plan is built from its input for each kernel's own block: dQ's key tiles per
    query tile and dK/dV's query tiles per key tile at blocks that differ from each other."""
    monkeypatch.setitem(mixed._CHOSEN, "forward", Config(*forward, 1, 1))
    monkeypatch.setitem(mixed._CHOSEN, "dq", Config(*dq, 1, 1))
    monkeypatch.setitem(mixed._CHOSEN, "dkv", Config(*dkv, 1, 1))
    monkeypatch.setattr(launch, "_config", mixed._chosen_config)
    kern = attnc.load(ROOT / "examples" / "document_causal.attn").document_causal()
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 77, 16, generator=g) for _ in range(3))
    doc = torch.cumsum(torch.rand(2, 77, generator=g) < 0.08, dim=1).to(torch.int32)
    gradients = compare_gradients(kern, q, k, v, seed=3, doc=doc)
    assert gradients.ok, gradients.describe()
