"""`canonicalize` never changes what a mask means, and is a fixed point.

Random well-typed mask expressions over `q`, `kv`, `b`, `h`, the sizes and two int parameters are
compiled; the dense oracle evaluates the mask of the bound (not yet canonicalized) IR and of the final,
canonicalized IR on a small grid, and the two must agree at every point. As a check on the constant
folding that `bind-params` does, both must also agree with the inlined IR with the parameter values
substituted and nothing folded.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import oracle
from attnc.ir.nodes import const
from attnc.ir.printer import print_module
from attnc.ir.rewrite import substitute
from attnc.passes import Canonicalize

BATCH, HEADS, Q_LEN, KV_LEN = 2, 3, 9, 7
SHAPE = (BATCH, HEADS, Q_LEN, KV_LEN)

SOUNDNESS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

INT_VARS = ("q", "kv", "q", "kv", "m", "n", "b", "h", "Q_LEN", "KV_LEN")
DIVISORS = (-3, -2, -1, 0, 1, 2, 3, 4)
COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")


def lit(value: int) -> str:
    return f"({value})" if value < 0 else str(value)


@st.composite
def int_exprs(draw: st.DrawFn, depth: int = 3) -> str:
    if depth == 0 or draw(st.integers(0, 4)) == 0:
        if draw(st.integers(0, 4)) == 0:
            return lit(draw(st.integers(-6, 6)))
        return draw(st.sampled_from(INT_VARS))
    sub = int_exprs(depth - 1)
    kind = draw(
        st.sampled_from(
            ["add", "sub", "mul", "mul", "div", "mod", "div", "mod", "vdiv", "neg",
             "abs", "min", "max", "min3", "clamp", "where", "floor"]
        )
    )  # fmt: skip
    if kind == "add":
        return f"({draw(sub)} + {draw(sub)})"
    if kind == "sub":
        return f"({draw(sub)} - {draw(sub)})"
    if kind == "mul":
        c = lit(draw(st.integers(-3, 3)))
        return f"({c} * {draw(sub)})" if draw(st.booleans()) else f"({draw(sub)} * {c})"
    if kind in ("div", "mod"):
        op = "//" if kind == "div" else "%"
        return f"({draw(sub)} {op} {lit(draw(st.sampled_from(DIVISORS)))})"
    if kind == "vdiv":
        op = draw(st.sampled_from(["//", "%"]))
        return f"({draw(sub)} {op} {draw(sub)})"
    if kind == "neg":
        return f"(-{draw(sub)})"
    if kind == "abs":
        return f"abs({draw(sub)})"
    if kind in ("min", "max"):
        return f"{kind}({draw(sub)}, {draw(sub)})"
    if kind == "min3":
        fn = draw(st.sampled_from(["min", "max"]))
        return f"{fn}({draw(sub)}, {draw(sub)}, {draw(sub)})"
    if kind == "clamp":
        return f"clamp({draw(sub)}, {draw(sub)}, {draw(sub)})"
    if kind == "where":
        return f"where({draw(bool_exprs(depth - 1))}, {draw(sub)}, {draw(sub)})"
    # floor/ceil of a float quotient by a nonzero constant (never of inf or NaN)
    fn = draw(st.sampled_from(["floor", "ceil"]))
    c = draw(st.sampled_from(["2", "3", "(-2)", "0.5", "2.5"]))
    return f"{fn}({draw(sub)} / {c})"


@st.composite
def float_exprs(draw: st.DrawFn, depth: int) -> str:
    """A float expression: an int one promoted, divided (also by 0: inf, and NaN at 0 / 0) or scaled."""
    x = draw(int_exprs(max(depth - 1, 0)))
    kind = draw(st.sampled_from(["div", "div", "mul", "add", "plain"]))
    if kind == "div":
        return f"({x} / {draw(st.sampled_from(['2', '(-3)', '0', '0.5']))})"
    if kind == "mul":
        return f"({x} * {draw(st.sampled_from(['0.5', '1.0', '(-1.5)']))})"
    if kind == "add":
        return f"({x} + {draw(st.sampled_from(['0.5', '0.0', '(-2.25)']))})"
    return x


# A few linear forms, often compared with constants, so that and/or meet several bounds on one form
# (including forms with a common factor, and ones that canonicalize distributes or divides).
LINEAR_FORMS = (
    "q - kv", "kv - q", "q", "kv", "2 * q - kv", "2 * q - 2 * kv", "3 * (kv - q) + 3 * m", "q + kv - m",
    "(q - kv) % 3", "(q - kv) // (-1)", "abs(q - kv)", "max(q, kv)", "-min(q - 2, kv)",
)  # fmt: skip


@st.composite
def comparisons(draw: st.DrawFn, depth: int) -> str:
    kind = draw(st.integers(0, 6))
    if kind == 0:  # a comparison involving floats (int operands promoted)
        a, b = draw(float_exprs(depth)), draw(float_exprs(depth))
    elif kind <= 2:  # a bound on a shared linear form
        a, b = draw(st.sampled_from(LINEAR_FORMS)), lit(draw(st.integers(-3, 6)))
    elif kind == 3:  # a bound on a random expression
        a, b = draw(int_exprs(depth)), lit(draw(st.integers(-3, 6)))
    else:
        a, b = draw(int_exprs(depth)), draw(int_exprs(depth))
    if draw(st.booleans()):
        a, b = b, a
    return f"({a} {draw(st.sampled_from(COMPARISONS))} {b})"


BOOL_KINDS = (
    "and", "or", "and3", "not", "cmp", "chain", "chain", "booleq", "where", "bounds", "bounds", "bounds",
    "notfloat",
)  # fmt: skip


@st.composite
def bool_exprs(draw: st.DrawFn, depth: int = 3) -> str:
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        if draw(st.integers(0, 9)) == 0:
            return draw(st.sampled_from(["true", "false"]))
        return draw(comparisons(max(depth - 1, 0)))
    sub = bool_exprs(depth - 1)
    kind = draw(st.sampled_from(BOOL_KINDS))
    if kind == "bounds":  # several bounds on one or two linear forms, joined by one junction
        forms = draw(st.lists(st.sampled_from(LINEAR_FORMS), min_size=1, max_size=2))
        same_op = draw(st.sampled_from([None, None, *COMPARISONS]))  # often one operator throughout
        base = draw(st.integers(-2, 4))  # constants close together: bounds that touch, overlap or gap
        parts = []
        for _ in range(draw(st.integers(2, 4))):
            op = same_op or draw(st.sampled_from(COMPARISONS))
            parts.append(f"({draw(st.sampled_from(forms))} {op} {lit(base + draw(st.integers(-1, 2)))})")
        return "(" + f" {draw(st.sampled_from(['and', 'or']))} ".join(parts) + ")"
    if kind == "notfloat":  # a negated float comparison whose operands may be NaN (0 / 0) or inf
        a = draw(float_exprs(depth))
        b = draw(st.sampled_from(["0.0", "1.5", "(q / 0)", "(kv - 2)", "(q - kv) / 0"]))
        return f"(not ({a} {draw(st.sampled_from(COMPARISONS))} {b}))"
    if kind in ("and", "or"):
        return f"({draw(sub)} {kind} {draw(sub)})"
    if kind == "and3":
        op = draw(st.sampled_from(["and", "or"]))
        return f"({draw(sub)} {op} {draw(sub)} {op} {draw(sub)})"
    if kind == "not":
        return f"(not {draw(sub)})"
    if kind == "cmp":
        return draw(comparisons(depth - 1))
    if kind == "chain":
        xs = [draw(int_exprs(depth - 1)) for _ in range(draw(st.integers(3, 4)))]
        text = xs[0]
        for x in xs[1:]:
            text += f" {draw(st.sampled_from(COMPARISONS))} {x}"
        return f"({text})"
    if kind == "booleq":
        return f"({draw(sub)} {draw(st.sampled_from(['==', '!=']))} {draw(sub)})"
    return f"where({draw(sub)}, {draw(sub)}, {draw(sub)})"


PARAMS = st.fixed_dictionaries({"m": st.integers(-4, 6), "n": st.integers(-4, 6)})


def source(expr: str) -> str:
    return f"pattern p(m: int, n: int) {{\n    mask = {expr}\n}}\n"


def compile_mask(expr: str, params: dict[str, int]) -> attnc.Kernel:
    return attnc.loads(source(expr)).p(**params)


def env(kern: attnc.Kernel) -> oracle.Env:
    """The grid, with the kernel's parameter values (the runtime ones are read from `params`)."""
    return oracle.Env(BATCH, HEADS, Q_LEN, KV_LEN, torch.device("cpu"), {}, params=kern.params)


