"""Bounded reductions (issue 20, item 2): `sum(i in lo..hi: term)`, `any`, `all`, `max`, `min`, with
constant or parameter bounds. Each is judged against the same reduction written in Python (masks), the
dense oracle (kernels, forward and backward, in the interpreter at tiny shapes), and its own rules:
short constant ranges are unrolled and the rest are loops in the kernel (one kernel for every value of a
runtime bound), an empty range has the documented value, errors are located in the source, tile
classes stay exact, and the fuzzer's program strategies generate reductions and find no mismatch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

import attnc
from attnc.ir.nodes import Op
from attnc.ir.parser import parse_module
from attnc.ir.printer import print_module
from attnc.ir.reduce import UNROLL_LIMIT
from attnc.testing import compare, compare_gradients, fuzz
from attnc.testing.programs import Program, programs

LQ, LKV = 11, 9


def qkv(length: int = 40, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, length, 16, generator=g) for _ in range(3)]


def error_of(source: str, **params: int) -> str:
    with pytest.raises(attnc.AttnError) as caught:
        attnc.loads(source, filename="bad.attn").p(**params)
    return str(caught.value)


def ops_after(kern: attnc.Kernel, stage: str) -> set[Op]:
    return {n.op for root in parse_module(kern.ir(stage)).entry.roots() for n in root.walk()}


# ---- masks against Python ----------------------------------------------------------------------------

MASKS = [
    ("any(i in 0..n: q - kv == 2 * i)", lambda q, kv, r: any(q - kv == 2 * i for i in r)),
    ("all(i in 1..n: (q + i) % 3 != kv % 3)", lambda q, kv, r: all((q + i) % 3 != kv % 3 for i in r if i)),
    ("sum(i in 0..n: (q + i) % 4) > kv", lambda q, kv, r: sum((q + i) % 4 for i in r) > kv),
    ("max(i in 0..n: kv - i * q) >= 0", lambda q, kv, r: max([kv - i * q for i in r], default=0) >= 0),
    ("min(i in 2..n: abs(q - kv - i)) <= 1",
     lambda q, kv, r: min([abs(q - kv - i) for i in r[2:]], default=0) <= 1),
    ("sum(i in 0..n: 0.5 * i) < 1.0 * kv", lambda q, kv, r: sum(0.5 * i for i in r) < kv),
    ("any(i in 0..n: any(j in 0..3: q == kv + i * j))",
     lambda q, kv, r: any(q == kv + i * j for i in r for j in range(3))),
]  # fmt: skip
"""Each mask, and its predicate of q, kv and r = range(n)."""


@pytest.mark.parametrize("n", [3, UNROLL_LIMIT + 5, 0, -2], ids=["unrolled", "loop", "empty", "negative"])
@pytest.mark.parametrize(("expr", "predicate"), MASKS, ids=[m[0] for m in MASKS])
def test_each_reduction_in_a_mask_means_what_python_means(expr: str, predicate, n: int) -> None:
    for static in ("static ", ""):
        kern = attnc.loads(f"pattern p({static}n: int) {{ mask = {expr} }}").p(n=n)
        expected = torch.tensor([[bool(predicate(q, kv, range(n))) for kv in range(LKV)] for q in range(LQ)])
        assert torch.equal(kern.mask(LQ, LKV)[0, 0], expected), static


def test_a_short_constant_range_is_unrolled_and_a_long_one_is_a_loop() -> None:
    source = "pattern p(static n: int, m: int) {{ score = s + sum(i in 0..{}: s * i) }}"
    short = attnc.loads(source.format("n")).p(n=UNROLL_LIMIT, m=1)
    assert Op.REDUCE not in ops_after(short, "bind-params")
    for bound in (f"{UNROLL_LIMIT + 1}", "m"):
        kern = attnc.loads(source.format(bound)).p(n=1, m=30)
        assert Op.REDUCE in ops_after(kern, "fuse")
        assert "for " in kern.ir("lower-triton")


# ---- kernels, forward and backward ---------------------------------------------------------------------

SCORE = """
pattern p({static}n: int) {{
    input w: float32[KV_LEN]
    input z: float32[8]
    mask = any(i in 0..n: kv <= q - i) or all(i in 0..n: kv % (i + 2) == 0)
    score = (s + sum(i in 0..n: z[i] * tanh(s * (i + 1))) + max(j in 0..n + 1: sin(s * j) + w[kv] * j)
        - min(j in 1..n + 2: 0.5 * s * j))
}}
"""


@pytest.mark.parametrize("static", ["static ", ""], ids=["unrolled", "loop"])
def test_reductions_in_kernels_forward_and_backward(static: str) -> None:
    """The kernel against the oracle for sum, max, min, any, all, with the gradients of q, k, v, of the
    input `w` read outside the reduction's variable and (unrolled: each term its own load) of `z`."""
    kern = attnc.loads(SCORE.format(static=static)).p(n=4)
    assert (Op.REDUCE in ops_after(kern, "fuse")) == (static == "")
    q, k, v = qkv()
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(40, generator=g) * 2 - 1).requires_grad_()
    z = (torch.rand(8, generator=g) * 2 - 1).requires_grad_(static != "")
    out, lse = kern(q, k, v, return_lse=True, w=w, z=z)
    assert compare(kern, out, lse, q, k, v, w=w, z=z).ok
    result = compare_gradients(kern, q, k, v, w=w, z=z)
    assert result.ok, result.describe()


