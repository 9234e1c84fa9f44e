"""`fuse` places the mask's index arithmetic by axis (issue 18 item 2): a comparison of a row value
with a key value keeps its constant, its divisor and its clamp into int32 on the row side (computed once
per query tile), bounds on one key value from one side merge into one, and `(q - kv) % m == 0`
compares residues. The kernel's mask must still equal the pattern's at every point: the dense oracle
evaluates both.
"""

from __future__ import annotations

import pytest
import torch

import attnc
import attnc.examples
from attnc import oracle
from attnc.analysis.value_ranges import INT32, ValueRanges
from attnc.codegen.lower import render
from attnc.ir.nodes import Node, Op, PatternIR
from attnc.ir.rewrite import substitute

COMPARISONS = (Op.LE, Op.GE, Op.EQ, Op.NE, Op.LT, Op.GT)

NEIGHBORHOOD = {"height": 6, "width": 7, "kernel_h": 3, "kernel_w": 5}


def _kernel(name: str, **params: object) -> attnc.Kernel:
    return getattr(attnc.stdlib(), name)(**params)


def _fused(kern: attnc.Kernel) -> PatternIR:
    return kern._compiled.entry


def _kernel_mask(pattern: PatternIR) -> Node:
    """The kernel's mask with its hoisted lets substituted back (what one element computes)."""
    assert pattern.kernel is not None and pattern.kernel.mask is not None
    lets = dict(pattern.lets)
    mask = pattern.kernel.mask
    while any(n.op is Op.REF and str(n.attr) in lets for n in mask.walk()):
        mask = substitute(mask, lets)
    return mask


def _comparisons(node: Node) -> list[Node]:
    return [n for n in node.walk() if n.op in COMPARISONS]


@pytest.mark.parametrize(
    ("name", "params", "q_offset"),
    [
        ("sliding_window", {"window": 5}, 0),
        ("sliding_window", {"window": -(2**30)}, 0),  # row side far below int32: clamped
        ("sliding_window", {"window": 2**30}, 3),
        ("prefix_lm", {"prefix": 9}, 0),
        ("dilated", {"window": 3, "dilation": 3}, 2),
        ("neighborhood_2d", NEIGHBORHOOD, 0),
        ("neighborhood_1d", {"kernel": 5, "dilation": 2}, 0),
    ],
)
def test_kernel_mask_equals_the_patterns_at_every_point(name: str, params: dict, q_offset: int) -> None:
    kern = _kernel(name, **params)
    pattern = _fused(kern)
    length = 42
    inputs, runtime = kern._split({})
    env = kern._env(length, length, 1, 1, inputs, runtime, torch.device("cpu"), q_offset=q_offset)
    expected = oracle.mask(pattern, env)
    found = oracle.evaluate(_kernel_mask(pattern), pattern, env)
    assert torch.equal(found.expand_as(expected), expected)


def _longformer() -> attnc.Kernel:
    return attnc.load(attnc.examples.path("longformer.attn")).longformer_global(w=3)


def test_longformer_kernel_mask_equals_the_patterns_at_every_point() -> None:
    kern = _longformer()
    pattern = _fused(kern)
    is_global = torch.zeros(2, 42, dtype=torch.bool)
    is_global[0, [0, 7, 30]] = True
    is_global[1, [41]] = True
    inputs, runtime = kern._split({"is_global": is_global})
    env = kern._env(42, 42, 2, 1, inputs, runtime, torch.device("cpu"))
    expected = oracle.mask(pattern, env)
    found = oracle.evaluate(_kernel_mask(pattern), pattern, env)
    assert torch.equal(found.expand_as(expected), expected)


def test_a_row_test_ored_with_a_window_moves_into_its_row_bounds() -> None:
    # `window or is_global[b, q] or is_global[b, kv]`: the row's test widens the row bounds, once per
    # query tile, and is not or'ed per element; the key's test stays an `or` with its column (cheaper
    # per element than a select of each bound's key value per column, see `fuse`).
    mask = _kernel_mask(_fused(_longformer()))
    assert mask.op is Op.OR
    assert not any("kv" not in a.free for a in mask.args), mask.args
    assert any("q" not in a.free and a.op is Op.LOAD for a in mask.args), mask.args
    window = next(a for a in mask.args if a.op is Op.AND)
    assert [c.args[0].op for c in window.args] == [Op.WHERE, Op.WHERE], window


