"""The standard library's patterns mean exactly what DESIGN.md section 2 says.

Every expected mask here is built independently of attnc — with numpy broadcasting for the one-line
definitions and with an explicit port of NATTEN's naive C++ reference (`get_window_start`) for the
neighbourhoods — and compared with `attnc.stdlib().NAME(**params).mask(q_len, kv_len)`.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import attnc

STD = attnc.stdlib()

# (q_len, kv_len): square, more keys than queries, more queries than keys, tiny, and a single row.
LENGTHS = [(8, 8), (5, 11), (11, 5), (1, 1), (1, 7), (13, 13)]


def grid(q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(q_len)[:, None], np.arange(kv_len)[None, :]


def attnc_mask(kern: attnc.Kernel, q_len: int, kv_len: int) -> np.ndarray:
    m = kern.mask(q_len, kv_len)
    assert tuple(m.shape) == (1, 1, q_len, kv_len)
    return m[0, 0].numpy()


def expect_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    expected = np.broadcast_to(expected, actual.shape)
    assert actual.dtype == np.bool_
    bad = np.argwhere(actual != expected)
    assert bad.size == 0, f"{len(bad)} mismatches, first (q, kv) = {bad[:5].tolist()}"


# ---- the one-line definitions ------------------------------------------------------------------------


@pytest.mark.parametrize(("q_len", "kv_len"), LENGTHS)
def test_full_allows_every_key(q_len: int, kv_len: int) -> None:
    expect_equal(attnc_mask(STD.full(), q_len, kv_len), np.ones((q_len, kv_len), dtype=bool))


@pytest.mark.parametrize(("q_len", "kv_len"), LENGTHS)
def test_causal_is_top_left_aligned(q_len: int, kv_len: int) -> None:
    q, kv = grid(q_len, kv_len)
    expect_equal(attnc_mask(STD.causal(), q_len, kv_len), kv <= q)


@pytest.mark.parametrize(("q_len", "kv_len"), LENGTHS)
def test_causal_bottom_right_aligns_last_query_with_last_key(q_len: int, kv_len: int) -> None:
    q, kv = grid(q_len, kv_len)
    expected = kv <= q + kv_len - q_len
    expect_equal(attnc_mask(STD.causal_bottom_right(), q_len, kv_len), expected)
    if q_len <= kv_len:  # the last query sees every key
        assert attnc_mask(STD.causal_bottom_right(), q_len, kv_len)[-1].all()


@pytest.mark.parametrize(("q_len", "kv_len"), LENGTHS)
@pytest.mark.parametrize("window", [1, 2, 3, 5, 20])
def test_sliding_window_sees_window_keys_including_itself(q_len: int, kv_len: int, window: int) -> None:
    expected_shape = (q_len, kv_len)
    expected = np.zeros(expected_shape, dtype=bool)
    for i in range(q_len):
        for j in range(kv_len):
            expected[i, j] = i - window + 1 <= j <= i
    expect_equal(attnc_mask(STD.sliding_window(window=window), q_len, kv_len), expected)


def test_sliding_window_row_counts_are_window() -> None:
    m = attnc_mask(STD.sliding_window(window=4), 12, 12)
    assert m.sum(axis=1).tolist() == [min(i + 1, 4) for i in range(12)]


@pytest.mark.parametrize(("q_len", "kv_len"), LENGTHS)
@pytest.mark.parametrize(("left", "right"), [(0, 0), (2, 0), (0, 2), (1, 3), (4, 1), (30, 30)])
def test_local_is_inclusive_band(q_len: int, kv_len: int, left: int, right: int) -> None:
    q, kv = grid(q_len, kv_len)
    expected = (q - kv <= left) & (kv - q <= right)
    expect_equal(attnc_mask(STD.local(left=left, right=right), q_len, kv_len), expected)


@pytest.mark.parametrize(("q_len", "kv_len"), LENGTHS)
@pytest.mark.parametrize("count", [0, 1, 3, 40])
def test_sinks_are_first_count_keys(q_len: int, kv_len: int, count: int) -> None:
    q, kv = grid(q_len, kv_len)
    expect_equal(attnc_mask(STD.sinks(count=count), q_len, kv_len), (kv < count) & (q >= 0))


@pytest.mark.parametrize(("q_len", "kv_len"), LENGTHS)
@pytest.mark.parametrize("prefix", [0, 1, 3, 6, 40])
def test_prefix_lm_bidirectional_prefix_then_causal(q_len: int, kv_len: int, prefix: int) -> None:
    q, kv = grid(q_len, kv_len)
    expect_equal(attnc_mask(STD.prefix_lm(prefix=prefix), q_len, kv_len), (kv < prefix) | (kv <= q))


@pytest.mark.parametrize(("q_len", "kv_len"), LENGTHS)
@pytest.mark.parametrize(("window", "dilation"), [(0, 1), (1, 1), (2, 1), (1, 2), (2, 2), (2, 3), (3, 4)])
def test_dilated_keeps_multiples_of_dilation_within_window(
    q_len: int, kv_len: int, window: int, dilation: int
) -> None:
    expected = np.zeros((q_len, kv_len), dtype=bool)
    for i in range(q_len):
        for step in range(-window, window + 1):
            j = i + step * dilation
            if 0 <= j < kv_len:
                expected[i, j] = True
    expect_equal(attnc_mask(STD.dilated(window=window, dilation=dilation), q_len, kv_len), expected)


def test_stdlib_patterns_accept_positional_parameters() -> None:
    q, kv = grid(9, 9)
    expect_equal(attnc_mask(STD.local(3, 1), 9, 9), (q - kv <= 3) & (kv - q <= 1))
    expect_equal(attnc_mask(STD.dilated(2, 3), 9, 9), attnc_mask(STD.dilated(window=2, dilation=3), 9, 9))


def test_stdlib_pattern_referenced_from_a_user_pattern_is_its_mask() -> None:
    mod = attnc.loads(
        "pattern p { mask = sliding_window(window=3) or sinks(2) }\n"
        "pattern r { mask = local(1, 2) and not causal }\n"
    )
    q, kv = grid(10, 12)
    expect_equal(attnc_mask(mod.p(), 10, 12), ((kv <= q) & (q - kv < 3)) | (kv < 2))
    expect_equal(attnc_mask(mod.r(), 10, 12), (q - kv <= 1) & (kv - q <= 2) & ~(kv <= q))


# ---- NATTEN-style neighbourhoods: an independent port of NATTEN's naive reference -------------------


def natten_window_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    """NATTEN `get_window_start` (naive C++ reference, non-causal)."""
    ns = kernel_size // 2
    if dilation <= 1:
        return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
    ni = index - ns * dilation
    if ni < 0:
        return index % dilation
    if index + ns * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dilation
        return a + imodd - kernel_size * dilation
    return ni


def natten_axis(length: int, kernel_size: int, dilation: int, causal: bool) -> np.ndarray:
    """[length, length] bool: may coordinate i see coordinate j along one axis."""
    allowed = np.zeros((length, length), dtype=bool)
    for i in range(length):
        if causal:
            for j in range(length):
                if j % dilation == i % dilation and i - (kernel_size - 1) * dilation <= j <= i:
                    allowed[i, j] = True
        else:
            start = natten_window_start(i, length, kernel_size, dilation)
            for t in range(kernel_size):
                j = start + t * dilation
                assert 0 <= j < length, (i, length, kernel_size, dilation)
                allowed[i, j] = True
    return allowed


def natten_mask(
    extents: tuple[int, ...], kernels: tuple[int, ...], dilations: tuple[int, ...], causal: tuple[bool, ...]
) -> np.ndarray:
    """The neighbourhood over a row-major grid of tokens: the conjunction of every axis."""
    axes = [natten_axis(n, k, d, c) for n, k, d, c in zip(extents, kernels, dilations, causal, strict=True)]
    coords = list(itertools.product(*(range(n) for n in extents)))  # row-major order
    total = len(coords)
    result = np.ones((total, total), dtype=bool)
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            result[qi, ki] = all(axis[a, b] for axis, a, b in zip(axes, qc, kc, strict=True))
    return result


def test_natten_reference_port_sanity() -> None:
    # Known values of NATTEN's window start: a border-clamped window of `kernel` keys.
    assert [natten_window_start(i, 7, 3, 1) for i in range(7)] == [0, 0, 1, 2, 3, 4, 4]
    # Dilation 2, length 7: groups {0,2,4,6} and {1,3,5}; windows of 3 within each group.
    assert [natten_window_start(i, 7, 3, 2) for i in range(7)] == [0, 1, 0, 1, 2, 1, 2]
    assert natten_axis(7, 3, 2, False).sum(axis=1).tolist() == [3] * 7


def _configs_1d() -> list[tuple[int, int, int]]:
    configs = []
    for n in (3, 5, 6, 7, 8, 10, 11):
        for dilation in (1, 2, 3):
            for kernel in (1, 3, 5, 7):
                if kernel * dilation <= n:
                    configs.append((n, kernel, dilation))
    return configs


@pytest.mark.parametrize(("n", "kernel", "dilation"), _configs_1d())
def test_neighborhood_1d_matches_natten(n: int, kernel: int, dilation: int) -> None:
    kern = STD.neighborhood_1d(kernel=kernel, dilation=dilation)
    expect_equal(attnc_mask(kern, n, n), natten_mask((n,), (kernel,), (dilation,), (False,)))


@pytest.mark.parametrize(("n", "kernel", "dilation"), _configs_1d())
def test_neighborhood_1d_causal_matches_natten(n: int, kernel: int, dilation: int) -> None:
    kern = STD.neighborhood_1d(kernel=kernel, dilation=dilation, is_causal=True)
    expect_equal(attnc_mask(kern, n, n), natten_mask((n,), (kernel,), (dilation,), (True,)))


def test_neighborhood_1d_defaults_are_dilation_1_non_causal() -> None:
    expect_equal(attnc_mask(STD.neighborhood_1d(kernel=5), 9, 9), natten_mask((9,), (5,), (1,), (False,)))


# (height, width, kernel_h, kernel_w, dilation_h, dilation_w, causal_h, causal_w): non-square extents.
CONFIGS_2D = [
    (4, 6, 3, 3, 1, 1, False, False),
    (5, 3, 3, 1, 1, 1, False, False),
    (3, 7, 1, 5, 1, 1, False, False),
    (6, 5, 3, 3, 2, 1, False, False),
    (5, 7, 1, 3, 1, 2, False, False),
    (7, 6, 3, 1, 2, 3, False, False),
    (6, 7, 3, 3, 2, 2, False, False),
    (9, 4, 3, 3, 3, 1, False, False),
    (4, 6, 3, 3, 1, 1, True, False),
    (4, 6, 3, 3, 1, 1, False, True),
    (5, 6, 3, 3, 1, 2, True, True),
    (7, 5, 3, 5, 2, 1, True, False),
    (6, 7, 5, 3, 1, 2, False, True),
]


@pytest.mark.parametrize(("height", "width", "kh", "kw", "dh", "dw", "ch", "cw"), CONFIGS_2D)
def test_neighborhood_2d_matches_natten(
    height: int, width: int, kh: int, kw: int, dh: int, dw: int, ch: bool, cw: bool
) -> None:
    kern = STD.neighborhood_2d(
        height=height, width=width, kernel_h=kh, kernel_w=kw,
        dilation_h=dh, dilation_w=dw, causal_h=ch, causal_w=cw,
    )  # fmt: skip
    n = height * width
    expect_equal(attnc_mask(kern, n, n), natten_mask((height, width), (kh, kw), (dh, dw), (ch, cw)))


# (depth, height, width, kernels, dilations, causal): non-cubic extents.
CONFIGS_3D = [
    ((2, 3, 4), (1, 3, 3), (1, 1, 1), (False, False, False)),
    ((3, 4, 5), (3, 3, 3), (1, 1, 1), (False, False, False)),
    ((4, 3, 5), (3, 1, 5), (1, 1, 1), (False, False, False)),
    ((4, 5, 3), (1, 3, 3), (2, 1, 1), (False, False, False)),
    ((3, 6, 4), (3, 3, 1), (1, 2, 3), (False, False, False)),
    ((5, 4, 7), (1, 1, 3), (3, 2, 2), (False, False, False)),
    ((3, 4, 5), (3, 3, 3), (1, 1, 1), (True, False, False)),
    ((3, 4, 5), (3, 3, 3), (1, 1, 1), (False, True, True)),
    ((4, 3, 6), (3, 3, 3), (1, 1, 2), (True, True, True)),
    ((5, 4, 3), (3, 1, 3), (1, 2, 1), (False, True, False)),
]


@pytest.mark.parametrize(("extents", "kernels", "dilations", "causal"), CONFIGS_3D)
def test_neighborhood_3d_matches_natten(
    extents: tuple[int, int, int],
    kernels: tuple[int, int, int],
    dilations: tuple[int, int, int],
    causal: tuple[bool, bool, bool],
) -> None:
    (d, h, w), (kd, kh, kw), (dd, dh, dw), (cd, ch, cw) = extents, kernels, dilations, causal
    kern = STD.neighborhood_3d(
        depth=d, height=h, width=w, kernel_d=kd, kernel_h=kh, kernel_w=kw,
        dilation_d=dd, dilation_h=dh, dilation_w=dw, causal_d=cd, causal_h=ch, causal_w=cw,
    )  # fmt: skip
    n = d * h * w
    expect_equal(attnc_mask(kern, n, n), natten_mask(extents, kernels, dilations, causal))


# ---- PATTERNS.md cross-checks ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 5, 9])
def test_neighborhood_1d_with_kernel_equal_to_extent_is_full(n: int) -> None:
    assert attnc_mask(STD.neighborhood_1d(kernel=n), n, n).all()


@pytest.mark.parametrize(("height", "width"), [(3, 5), (5, 3), (1, 7)])
def test_neighborhood_2d_with_kernel_equal_to_extent_is_full(height: int, width: int) -> None:
    kern = STD.neighborhood_2d(height=height, width=width, kernel_h=height, kernel_w=width)
    n = height * width
    assert attnc_mask(kern, n, n).all()


def test_neighborhood_3d_with_kernel_equal_to_extent_is_full() -> None:
    kern = STD.neighborhood_3d(depth=3, height=1, width=5, kernel_d=3, kernel_h=1, kernel_w=5)
    assert attnc_mask(kern, 15, 15).all()


@pytest.mark.parametrize(("n", "dilation"), [(6, 2), (9, 3), (8, 4)])
def test_neighborhood_1d_with_kernel_times_dilation_equal_to_extent_is_the_dilation_group(
    n: int, dilation: int
) -> None:
    q, kv = grid(n, n)
    kern = STD.neighborhood_1d(kernel=n // dilation, dilation=dilation)
    expect_equal(attnc_mask(kern, n, n), q % dilation == kv % dilation)


@pytest.mark.parametrize(("q_len", "kv_len"), LENGTHS)
def test_sliding_window_at_least_sequence_length_is_causal(q_len: int, kv_len: int) -> None:
    for window in (max(q_len, kv_len), max(q_len, kv_len) + 5):
        expect_equal(
            attnc_mask(STD.sliding_window(window=window), q_len, kv_len),
            attnc_mask(STD.causal(), q_len, kv_len),
        )


@pytest.mark.parametrize(("q_len", "kv_len"), LENGTHS)
def test_local_window_at_least_sequence_length_is_full(q_len: int, kv_len: int) -> None:
    w = max(q_len, kv_len)
    assert attnc_mask(STD.local(left=w, right=w), q_len, kv_len).all()
    expect_equal(
        attnc_mask(STD.local(left=w, right=0), q_len, kv_len), attnc_mask(STD.causal(), q_len, kv_len)
    )


def test_causal_bottom_right_equals_causal_when_lengths_match() -> None:
    expect_equal(attnc_mask(STD.causal_bottom_right(), 9, 9), attnc_mask(STD.causal(), 9, 9))


def test_prefix_lm_with_zero_prefix_is_causal() -> None:
    expect_equal(attnc_mask(STD.prefix_lm(prefix=0), 7, 10), attnc_mask(STD.causal(), 7, 10))