def test_an_input_read_at_a_loop_variable_refuses_a_gradient() -> None:
    kern = attnc.loads(SCORE.format(static="")).p(n=4)
    q, k, v = qkv()
    with pytest.raises(attnc.InputError, match="'z' requires grad"):
        kern(q, k, v, w=torch.zeros(40), z=torch.zeros(8, requires_grad=True))


def test_a_runtime_bound_is_one_kernel_for_every_value() -> None:
    module = attnc.loads(SCORE.format(static=""))
    assert module.p(n=2).ir("lower-triton") == module.p(n=7).ir("lower-triton")
    kern = module.p(n=2)
    q, k, v = qkv()
    w, z = torch.rand(40) - 0.5, torch.rand(8) - 0.5
    for n in (2, 7):
        out, lse = kern(q, k, v, return_lse=True, w=w, z=z, n=n)
        assert compare(kern, out, lse, q, k, v, w=w, z=z, n=n).ok, n
    assert not torch.equal(kern(q, k, v, w=w, z=z, n=2), kern(q, k, v, w=w, z=z, n=7))


def test_a_max_with_tied_terms_splits_its_gradient_as_autograd_does() -> None:
    # Every term is s: the max is s, and its derivative 1 however the ties split.
    for static in ("static ", ""):
        source = f"pattern p({static}n: int) {{ score = max(i in 0..n: s * 0.5 + s * 0.5) }}"
        kern = attnc.loads(source).p(n=3)
        result = compare_gradients(kern, *qkv())
        assert result.ok, result.describe()


# ---- empty ranges --------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", ["static ", ""], ids=["unrolled", "loop"])
def test_an_empty_range_gives_0_false_true_and_infinities(static: str) -> None:
    source = f"""
pattern p({static}n: int) {{
    mask = (not any(i in 0..n: true) and all(i in 0..n: false) and sum(i in 0..n: q) == 0
        and max(i in 0..n: q) == 0 and min(i in 0..n: q) == 0 and sum(i in 0..n: 1.5) == 0.0
        and max(i in 0..n: 1.0 * q) == -inf and min(i in 0..n: 1.0 * q) == inf)
    score = where(max(i in 0..n: s) == -inf and min(i in 0..n: s) == inf, s, 0.0)
}}
"""
    for n in (0, -3):
        kern = attnc.loads(source).p(n=n)
        assert bool(kern.mask(LQ, LKV).all()), n
        q, k, v = qkv()
        out, lse = kern(q, k, v, return_lse=True)
        assert compare(kern, out, lse, q, k, v).ok
        dense, _ = attnc.loads("pattern p { }").p().reference(q, k, v, return_lse=True)
        assert torch.allclose(kern.reference(q, k, v), dense)


# ---- errors --------------------------------------------------------------------------------------------

ERRORS = [
    ("mask = any(i in 0..x: q == kv)", "bound must be int, got float", "x"),
    ("mask = any(i in 0..q: q == kv)", "literals and parameters", "q:"),
    ("mask = any(i in 0..KV_LEN: q == kv)", "literals and parameters", "KV_LEN"),
    ("mask = any(i in 0..t[0]: q == kv)", "literals and parameters", "t[0]"),
    ("mask = any(i in 0..d: q == kv)", "literals and parameters", "d:"),
    ("mask = any(i in 0..3: any(j in 0..i: q == kv))", "literals and parameters", "i: q"),
    ("mask = any(n in 0..3: q == kv)", "already declared as a param", "n in"),
    ("mask = any(d in 0..3: q == kv)", "already declared as a let", "d in"),
    ("mask = any(t in 0..3: q == kv)", "already declared as an input", "t in"),
    ("mask = any(kv in 0..3: q == 1)", "built-in name", "kv in"),
    ("mask = any(causal in 0..3: q == kv)", "already defined", "causal"),
    ("mask = any(i in 0..3: any(i in 0..2: q == kv))", "enclosing reduction", "i in 0..2"),
    ("mask = count(i in 0..3: q == kv)", "not a reduction", "count"),
    ("mask = any(i in 0..3: q + i)", "term of 'any' must be bool, got int", "q + i"),
    ("score = sum(i in 0..3: s > 1.0)", "term of 'sum' must be a number, got bool", "s > 1.0"),
]