ROW_TESTS = """
pattern one_bound_or_row(w: int = 2) {
    input flag: bool[BATCH, Q_LEN]
    mask = kv <= q - w or flag[b, q]
}
pattern window_or_rows(w: int = 2) {
    input flag: bool[BATCH, Q_LEN]
    input other: bool[BATCH, KV_LEN]
    mask = abs(q - kv) <= w or flag[b, q] or (q % 5 == 0) or other[b, kv]
}
"""


@pytest.mark.parametrize("name", ["one_bound_or_row", "window_or_rows"])
def test_row_tests_in_the_bounds_keep_the_mask(name: str) -> None:
    kern = getattr(attnc.loads(ROW_TESTS), name)()
    pattern = _fused(kern)
    mask = _kernel_mask(pattern)
    parts = mask.args if mask.op is Op.OR else (mask,)
    assert not any("kv" not in a.free for a in parts), mask  # no row test or'ed per element
    generator = torch.Generator().manual_seed(3)
    given = {
        "flag": torch.rand(2, 29, generator=generator) < 0.2,
        "other": torch.rand(2, 31, generator=generator) < 0.2,
    }
    inputs, runtime = kern._split({k: v for k, v in given.items() if k in {d.name for d in pattern.inputs}})
    env = kern._env(29, 31, 2, 1, inputs, runtime, torch.device("cpu"))
    expected = oracle.mask(pattern, env)
    found = oracle.evaluate(mask, pattern, env)
    assert torch.equal(found.expand_as(expected), expected)
    assert expected.any() and not expected.all()


def test_neighbourhood_window_is_one_comparison_per_bound() -> None:
    # Each axis's border-shifted window `start <= j < start + k` (with `j >= n - k` and `j <= k - 1`
    # at the borders, and the first axis's `kv // width`) is two comparisons of a key value with row
    # bounds: four per element, no column tests, no division of the key.
    mask = _kernel_mask(_fused(_kernel("neighborhood_2d", **NEIGHBORHOOD)))
    compared = _comparisons(mask)
    assert len(compared) == 4, compared
    assert not any(n.op in (Op.FLOORDIV, Op.UDIV) and "kv" in n.free for n in mask.walk())


def test_prefix_lm_bounds_merge_into_one_comparison() -> None:
    # `kv < prefix or kv <= q`: two upper bounds of kv, one comparison with max(prefix - 1, q).
    assert len(_comparisons(_kernel_mask(_fused(_kernel("prefix_lm", prefix=9))))) == 1


def test_dilation_compares_residues_of_each_axis() -> None:
    # `(q - kv) % 3 == 0` as `q % 3 == kv % 3`: no difference of q and kv is computed per element.
    mask = _kernel_mask(_fused(_kernel("dilated", window=3, dilation=3)))
    assert not any(n.op in (Op.MOD, Op.UMOD) and {"q", "kv"} <= n.free for n in mask.walk())


def test_runtime_window_is_compared_in_int32() -> None:
    # q - window leaves int32 for some windows; clamped into the keys' range it does not, and every
    # comparison of the kernel's mask has int32 operands.
    pattern = _fused(_kernel("sliding_window", window=5))
    ranges = ValueRanges(pattern, dict(pattern.lets))
    for n in _comparisons(pattern.kernel.mask):
        for a in n.args:
            lo, hi = ranges.of(a)
            assert INT32[0] <= lo and hi <= INT32[1], (n, a, (lo, hi))


def test_runtime_window_kernel_compares_keys_without_widening_them() -> None:
    source = render(_kernel("sliding_window", window=5)._compiled.spec)
    assert "tl.cast(kv_idx, tl.int64)" not in source
    assert "tl.cast(tl.minimum(" in source  # the row bound, clamped in int64 and narrowed


