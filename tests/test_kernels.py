"""The fused Triton forward kernels, `kern(q, k, v)`, judged by the dense oracle.

Without a GPU they run under Triton's interpreter on small shapes; with one, on the GPU, at bigger
shapes too. Each result is held to the oracle by the tolerance rule of `attnc.testing` (DESIGN.md
section 7): at most twice the error of the same attention computed densely in the input dtype, plus a
tiny atol; rows that see no key exactly 0 with lse -inf.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import pytest
import torch
from cases import (
    DEVICE,
    DOCUMENT,
    HALF_PRECISION_PATTERNS,
    LENGTHS,
    ON_GPU,
    PATTERNS,
    STD,
    STREAMING,
    Inputs,
    documents,
    no_inputs,
    qkv,
)
from cases import (
    pattern_id as _id,
)

import attnc
from attnc.errors import InputError
from attnc.testing import compare


def check(
    kern: attnc.Kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    **inputs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel and hold it to the oracle by the tolerance rule; return (out, lse)."""
    out, lse = kern(q, k, v, return_lse=True, scale=scale, **inputs)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[3])
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    comparison = compare(kern, out, lse, q, k, v, scale, **inputs)
    assert comparison.ok, f"{kern}: {comparison.describe()}"
    return out, lse


# ---- every stdlib pattern and example --------------------------------------------------------------------


@pytest.mark.parametrize(("kern", "inputs"), PATTERNS, ids=_id)
@pytest.mark.parametrize("length", LENGTHS)
def test_every_pattern_matches_the_oracle(kern: attnc.Kernel, inputs: Inputs, length: int) -> None:
    q, k, v = qkv(2, 4, 2, length, length, 24, 20)
    check(kern, q, k, v, **inputs(2, 4, length, length))


# ---- shapes: GQA, cross lengths, lengths that are not tile multiples, head dims --------------------------

SHAPES = [  # batch, query heads, key/value heads, q_len, kv_len, head dim, v head dim
    (1, 1, 1, 1, 1, 16, 16),
    (2, 4, 1, 33, 33, 16, 16),
    (1, 2, 2, 17, 80, 64, 64),
    (1, 2, 1, 80, 17, 24, 24),
    (1, 3, 3, 64, 64, 24, 40),
    (1, 2, 2, 100, 37, 16, 16),
]
SHAPE_PATTERNS = [
    (STD.causal_bottom_right(), no_inputs),
    (STREAMING.streaming_llm(window=9, sinks=2), no_inputs),
    (DOCUMENT, documents),
]


@pytest.mark.parametrize(("kern", "inputs"), SHAPE_PATTERNS, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(kern: attnc.Kernel, inputs: Inputs, shape: tuple[int, ...]) -> None:
    batch, heads, kv_heads, q_len, kv_len, dim, dim_v = shape
    q, k, v = qkv(batch, heads, kv_heads, q_len, kv_len, dim, dim_v, seed=q_len)
    check(kern, q, k, v, **inputs(batch, heads, q_len, kv_len))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("kern", "inputs"), HALF_PRECISION_PATTERNS, ids=_id)
def test_half_precision(kern: attnc.Kernel, inputs: Inputs, dtype: torch.dtype) -> None:
    q, k, v = qkv(2, 4, 2, 67, 67, 64, 64, dtype=dtype)
    check(kern, q, k, v, **inputs(2, 4, 67, 67))


@pytest.mark.parametrize("config", ["16,64", "64,16", "16,16"])
def test_tile_shapes(monkeypatch: pytest.MonkeyPatch, config: str) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", config)
    q, k, v = qkv(1, 2, 2, 75, 90, 16, 16)
    for kern, inputs in SHAPE_PATTERNS:
        check(kern, q, k, v, **inputs(1, 2, 75, 90))
        bm, bn = (int(x) for x in config.split(","))
        assert kern._forward.last_config is not None
        assert (kern._forward.last_config.block_m, kern._forward.last_config.block_n) == (bm, bn)


def test_non_contiguous_tensors_and_a_given_scale() -> None:
    # [B, L, H, D] storage viewed as [B, H, L, D], as many models keep it.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(2, 4, 2, 50, 50, 32))
    assert not q.is_contiguous()
    check(STREAMING.streaming_llm(window=9, sinks=2), q, k, v, scale=0.3)


# ---- empty rows and empty tensors ------------------------------------------------------------------------


def test_rows_that_see_no_key_are_zero_with_lse_minus_inf() -> None:
    kern = attnc.loads("pattern p { mask = q % 3 != 1 and kv <= q - 2 }").p()
    q, k, v = qkv(1, 2, 1, 40, 40, 16)
    out, lse = check(kern, q, k, v)
    assert torch.isneginf(lse[:, :, 1::3]).all() and (out[:, :, 1::3] == 0).all()
    assert torch.isneginf(lse[:, :, :2]).all()