def bound_and_final_masks(kern: attnc.Kernel) -> tuple[torch.Tensor, torch.Tensor]:
    bound = kern._compiled.passes.modules["bind-params"].entry
    final = kern._compiled.passes.modules["canonicalize"].entry
    m1 = oracle.mask(bound, env(kern)).expand(SHAPE)
    m2 = oracle.mask(final, env(kern)).expand(SHAPE)
    return m1, m2


def unfolded_mask(kern: attnc.Kernel) -> torch.Tensor:
    """The inlined mask with the parameter values substituted and nothing folded, by the oracle."""
    inlined = kern._compiled.passes.modules["inline"].entry
    values = {name: const(value) for name, value in kern.params.items()}
    raw = replace(inlined, params=(), mask=substitute(inlined.mask, values))
    return oracle.mask(raw, env(kern)).expand(SHAPE)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    where = tuple((a != b).nonzero()[0].tolist())
    return f"first difference at [b, h, q, kv] = {list(where)}: {bool(a[where])} vs {bool(b[where])}"


def assert_same_meaning(expr: str, params: dict[str, int]) -> None:
    kern = compile_mask(expr, params)
    m1, m2 = bound_and_final_masks(kern)
    m0 = unfolded_mask(kern)
    if not torch.equal(m0, m1):
        pytest.fail(
            f"bind-params (constant folding) changed the mask of `{expr}` with {params}: "
            f"{first_difference(m0, m1)} (unfolded vs bound)\n"
            f"inlined IR:\n{kern.ir('inline')}\nbound IR:\n{kern.ir('bind-params')}"
        )
    if not torch.equal(m1, m2):
        pytest.fail(
            f"canonicalize changed the mask of `{expr}` with {params}: "
            f"{first_difference(m1, m2)} (bound vs canonical)\n"
            f"bound IR:\n{kern.ir('bind-params')}\ncanonical IR:\n{kern.ir('canonicalize')}"
        )