@pytest.mark.parametrize(("statement", "message", "marked"), ERRORS, ids=[e[1] + ": " + e[2] for e in ERRORS])
def test_wrong_reductions_are_located_errors(statement: str, message: str, marked: str) -> None:
    source = f"""pattern p(n: int = 3, x: float = 1.0) {{
    input t: int32[4]
    let d = 2
    {statement}
}}
"""
    text = error_of(source)
    assert message in text, text
    line = source.splitlines()[3]
    position = line.index(marked) + 1
    assert text.startswith(f"bad.attn:4:{position}:"), text


def test_a_fn_argument_bound_given_a_position_is_a_located_error() -> None:
    source = """fn count_to(m: int) = sum(i in 0..m: i)
pattern p {
    mask = count_to(q) > kv
}
"""
    text = error_of(source)
    assert "reads a position" in text and text.startswith("bad.attn:1:23:"), text


def test_a_sum_that_can_leave_int64_is_an_overflow_error() -> None:
    text = error_of("pattern p(n: int) {\n    mask = sum(i in 0..n: q * kv * i) > 0\n}\n", n=3)
    assert "integer overflow" in text, text


def test_in_stays_a_name_and_floats_keep_their_dots_beside_ranges() -> None:
    # `in` is a name wherever a reduction's `in` cannot be; `0..n` is a range, `1.` and `.5` floats.
    source = "pattern p(static in: int = 3) { mask = any(i in 0..in: 1. * q == .5 * kv + i) }"
    kern = attnc.loads(source).p()
    rows = [[any(q == 0.5 * kv + i for i in range(3)) for kv in range(LKV)] for q in range(LQ)]
    expected = torch.tensor(rows)
    assert torch.equal(kern.mask(LQ, LKV)[0, 0], expected)


# ---- tile classes, IR text ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 40], ids=["unrolled", "loop"])
def test_tile_classes_of_an_any_mask_are_exact(n: int) -> None:
    kern = attnc.loads("pattern p(n: int) { mask = any(i in 0..n: q - kv == 4 * i) or kv < 3 }").p(n=n)
    dense = kern.mask(64, 64)[0, 0]
    tiles = kern.block_map(64, 64, block=(16, 16))[0, 0]
    for i in range(4):
        for j in range(4):
            tile = dense[16 * i : 16 * i + 16, 16 * j : 16 * j + 16]
            expected = 2 if bool(tile.all()) else 1 if bool(tile.any()) else 0
            assert int(tiles[i, j]) == expected, (i, j)
    assert int((tiles == 0).sum()) > 0  # the upper triangle is empty


def test_a_loop_reduction_round_trips_through_the_ir_text() -> None:
    kern = attnc.loads(SCORE.format(static="")).p(n=4)
    for stage in ("inline", "bind-params", "fuse"):
        text = kern.ir(stage)
        assert "reduce @" in text and "bound @" in text
        assert print_module(parse_module(text)) == text


# ---- the fuzzer ------------------------------------------------------------------------------------------


def test_the_fuzzer_generates_every_reduction() -> None:
    sources: list[str] = []

    @settings(
        max_examples=400,
        phases=[Phase.generate],
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(programs())
    def draw(program: Program) -> None:
        sources.append(program.source)

    draw()
    text = "\n".join(sources)
    missing = [kind for kind in ("sum", "any", "all", "max", "min") if f"{kind}(ri" not in text]
    assert not missing, f"never generated: {missing}"
    assert "..clamp(p" in text and "..20:" in text and "..3:" in text


def test_a_seeded_fuzz_run_of_programs_with_reductions_finds_no_mismatch() -> None:
    with_reductions = fuzz.cases(max_len=32).filter(lambda case: "(ri0 in " in case.source)
    report = fuzz.fuzz(with_reductions, 240, seed=2026, max_cases=6)
    assert report.failure is None, f"{report.failure.describe()}\n{report.error}\n{report.failure.source}"
    assert report.cases >= 6