def test_cross_lengths_bottom_right_leave_the_first_queries_empty() -> None:
    q, k, v = qkv(1, 1, 1, 50, 20, 16)
    _, lse = check(STD.causal_bottom_right(), q, k, v)
    assert torch.isneginf(lse[0, 0, :30]).all() and not torch.isneginf(lse[0, 0, 30:]).any()


def test_no_keys_or_no_queries() -> None:
    q, k, v = qkv(1, 2, 2, 5, 0, 16)
    out, lse = STD.causal()(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    q, k, v = qkv(1, 2, 2, 0, 5, 16)
    out, lse = STD.causal()(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


def test_a_false_mask_visits_no_tile() -> None:
    kern = attnc.loads("pattern p { mask = kv < 0 }").p()
    q, k, v = qkv(1, 1, 1, 20, 20, 16)
    out, lse = kern(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


# ---- the language's semantics inside the kernel ----------------------------------------------------------


@pytest.mark.parametrize(
    "mask",
    [
        "(q - kv) // 3 >= -2 and (q - 2 * kv) % 5 != 1",  # floor division of negative operands
        "(q - kv) // 4 == -1 or (kv - q) % 8 == 3",  # by powers of two: shifts and bit masks
        "q // (kv - 5) != 2 and q % (kv - 5) != 1",  # by a variable, and by zero at kv = 5
        "q * 1000000007 % 13 == kv * 1000000007 % 13 or kv <= q",  # products past int32
        "(q + 3000000000) % 7 == kv % 7",  # constants past int32
        "abs(q - kv) <= 4 and min(q, kv) >= 3 and max(q, kv) < 60",
        "(q - kv) * 0.1 <= 0.3 and kv <= q",  # float64 as the oracle: 3 * 0.1 > 0.3, not in float32
        "where(q < 20, kv <= q, not (kv <= q))",
    ],
)
def test_integer_and_float_semantics_of_masks(mask: str) -> None:
    kern = attnc.loads(f"pattern p {{ mask = {mask} }}").p()
    q, k, v = qkv(1, 2, 2, 67, 67, 16)
    check(kern, q, k, v)


def test_float_mask_is_decided_in_float64() -> None:
    kern = attnc.loads("pattern p { mask = (q - kv) * 0.1 <= 0.3 and kv <= q }").p()
    assert not kern.mask(8, 8)[0, 0, 3, 0]  # the oracle excludes distance 3 (0.30000000000000004)
    q, k, v = qkv(1, 1, 1, 8, 8, 16)
    out = kern(q, k, v)
    expected = STD.sliding_window(window=3)(q, k, v)  # distances 0, 1, 2
    assert torch.allclose(out, expected, atol=1e-6)


def test_inputs_of_every_dtype_with_out_of_range_reads() -> None:
    kern = attnc.loads(
        "pattern p {\n"
        "    input keep: bool[BATCH, KV_LEN]\n"
        "    input limit: int64[Q_LEN]\n"
        "    input group: int32[NUM_HEADS]\n"
        "    input bias: bfloat16[NUM_HEADS, 40]\n"
        "    input temp: float16[NUM_HEADS]\n"
        "    mask = keep[b, kv] and kv % 7 <= limit[q] + group[h] and kv <= q + 5\n"
        "    score = s * temp[h] + bias[h, q - kv + 3]\n"  # reads 0 where q - kv + 3 leaves [0, 40)
        "}\n"
    ).p()
    g = torch.Generator().manual_seed(3)
    inputs = {
        "keep": torch.rand(2, 60, generator=g) < 0.8,
        "limit": torch.randint(-1, 6, (50,), generator=g),
        "group": torch.tensor([0, 1, 2, 0], dtype=torch.int32),
        "bias": torch.randn(4, 40, generator=g).to(torch.bfloat16),
        "temp": (torch.rand(4, generator=g) + 0.5).to(torch.float16),
    }
    q, k, v = qkv(2, 4, 2, 50, 60, 16)
    check(kern, q, k, v, **{n: t.to(DEVICE) for n, t in inputs.items()})


def test_head_and_batch_dependent_masks() -> None:
    kern = attnc.loads("pattern p { mask = kv <= q - 3 * h and (b == 0 or kv % 2 == 0) }").p()
    q, k, v = qkv(2, 4, 4, 40, 40, 16)
    check(kern, q, k, v)


# ---- caching: renders, disk, modules ---------------------------------------------------------------------


def test_rendered_source_parses_and_is_the_lower_triton_stage() -> None:
    for kern, _ in PATTERNS:
        source = kern.ir("lower-triton")
        ast.parse(source)
        assert "def attnc_fwd(" in source and kern.stages["lower-triton"] == source


def test_a_second_compile_hits_the_cache_and_renders_nothing() -> None:
    from attnc.runtime.cache import STATS

    STD.sliding_window(window=77)
    renders = STATS.renders
    again = STD.sliding_window(window=77)
    assert STATS.renders == renders
    # Same structure under another name: the same kernel.
    twin = attnc.loads("pattern twin(window: int) { mask = kv <= q and q - kv < window }").twin(77)
    assert twin._compiled.source.key == again._compiled.source.key and STATS.renders == renders
    # The window is a runtime parameter: every value shares the kernel. A static one specialises it.
    other = STD.sliding_window(window=78)
    assert other._compiled.source.key == again._compiled.source.key and STATS.renders == renders
    static = attnc.loads("pattern sw(static window: int) { mask = kv <= q and q - kv < window }").sw
    assert static(window=77)._compiled.source.key != static(window=78)._compiled.source.key


def test_the_disk_cache_serves_a_new_process(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from attnc.runtime import cache

    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    cache.clear_memory()
    try:
        renders, disk_hits = cache.STATS.renders, cache.STATS.disk_hits
        kern = STD.local(left=2, right=3)
        assert cache.STATS.renders == renders + 1
        path = tmp_path / "kernels" / f"{kern._compiled.source.key}.py"
        assert path.read_text() == kern.ir("lower-triton")
        assert [p.name for p in (tmp_path / "kernels").iterdir()] == [path.name]  # no temporary left
        cache.clear_memory()  # as a new process would start
        STD.local(left=2, right=3)
        assert cache.STATS.renders == renders + 1 and cache.STATS.disk_hits == disk_hits + 1
    finally:
        cache.clear_memory()


def test_new_input_values_and_lengths_do_not_recompile() -> None:
    from attnc.runtime import cache

    q, k, v = qkv(2, 2, 2, 40, 40, 16)
    DOCUMENT(q, k, v, **documents(2, 2, 40, 40))
    jit = cache.module(DOCUMENT._compiled.source, DOCUMENT._forward.last_backend or "").attnc_fwd
    before = (cache.STATS.renders, cache.STATS.module_loads, dict(getattr(jit, "device_caches", {})))
    other = {"doc": torch.zeros(2, 40, dtype=torch.int32, device=DEVICE)}
    check(DOCUMENT, q, k, v, **other)
    q, k, v = qkv(2, 2, 2, 57, 57, 16)  # a new length
    check(DOCUMENT, q, k, v, **documents(2, 2, 57, 57))
    after = (cache.STATS.renders, cache.STATS.module_loads, dict(getattr(jit, "device_caches", {})))
    assert after[:2] == before[:2]
    if ON_GPU:  # Triton compiled no new binary
        assert {d: len(c[0]) for d, c in after[2].items()} == {d: len(c[0]) for d, c in before[2].items()}


# ---- argument checking -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v: (q.to(torch.int32), k, v), "q must be a floating-point tensor"),
        (
            lambda q, k, v: (q.to(torch.float8_e4m3fn), k, v),
            "q must be float16, bfloat16, float32 or float64",
        ),
        (lambda q, k, v: (q.double(), k, v), "k must have q's dtype float64, got float32"),
        (lambda q, k, v: (q, k.half(), v), "k must have q's dtype float32, got float16"),
        (lambda q, k, v: (q[0], k, v), "q must be a 4-D tensor"),
        (lambda q, k, v: (q, k[:, :, :, :8], v), "q and k must have one head dim"),
        (lambda q, k, v: (q, k[:, :1], v), "k and v must have one [H, L]"),
        (lambda q, k, v: (q[:, :3], k, v), "query heads (3) must be a multiple of key/value heads (2)"),
        (lambda q, k, v: (q, k[:1], v), "q, k and v must have one batch size"),
    ],
)
def test_bad_tensors_are_named(change: Callable, message: str) -> None:
    q, k, v = qkv(2, 4, 2, 8, 8, 16)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        STD.causal()(*change(q, k, v))


def test_head_dim_limit_and_keyword_checks() -> None:
    q, k, v = qkv(1, 1, 1, 4, 4, 16)
    with pytest.raises(InputError, match="the head dim of v must be 1 to 256, got 300"):
        STD.causal()(q, k, torch.zeros(1, 1, 4, 300, device=DEVICE))
    with pytest.raises(InputError, match="scale must be a real number, got True"):
        STD.causal()(q, k, v, scale=True)
    with pytest.raises(InputError, match="return_lse must be a bool"):
        STD.causal()(q, k, v, return_lse=1)


def test_bad_inputs_point_at_their_declaration() -> None:
    q, k, v = qkv(2, 1, 1, 8, 8, 16)
    with pytest.raises(InputError, match="input 'doc' was not given") as missing:
        DOCUMENT(q, k, v)
    assert "document_causal.attn:6:11:" in str(missing.value)
    with pytest.raises(InputError, match="input 'doc' must be int32, got int64"):
        DOCUMENT(q, k, v, doc=torch.zeros(2, 8, dtype=torch.int64, device=DEVICE))
    with pytest.raises(InputError, match=r"input 'doc' must have shape \[2, 8\], got \[2, 9\]"):
        DOCUMENT(q, k, v, doc=torch.zeros(2, 9, dtype=torch.int32, device=DEVICE))
    with pytest.raises(InputError, match="has no input 'docs'"):
        DOCUMENT(q, k, v, docs=torch.zeros(2, 8, dtype=torch.int32, device=DEVICE))