@SOUNDNESS
@given(expr=bool_exprs(), params=PARAMS)
def test_canonicalize_preserves_random_masks(expr: str, params: dict[str, int]) -> None:
    assert_same_meaning(expr, params)


@SOUNDNESS
@given(expr=bool_exprs(), params=PARAMS)
def test_canonicalize_is_idempotent_on_random_masks(expr: str, params: dict[str, int]) -> None:
    kern = compile_mask(expr, params)
    final = kern._compiled.final
    again = Canonicalize().run(final)
    assert print_module(again) == print_module(final), f"not a fixed point for `{expr}` with {params}"
    assert again == final


# Hand-picked forms every rule family touches, so that the property is also checked on known shapes.
EDGE_CASES = [
    "(q - kv) // 0 == 0",
    "(q - kv) % 0 == q - kv",
    "(q - kv) % (-3) == (-1)",
    "(q - kv) // (-2) >= 1",
    "q // 1 == q and kv % (-1) == 0",
    "-(q - kv) // 2 == (kv - q) // 2",
    "2 * q - 2 * kv <= 3",
    "3 * q + 1 != 3 * kv",
    "2 * q == 2 * kv + 1",
    "abs(q - kv) <= 2",
    "abs(q - kv) >= 2",
    "-abs(q - kv) >= (-2)",
    "min(q, kv) >= 3",
    "max(q, kv) < 5 or min(q, kv) > 6",
    "3 * max(q - 1, kv) - q <= 4",
    "(-2) * min(q, kv + 1) + kv >= (-6)",
    "clamp(q - kv, (-2), 2) == q - kv",
    "clamp(q, 5, 2) == 2",
    "0 <= q - kv < 3",
    "kv <= q < kv + 3 <= 8",
    "not (kv <= q and q - kv < 3)",
    "not (q / 2 < kv)",
    "(q / 0 < kv) == (q / 0 >= kv)",
    "not (q / 0 - q / 0 < 1.0)",
    "q - kv >= 2 and q - kv <= 1",
    "q - kv >= 2 or q - kv <= 1",
    "q - kv >= 2 or q - kv <= 0",
    "q - kv == 2 and q - kv >= 3",
    "q - kv == 2 and q - kv <= 3",
    "q - kv == 2 or q - kv == 3",
    "q - kv != 2 and q - kv != 2",
    "where(q > kv, q - kv, kv - q) <= 2",
    "where(q > kv, true, kv % 2 == 0)",
    "(q < kv) == (kv > q)",
    "(q < kv) != false",
    "true and (q == kv or false)",
    "q % 3 == kv % 3 and q // 3 - 1 < kv // 3 <= q // 3",
    "(q - kv) % 4 == 0 and abs(q - kv) <= 2 * 4",
    "b * 3 + h <= q and q - h < KV_LEN - b",
    "Q_LEN - q > KV_LEN - kv",
    "m * q - n * kv >= m - n",
    "(q % 0) // 0 == 0",
    "q // (kv - 3) == 0",
    "q % (kv - 3) == q",
    "floor(q / 2) == q // 2",
    "ceil(q / (-2)) == -(q // 2)",
    "floor((q - kv) / 2.5) >= (-1)",
    "not ((0 / (-3)) < (q / 0))",
]