def test_float_bounds_of_one_key_are_neither_merged_nor_moved() -> None:
    # Only int bounds merge into min / max (a float bound may be NaN: `log(q - 5.0)` for q < 5, which
    # `min` propagates and `<=` does not) or take a key test into their key values (value ranges bound
    # ints): each mask compiles, and the kernel's equals the pattern's at every point.
    source = """
    pattern merged { mask = log(q - 5.0) <= kv * 1.0 and q * 0.5 <= kv * 1.0 }
    pattern moved {
        input flag: bool[KV_LEN]
        mask = q * 1.0 <= kv * 0.5 or flag[kv]
    }
    """
    module = attnc.loads(source)
    flag = torch.arange(30) % 7 == 3
    for kern, inputs in ((module.merged(), {}), (module.moved(), {"flag": flag})):
        pattern = _fused(kern)
        env = kern._env(30, 30, 1, 1, *kern._split(inputs), torch.device("cpu"))
        expected = oracle.mask(pattern, env)
        found = oracle.evaluate(_kernel_mask(pattern), pattern, env)
        assert torch.equal(found.expand_as(expected), expected)


@pytest.mark.parametrize(
    "mask",
    [
        "doc[kv] // 5 < kv",
        "(doc[q] - kv) % 5 == 0",  # `doc[q] % 5 == kv % 5`: the residue of an int32 input alone
    ],
)
def test_kernel_divides_an_int32_input_at_its_least_value_exactly(mask: str) -> None:
    # The kernel's floor division divides magnitudes, and |-2**31| is no int32: the kernel must still
    # give the oracle's mask where an int32 input holds -2**31.
    kern = attnc.loads(f"pattern p {{\n input doc: int32[40]\n mask = {mask}\n}}").p()
    doc = torch.tensor([-(2**31), 2**31 - 1, 7, -(2**31) + 3] * 10, dtype=torch.int32)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 40, 16) for _ in range(3))
    out = kern(q, k, v, doc=doc)
    expected = kern.reference(q.double(), k.double(), v.double(), doc=doc)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "source",
    [
        "pattern p { mask = min(log(q - 5.0), kv * 1.0) <= 3.0 }",
        "pattern p(n: int = 3) { mask = min(i in 0..n: log(q - 5.0 + i)) <= kv * 1.0 }",  # a loop
    ],
)
def test_kernel_float_min_of_a_nan_is_nan(source: str) -> None:
    # `log(q - 5.0)` is NaN for q < 5, and so is a min or max of it (the language, the oracle);
    # Triton's own minimum returns the other operand.
    kern = attnc.loads(source).p()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 40, 16) for _ in range(3))
    expected = kern.reference(q.double(), k.double(), v.double())
    torch.testing.assert_close(kern(q, k, v).double(), expected, atol=2e-5, rtol=2e-5)


def test_row_tests_stay_an_or_where_the_key_side_is_an_int64_input() -> None:
    # The window's bounds on an int64 input's values take no constant from its range, which is the
    # caller's contract (±2**62), not a bound of every launch: values past it keep the pattern's mask.
    kern = attnc.loads(
        """
pattern positions(w: int = 4) {
    input qpos: int64[BATCH, Q_LEN]
    input kpos: int64[BATCH, KV_LEN]
    mask = (qpos[b, q] - w <= kpos[b, kv] and kpos[b, kv] <= qpos[b, q]) or q < 3
}
"""
    ).positions()
    pattern = _fused(kern)
    positions = (torch.arange(20) + 2**62 + 100).reshape(1, 20)
    inputs, runtime = kern._split({"qpos": positions, "kpos": positions})
    env = kern._env(20, 20, 1, 1, inputs, runtime, torch.device("cpu"))
    expected = oracle.mask(pattern, env)
    found = oracle.evaluate(_kernel_mask(pattern), pattern, env)
    assert torch.equal(found.expand_as(expected), expected)
    assert expected[..., :3, :].all()
