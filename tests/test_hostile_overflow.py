"""Integer overflow is impossible by construction (issue 15, rows 3, 6, 14 and 29 of the reliability
probe).

Every evaluator of a pattern (the oracle, the plans, the kernels) computes ints in int64, where an
overflow wraps silently. `value_ranges` bounds every int value for every launch (lengths up to 2**30):
a program whose own values can leave int64, with its parameters, gets a located `AttnTypeError`
when the kernel is made; a rewrite (`canonicalize`, `fuse`, the plans' `separate_axes`, the tile
analyses) is not made where its result could leave int64, so such patterns stay correct.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import attnc
from attnc.errors import AttnTypeError, InputError, ParameterError
from attnc.runtime import plan as plan_module
from attnc.testing import compare, compare_gradients, tile_problems

STD = attnc.stdlib()
# The stdlib's windows are runtime parameters, which lie in [-2**30, 2**30]; the int64 extremes are for
# static ones, so the stdlib patterns are wrapped with their parameters static.
STATIC = attnc.loads("""
pattern sliding_window_static(static window: int) { mask = sliding_window(window) }
pattern local_static(static left: int, static right: int) { mask = local(left, right) }
pattern dilated_static(static window: int, static dilation: int) { mask = dilated(window, dilation) }
""")
MAX = sys.maxsize  # 2**63 - 1
L = 40


def _qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, L, 16, generator=g) for _ in range(3))
    return q, k, v


def assert_exact(kern: attnc.Kernel, expected_mask: torch.Tensor | None = None) -> None:
    """The kernel agrees with the oracle, and block_map and plans with the dense mask."""
    q, k, v = _qkv()
    out, lse = kern(q, k, v, return_lse=True)
    comparison = compare(kern, out, lse, q, k, v)
    assert comparison.ok, comparison.describe()
    assert tile_problems(kern, L, L, (16, 16)) == []
    if expected_mask is not None:
        assert torch.equal(kern.mask(L, L), expected_mask)


def causal_mask() -> torch.Tensor:
    return STD.causal().mask(L, L)


# ---- row 3: rewrites that would overflow are not made ---------------------------------------------------


def test_sliding_window_of_the_largest_window_is_causal_in_kernel_plan_and_block_map() -> None:
    assert_exact(STATIC.sliding_window_static(window=MAX), causal_mask())


def test_local_band_reaching_the_int64_limit_to_the_left_is_exact() -> None:
    assert_exact(STATIC.local_static(left=MAX, right=0), causal_mask())


@pytest.mark.parametrize(("window", "dilation"), [(MAX, 1), (1, MAX)])
def test_dilated_window_at_the_int64_limit_is_exact(window: int, dilation: int) -> None:
    assert_exact(STATIC.dilated_static(window, dilation))


def test_window_below_int64_min_keeps_its_comparison_and_masks_everything() -> None:
    # `q - kv <= w - 1` would need a constant below int64, and solving for kv one of `q - w`: kept as `<`.
    kern = attnc.loads("pattern p(static w: int) { mask = q - kv < w }").p(w=-(2**63))
    assert_exact(kern, torch.zeros(1, 1, L, L, dtype=torch.bool))


# ---- rows 3 and 14: programs whose own values leave int64 get a located error ----------------------------


OVERFLOWING = [
    ("local(0, MAX)", lambda: STATIC.local_static(0, MAX), "q + right"),
    ("local(MAX, MAX)", lambda: STATIC.local_static(MAX, MAX), "q + right"),
    (
        "neighborhood_1d dilation MAX",
        lambda: STD.neighborhood_1d(kernel=3, dilation=MAX),
        "n - i % dilation + dilation",
    ),
    ("q * 2**62", lambda: attnc.loads("pattern p { mask = q * 4611686018427387904 >= 0 }").p(), "q * 46"),
    ("kv + MAX", lambda: attnc.loads("pattern p { mask = kv + 9223372036854775807 > q }").p(), "kv + 92"),
    (
        "(w - 1 + q) // -1",
        lambda: attnc.loads("pattern p(static w: int) { mask = (w - 1 + q) // -1 > kv }").p(w=-(2**63) + 1),
        "w - 1 + q) // -1",
    ),
    (
        "q * 2**62 * 2",
        lambda: attnc.loads("pattern p { mask = q * 4611686018427387904 * 2 >= kv }").p(),
        "q * 46",
    ),
    (
        "(q - MAX - 1) % 5",  # the kernels' floor division takes magnitudes: |-2**63| is outside int64
        lambda: attnc.loads("pattern p { mask = (q - 9223372036854775807 - 1) % 5 == kv }").p(),
        "q - 9223372036854775807 - 1) % 5",
    ),
    (
        "abs(q - MAX - 1)",
        lambda: attnc.loads("pattern p { mask = abs(q - 9223372036854775807 - 1) > kv }").p(),
        "abs(",
    ),
]


@pytest.mark.parametrize(("make", "excerpt"), [c[1:] for c in OVERFLOWING], ids=[c[0] for c in OVERFLOWING])
def test_a_program_whose_values_leave_int64_gets_a_located_error(make, excerpt: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AttnTypeError, match=r"integer overflow: this .* does not fit in 64 bits") as info:
        make()
    loc = info.value.loc
    assert loc is not None
    line = loc.file.line(loc.line)
    assert line[loc.col - 1 :].startswith(excerpt), (line, loc.col)


def test_the_overflow_error_names_the_parameters() -> None:
    with pytest.raises(AttnTypeError, match=r"parameters left=0, right=9223372036854775807\)"):
        STATIC.local_static(0, MAX)


def test_neighborhood_with_the_largest_kernel_is_exact() -> None:
    # clamp(i - kernel // 2, 0, n - kernel) + kernel stays inside int64; the canonical forms must too.
    assert_exact(STD.neighborhood_1d(kernel=MAX))


def test_float_parameter_beyond_any_float_is_a_parameter_error() -> None:
    pattern = attnc.loads("pattern p(w: float) { score = s * w }").p
    with pytest.raises(
        ParameterError, match=r"parameter 'w' of pattern 'p' is float, got int 1000.*beyond any"
    ):
        pattern(w=10**400)


# ---- row 6: float -> int conversions saturate, identically everywhere -----------------------------------


def test_ceil_of_a_float_beyond_int64_saturates_in_oracle_and_kernel() -> None:
    kern = attnc.loads("pattern p { mask = ceil(q * 1e19) % 3 == kv % 3 }").p()
    top = (2**63 - 1) % 3  # ceil(q * 1e19) saturates at 2**63 - 1 for q >= 1
    expected = torch.tensor([[(0 if i == 0 else top) == j % 3 for j in range(L)] for i in range(L)])
    assert_exact(kern, expected.reshape(1, 1, L, L))


def test_floor_of_nan_is_zero_and_of_minus_infinity_saturates() -> None:
    kern = attnc.loads("pattern p { mask = floor(log(q - 1.0)) % 5 == kv % 5 }").p()
    # q = 0: log(-1) is NaN -> 0; q = 1: log(0) = -inf -> -(2**63 - 1), the end of the saturated range.
    row = [0, -(2**63 - 1)] + [math.floor(math.log(i - 1.0)) for i in range(2, L)]
    expected = torch.tensor([[row[i] % 5 == j % 5 for j in range(L)] for i in range(L)])
    assert_exact(kern, expected.reshape(1, 1, L, L))


def test_floor_of_a_bounded_float_is_bounded_not_an_overflow() -> None:
    source = "pattern p { mask = floor(log2(q + 1.0)) - floor(log2(kv + 1.0)) <= 1 and kv <= q }"
    assert_exact(attnc.loads(source).p())


# ---- sizes the analysis assumes --------------------------------------------------------------------------


def test_lengths_beyond_the_analysed_limit_are_refused_by_the_oracle() -> None:
    with pytest.raises(InputError, match=r"kv_len must be at most 1073741824 \(2\*\*30\), got 2147483648"):
        STD.causal().mask(1, 2**31)


def test_an_analytic_plan_beyond_the_analysed_limit_is_made_but_not_evaluated() -> None:
    plan = STD.causal().plan(2**40, 2**40)
    with pytest.raises(InputError, match="q_len must be at most 1073741824"):
        plan.block_map()


# ---- row 29: metadata plans are indexed in int32, checked ---------------------------------------------


def test_metadata_with_more_tiles_than_int32_indexes_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = attnc.loads("pattern p { input doc: int32[KV_LEN]\n mask = doc[q] == doc[kv] }").p()
    ids = torch.zeros(64, dtype=torch.int32)
    assert doc.plan(64, 64, block=(16, 16), doc=ids).kv_tiles is not None  # 16 tiles: fine
    monkeypatch.setattr(plan_module, "OFFSET_LIMIT", 15)
    with pytest.raises(InputError, match=r"has 16 tiles \(1 x 1 x 4 x 4\), more than the 15"):
        doc.plan(64, 64, block=(16, 16), doc=ids)


# ---- the backward's derivatives are canonicalized under the same guard ------------------------------


@pytest.mark.parametrize(
    "condition",
    [
        # `a <= b` must not become `a - b >= 0`: the difference of these loads leaves int64
        "x[kv] * 4294967296 <= x[kv + 1] * 4294967295",
        # the constant must not be moved across: `row_0 <= x[kv] - 2**63 - 1` cannot be computed
        "x[q] - x[kv] < -9223372036854775807 - 1",
    ],
)
def test_score_derivatives_keep_comparisons_that_would_overflow(condition: str) -> None:
    kern = attnc.loads(
        f"pattern p {{\n    input x: int32[KV_LEN]\n    score = where({condition}, s, s * 2.0)\n}}\n"
    ).p()
    x = torch.tensor([2**31 - 1, -(2**31)] * 4, dtype=torch.int32)
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    result = compare_gradients(kern, q, k, v, x=x)
    assert result.ok, result.describe()