@pytest.mark.parametrize("expr", EDGE_CASES)
@pytest.mark.parametrize("params", [{"m": 2, "n": -1}, {"m": 0, "n": 3}])
def test_canonicalize_preserves_edge_case(expr: str, params: dict[str, int]) -> None:
    assert_same_meaning(expr, params)


@pytest.mark.parametrize("expr", EDGE_CASES)
def test_canonicalize_is_idempotent_on_edge_case(expr: str) -> None:
    final = compile_mask(expr, {"m": 2, "n": -1})._compiled.final
    assert Canonicalize().run(final) == final


# The standard library, compiled with several parameter values: same check on real patterns.
STDLIB_CASES = [
    ("causal", {}),
    ("causal_bottom_right", {}),
    ("sliding_window", {"window": 1}),
    ("sliding_window", {"window": 4}),
    ("local", {"left": 2, "right": 0}),
    ("local", {"left": 0, "right": 3}),
    ("sinks", {"count": 0}),
    ("sinks", {"count": 3}),
    ("prefix_lm", {"prefix": 4}),
    ("dilated", {"window": 2, "dilation": 1}),
    ("dilated", {"window": 1, "dilation": 3}),
    ("neighborhood_1d", {"kernel": 3}),
    ("neighborhood_1d", {"kernel": 3, "dilation": 2}),
    ("neighborhood_1d", {"kernel": 1, "dilation": 3, "is_causal": True}),
    ("neighborhood_2d", {"height": 3, "width": 3, "kernel_h": 3, "kernel_w": 1, "dilation_w": 3}),
    ("neighborhood_2d", {"height": 3, "width": 3, "kernel_h": 1, "kernel_w": 3, "causal_h": True}),
    ("neighborhood_3d", {"depth": 1, "height": 3, "width": 3, "kernel_d": 1, "kernel_h": 3, "kernel_w": 3}),
]


@pytest.mark.parametrize(("name", "params"), STDLIB_CASES)
def test_canonicalize_preserves_stdlib_pattern(name: str, params: dict) -> None:
    kern = attnc.stdlib()[name](**params)
    m1, m2 = bound_and_final_masks(kern)
    assert torch.equal(m1, m2), f"{name}({params}):\n{kern.ir('bind-params')}\n{kern.ir('canonicalize')}"
