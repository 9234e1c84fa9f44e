"""Patterns, inputs and tensors the kernel tests share (forward and backward)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import attnc
from attnc.testing import compare, compare_gradients

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
LENGTHS = (67, 1000, 4097) if ON_GPU else (67,)

STD = attnc.stdlib()
STREAMING = attnc.load("examples/streaming_llm.attn")
GEMMA = attnc.load("examples/gemma_local.attn")
DOCUMENT = attnc.load("examples/document_causal.attn").document_causal()

Inputs = Callable[[int, int, int, int], dict[str, torch.Tensor]]  # (batch, heads, q_len, kv_len) -> inputs


def no_inputs(batch: int, heads: int, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    return {}


def documents(batch: int, heads: int, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + kv_len)
    lengths = torch.randint(1, max(2, kv_len // 3), (kv_len,), generator=g)
    ids = torch.repeat_interleave(torch.arange(kv_len), lengths)[:kv_len]
    return {"doc": ids.to(torch.int32).expand(batch, kv_len).contiguous().to(DEVICE)}


def qkv(
    batch: int,
    heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    dim: int,
    dim_v: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, dim if dim_v is None else dim_v, generator=g)
    return tuple(t.to(dtype).to(DEVICE) for t in (q, k, v))  # type: ignore[return-value]


# ---- every stdlib pattern and example --------------------------------------------------------------------

PATTERNS: list[tuple[attnc.Kernel, Inputs]] = [
    (STD.full(), no_inputs),
    (STD.causal(), no_inputs),
    (STD.causal_bottom_right(), no_inputs),
    (STD.sliding_window(window=1), no_inputs),
    (STD.sliding_window(window=20), no_inputs),
    (STD.local(left=3, right=9), no_inputs),
    (STD.local(left=0, right=40), no_inputs),
    (STD.sinks(count=5), no_inputs),
    (STD.prefix_lm(prefix=20), no_inputs),
    (STD.dilated(window=4, dilation=3), no_inputs),
    (STD.neighborhood_1d(kernel=5), no_inputs),
    (STD.neighborhood_1d(kernel=7, dilation=2, is_causal=True), no_inputs),
    (STD.neighborhood_2d(height=5, width=13, kernel_h=3, kernel_w=5), no_inputs),
    (STD.neighborhood_3d(depth=3, height=3, width=7, kernel_d=3, kernel_h=2, kernel_w=3), no_inputs),
    (STREAMING.streaming_llm(window=20, sinks=3), no_inputs),
    (GEMMA.gemma_local(window=30, cap=2.0), no_inputs),
    (GEMMA.gemma_local(window=30), no_inputs),  # cap 50: tanh of small values, where exp-based forms cancel
    (DOCUMENT, documents),
]
# The patterns the forward and backward tests run in float16 and bfloat16.
HALF_PRECISION_PATTERNS: list[tuple[attnc.Kernel, Inputs]] = [
    (STD.causal(), no_inputs),
    (STD.dilated(window=4, dilation=3), no_inputs),
    (GEMMA.gemma_local(window=30, cap=5.0), no_inputs),
    (DOCUMENT, documents),
]


def matches_oracle(
    kern: attnc.Kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    **inputs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's output and lse held to the oracle's by the tolerance rule, and its gradients to
    autograd through the oracle; returns (out, lse)."""
    out, lse = kern(q, k, v, scale=scale, return_lse=True, **inputs)
    forward = compare(kern, out, lse, q, k, v, scale, **inputs)
    assert forward.ok, forward.describe()
    backward = compare_gradients(kern, q, k, v, scale=scale, **inputs)
    assert backward.ok, backward.describe()
    return out, lse


def pattern_id(x: object) -> str:
    return str(x).removeprefix("<attnc.Kernel ").removesuffix(">") if isinstance(x, attnc.Kernel) else ""


EXAMPLES = Path(__file__).parents[1] / "examples"


def example_script(stem: str) -> ModuleType:
    """Import examples/STEM.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{stem}", EXAMPLES / f"{stem}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def compile_counter() -> Any:
    """A fresh dynamo with a backend (`aot_eager`: fast on the CPU) that counts the graphs it compiles.
    Imported here: `torch._dynamo` imports Triton, which `import attnc` must precede (it picks the
    interpreter)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    return CompileCounterWithBackend("aot_eager")
