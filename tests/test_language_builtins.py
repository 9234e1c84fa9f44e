"""The built-ins and operators of issue 20: `sin cos tan erf`, the `inf` constant (`-inf`), the bitwise
`& | ^ << >>` on ints, 0-d inputs (`input t: float32[]`, read as `t[]`), and the error for `s` in a
mask. Each is judged against the same predicate written in Python (masks), the dense oracle (kernels,
forward and backward, in the interpreter at tiny shapes), and its own rules: typing errors located in
the source, constant folding, value ranges that are sound (so the kernel's int32 / int64 choice stays
exact), and the fuzzer's program strategies generating it."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

import attnc
from attnc.analysis.derivative import derivative
from attnc.analysis.value_ranges import ValueRanges, _bitwise
from attnc.codegen.emit import INT64, Emitter
from attnc.ir import fold
from attnc.ir.nodes import SCORE, Node, Op, PatternIR, const, make, var
from attnc.ir.parser import parse_module
from attnc.ir.printer import print_module
from attnc.oracle import Env, evaluate
from attnc.testing import compare, compare_gradients
from attnc.testing.programs import Program, programs

LQ, LKV = 11, 9


def mask_of(source: str, name: str = "p", **inputs: torch.Tensor) -> torch.Tensor:
    return attnc.loads(source)[name]().mask(LQ, LKV, **inputs)[0, 0]


def python_mask(predicate) -> torch.Tensor:
    return torch.tensor([[bool(predicate(q, kv)) for kv in range(LKV)] for q in range(LQ)])


def error_of(source: str) -> str:
    with pytest.raises(attnc.AttnError) as caught:
        module = attnc.loads(source, filename="bad.attn")
        for name in module.own_patterns:
            module[name]()
    return str(caught.value)


def qkv(heads: int = 1, length: int = 40, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, length, 16, generator=g) for _ in range(3)]


# ---- masks against Python ----------------------------------------------------------------------------


def _shl(a: int, n: int) -> int:
    return a << min(max(n, 0), 63)


def _shr(a: int, n: int) -> int:
    return a >> min(max(n, 0), 63)


@pytest.mark.parametrize(
    ("expr", "predicate"),
    [
        ("q & 3 == 1", lambda q, kv: (q & 3) == 1),  # Python's precedence: & binds tighter than ==
        ("q | kv ^ 3 & 5 == 7", lambda q, kv: (q | (kv ^ (3 & 5))) == 7),  # | loosest, then ^, then &
        ("q ^ kv == 0", lambda q, kv: q == kv),
        ("q & 0x6 == kv | 0X10", lambda q, kv: (q & 6) == (kv | 16)),  # hexadecimal literals
        ("q << 1 + 1 == kv * 4", lambda q, kv: q << 2 == kv * 4),  # + - bind tighter than shifts
        ("q >> 1 & 1 == kv & 1", lambda q, kv: ((q >> 1) & 1) == (kv & 1)),  # shifts tighter than &
        ("(-q) >> 1 == -kv", lambda q, kv: (-q) >> 1 == -kv),  # arithmetic: floor(-q / 2)
        ("(-q) & 6 == kv", lambda q, kv: (-q) & 6 == kv),  # two's complement, as Python's
        ("(-q | -kv) == -1", lambda q, kv: (-q | -kv) == -1),
        ("(q - 5) ^ (kv - 4) < 0", lambda q, kv: (q - 5) ^ (kv - 4) < 0),
        ("kv >> (q - 5) == kv", lambda q, kv: _shr(kv, q - 5) == kv),  # a negative count shifts by 0
        ("(q << min(kv - 3, 2)) == q", lambda q, kv: _shl(q, min(kv - 3, 2)) == q),
        ("(q - 5) >> (kv * 30) == -1", lambda q, kv: _shr(q - 5, kv * 30) == -1),  # past 63: 63
        ("sin(q) > cos(kv)", lambda q, kv: math.sin(q) > math.cos(kv)),
        ("tan(0.1 * q) > 0.5", lambda q, kv: math.tan(0.1 * q) > 0.5),
        ("erf(q - kv) > 0.9", lambda q, kv: math.erf(q - kv) > 0.9),
        ("q / (kv - 4) < inf", lambda q, kv: kv != 4),  # 1 / 0 is inf, 0 / 0 NaN: neither < inf
        ("-inf < q - kv", lambda q, kv: True),
    ],
)
def test_operator_and_builtin_masks_match_python(expr: str, predicate) -> None:
    source = f"pattern p {{ mask = {expr} }}"
    assert torch.equal(mask_of(source), python_mask(predicate)), expr


def test_a_score_of_minus_inf_drops_the_key() -> None:
    source = "pattern p { score = where(kv <= q, s, -inf) }"
    kern = attnc.loads(source).p()
    q, k, v = qkv()
    causal = attnc.stdlib().causal()
    assert torch.allclose(kern.reference(q, k, v), causal.reference(q, k, v))


def test_keys_dropped_by_a_minus_inf_score_in_kernels_forward_and_backward() -> None:
    kern = attnc.loads("pattern p { score = where(kv <= q and kv % 3 != 1, sin(s), -inf) }").p()
    q, k, v = qkv()
    out, lse = kern(q, k, v, return_lse=True)
    assert compare(kern, out, lse, q, k, v).ok
    result = compare_gradients(kern, q, k, v)
    assert result.ok, result.describe()


def test_inf_is_a_float_constant_in_defaults_too() -> None:
    kern = attnc.loads("pattern p(cap: float = -inf) { mask = q - kv > cap }").p()
    assert kern.mask(4, 4).all()


def test_clamp_keeps_its_meaning_with_lo_above_hi() -> None:
    # clamp(x, lo, hi) is min(max(x, lo), hi): with lo > hi every value is hi.
    assert torch.equal(
        mask_of("pattern p { mask = clamp(q, 6, 2) == kv }"), python_mask(lambda q, kv: kv == 2)
    )


# ---- 0-d inputs ---------------------------------------------------------------------------------------


def test_a_0d_input_is_read_with_empty_brackets() -> None:
    source = "pattern p {\n    input n: int32[]\n    mask = kv <= q - n[]\n}"
    got = mask_of(source, n=torch.tensor(3, dtype=torch.int32))
    assert torch.equal(got, python_mask(lambda q, kv: kv <= q - 3))


def test_a_0d_input_read_bare_is_a_located_error() -> None:
    message = error_of("pattern p {\n    input t: float32[]\n    score = s * t\n}")
    assert message.startswith("bad.attn:3:17: error: input 't' is a 0-d tensor: read it as t[]")


def test_a_0d_input_indexed_is_an_arity_error() -> None:
    message = error_of("pattern p {\n    input t: float32[]\n    score = s * t[0]\n}")
    assert "input 't' has 0 dimension(s), indexed with 1" in message


def test_a_0d_input_survives_the_ir_text() -> None:
    kern = attnc.loads("pattern p {\n    input t: float32[]\n    score = s * t[]\n}").p()
    text = kern.ir("canonicalize")
    assert "input t: float32[]" in text
    assert "load @t()" in text


def test_a_0d_input_gives_exact_tile_classes() -> None:
    kern = attnc.loads("pattern p {\n    input n: int32[]\n    mask = kv <= q - n[] and q - kv < 9\n}").p()
    n = torch.tensor(3, dtype=torch.int32)
    dense = kern.mask(40, 40, n=n)[0, 0]
    expected = torch.tensor(
        [
            [0 if not t.any() else 2 if t.all() else 1 for t in row.split(16, dim=1)]
            for row in dense.split(16, dim=0)
        ],
        dtype=torch.int8,
    )
    assert torch.equal(kern.block_map(40, 40, block=(16, 16), n=n)[0, 0], expected)


def test_every_new_construct_round_trips_through_the_ir_text() -> None:
    source = """
pattern p(static c: int = 2) {
    input t: float32[]
    input u: int64[]
    mask = (q >> c) & 1 == (kv ^ u[]) | 0x10 and (q << 1) > kv
    score = s * t[] + sin(s) + cos(s) + tan(s * 0.1) + erf(s) + where(q == 0, -inf, 0.0)
}
"""
    kern = attnc.loads(source).p()
    for stage, module in kern._compiled.passes.modules.items():
        text = kern.stages[stage]
        assert parse_module(text) == module, stage
        assert print_module(parse_module(text)) == text, stage


def test_0d_inputs_in_kernels_forward_and_backward() -> None:
    source = """
pattern p {
    input t: float32[]
    input n: int64[]
    mask = kv <= q + n[]
    score = s * t[] + t[] * t[]
}
"""
    kern = attnc.loads(source).p()
    q, k, v = qkv(heads=2)
    t = torch.tensor(0.7).requires_grad_()
    n = torch.tensor(-2, dtype=torch.int64)
    out, lse = kern(q, k, v, return_lse=True, t=t, n=n)
    assert compare(kern, out, lse, q, k, v, t=t, n=n).ok
    result = compare_gradients(kern, q, k, v, t=t, n=n)
    assert result.ok, result.describe()


# ---- kernels, forward and backward ---------------------------------------------------------------------


def test_trigonometry_and_erf_in_a_score_forward_and_backward() -> None:
    source = """
pattern p {
    input w: float32[KV_LEN]
    score = sin(s) + cos(s * w[kv]) + tan(0.5 * tanh(s)) + erf(s + w[kv])
}
"""
    kern = attnc.loads(source).p()
    q, k, v = qkv()
    w = (torch.rand(40, generator=torch.Generator().manual_seed(3)) * 2 - 1).requires_grad_()
    out, lse = kern(q, k, v, return_lse=True, w=w)
    assert compare(kern, out, lse, q, k, v, w=w).ok
    result = compare_gradients(kern, q, k, v, w=w)
    assert result.ok, result.describe()


def test_bitwise_masks_and_float_masks_of_trigonometry_in_kernels() -> None:
    source = """
pattern p(c: int = 1) {
    let morton = (q & 1) | ((kv & 1) << 1) | ((q >> 1 & 1) << 2)
    mask = (morton ^ 5) != 3 and (kv >> (q - 30)) <= q and (q << (c & 3)) >= kv or sin(kv) > 0.99
}
"""
    module = attnc.loads(source)
    q, k, v = qkv()
    for c in (1, -7):  # a runtime count, negative too
        kern = module.p(c=c)
        out, lse = kern(q, k, v, return_lse=True)
        assert compare(kern, out, lse, q, k, v).ok
        expected = torch.tensor(
            [
                [
                    ((((a & 1) | ((b & 1) << 1) | (((a >> 1) & 1) << 2)) ^ 5) != 3
                     and _shr(b, a - 30) <= a and _shl(a, c & 3) >= b) or math.sin(b) > 0.99
                    for b in range(40)
                ]
                for a in range(40)
            ]
        )  # fmt: skip
        assert torch.equal(kern.mask(40, 40)[0, 0], expected)


def test_the_derivatives_are_the_textbook_ones() -> None:
    assert derivative(make(Op.SIN, SCORE), SCORE) == make(Op.COS, SCORE)
    assert derivative(make(Op.COS, SCORE), SCORE) == make(Op.NEG, make(Op.SIN, SCORE))
    tan = make(Op.TAN, SCORE)
    assert derivative(tan, SCORE) == make(Op.ADD, const(1.0), make(Op.MUL, tan, tan))
    erf = derivative(make(Op.ERF, SCORE), SCORE)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    env = Env(1, 1, 1, 1, torch.device("cpu"), {}, score=x)
    expected = 2 / math.sqrt(math.pi) * torch.exp(-x * x)
    assert erf is not None
    assert torch.allclose(evaluate(erf, PatternIR("p"), env), expected)


# ---- typing errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("mask = q & 1.5 == 0", "bad.attn:1:22: error: operator '&' needs ints, got int and float"),
        ("mask = (q < 1) | (kv < 2)", "operator '|' needs ints, got bool and bool (use 'or' for bools)"),
        ("mask = q << 64 == 0", "bad.attn:1:25: error: shift count 64 is outside [0, 63]: ints are 64-bit"),
        ("mask = q >> (2 - 3) == 0", "error: shift count -1 is outside [0, 63]"),
        ("score = sin(q < 2)", "'sin' needs numbers, got bool"),
        (
            "mask = erf(q) > 0 and s > 0",
            "bad.attn:1:35: error: 's' (the score) exists only inside score: a mask",
        ),
    ],
)
def test_wrong_operands_are_located_errors(body: str, expected: str) -> None:
    assert expected in error_of(f"pattern p {{ {body} }}")


def test_s_in_a_mask_explains_the_where_idiom() -> None:
    message = error_of("pattern p {\n    mask = s > 0.0\n}")
    assert message.startswith("bad.attn:2:12: error: 's' (the score) exists only inside score: a mask")
    assert "score = where(COND, s, -inf)" in message


def test_a_let_of_s_in_a_mask_explains_the_where_idiom_too() -> None:
    message = error_of("pattern p {\n    let big = s > 1.0\n    mask = big\n}")
    assert "let 'big' uses 's'" in message and "score = where(COND, s, -inf)" in message


def test_inf_cannot_be_redefined() -> None:
    assert "'inf' is a built-in name and cannot be redefined" in error_of("pattern p {\n    let inf = 1\n}")


def test_an_integer_overflow_through_a_shift_is_reported() -> None:
    # A runtime count may be anything: q << c could leave int64, which is an error, not a wrap.
    assert "integer overflow" in error_of("pattern p(c: int = 1) { mask = q << c == kv }")


# ---- folding, value ranges, the kernel's int types -----------------------------------------------------


def test_constants_fold_through_the_new_ops() -> None:
    source = "pattern p { mask = kv <= (6 & 3) + (1 << 2) + (-9 >> 1) + (5 ^ 1) + floor(sin(0.0)) }"
    assert "%0 = le(kv, 5) : bool\n  mask = %0\n" in attnc.loads(source).p().ir("canonicalize")
    assert fold.evaluate(Op.SHL, [3, 70]) == 3 << 63
    assert fold.evaluate(Op.SHR, [-9, -4]) == -9
    assert fold.evaluate(Op.BITXOR, [-6, 3]) == -6 ^ 3
    assert math.isnan(fold.evaluate(Op.TAN, [math.inf]))  # type: ignore[arg-type]


SAMPLE_RANGES = [(-9, -1), (-5, 4), (0, 0), (0, 13), (3, 6), (-1, -1), (-70, 70), (17, 40)]


@pytest.mark.parametrize("op", [Op.BITAND, Op.BITOR, Op.BITXOR])
def test_bitwise_value_ranges_hold_every_value(op: Op) -> None:
    for a, b in itertools.product(SAMPLE_RANGES, repeat=2):
        lo, hi = _bitwise(op, a, b)
        values = [fold.evaluate(op, [x, y]) for x in range(a[0], a[1] + 1) for y in range(b[0], b[1] + 1)]
        assert lo <= min(values) and max(values) <= hi, (op, a, b, (lo, hi))  # type: ignore[type-var]


def _within(x: Node, r: tuple[int, int]) -> Node:
    """An expression whose values are exactly the ints of r (x a position, from 0)."""
    return make(Op.ADD, make(Op.MIN, x, const(r[1] - r[0])), const(r[0]))


@pytest.mark.parametrize("op", [Op.SHL, Op.SHR])
def test_shift_value_ranges_hold_every_value(op: Op) -> None:
    counts = [(-3, 2), (0, 5), (60, 70), (-9, -1)]
    for a, c in itertools.product(SAMPLE_RANGES, counts):
        node = make(op, _within(var("q"), a), _within(var("kv"), c))
        lo, hi = ValueRanges().of(node)
        values = [fold.evaluate(op, [v, k]) for v in range(a[0], a[1] + 1) for k in range(c[0], c[1] + 1)]
        assert lo <= min(values) and max(values) <= hi, (op, a, c, (lo, hi))  # type: ignore[type-var]


def test_a_shift_past_int32_is_computed_in_int64() -> None:
    kern = attnc.loads("pattern p { mask = (q << 20) >> 18 == kv }").p()
    bound = kern._compiled.passes.modules["canonicalize"].entry
    assert bound.mask is not None
    emitter = Emitter(bound, {"q": "q", "kv": "kv"})
    shifted = next(n for n in bound.mask.walk() if n.op is Op.SHL)
    assert emitter.dtype(shifted) == INT64


# ---- the fuzzer generates every new construct ---------------------------------------------------------

CONSTRUCTS = {
    "&": r" & ",
    "|": r" \| ",
    "^": r" \^ ",
    "<<": r" << ",
    ">>": r" >> ",
    "sin": r"\bsin\(",
    "cos": r"\bcos\(",
    "tan": r"\btan\(",
    "erf": r"\berf\(",
    "-inf": r", -inf\)",
    "0-d input": r"input t\d: \w+\[\]",
}


def test_the_fuzzer_generates_every_new_construct() -> None:
    sources: list[str] = []

    @settings(
        max_examples=800,
        phases=[Phase.generate],
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(programs())
    def draw(program: Program) -> None:
        sources.append(program.source)

    draw()
    missing = [name for name, regex in CONSTRUCTS.items() if not any(re.search(regex, s) for s in sources)]
    assert not missing, f"never generated in {len(sources)} programs: {missing}"


# ---- docs/porting.md: each FlexAttention example and its .attn port agree ---------------------------

PORTING = Path(__file__).parents[1] / "docs" / "porting.md"
FENCE = re.compile(r"^```(\S*)\n(.*?)^```\n", re.S | re.M)


def porting_pairs() -> list[tuple[int, str, str]]:
    """(line, python, attn) for each Python block of porting.md followed by an `.attn` block."""
    text = PORTING.read_text()
    found = list(FENCE.finditer(text))
    return [
        (text[: a.start()].count("\n") + 1, a.group(2), b.group(2))
        for a, b in itertools.pairwise(found)
        if a.group(1) == "python" and b.group(1) == "attn"
    ]


def test_porting_covers_the_attention_gym_examples() -> None:
    text = PORTING.read_text()
    for example in (
        "Causal", "Sliding window", "Dilated sliding window", "Prefix LM", "PaliGemma", "Document masking",
        "ALiBi", "Soft-capping", "Relative positional bias", "Sandwich", "NATTEN", "NATTEN over a Morton",
        "Sliding Tile Attention", "Dropping keys by score",
    ):  # fmt: skip
        assert f"### {example}" in text, example
    assert len(porting_pairs()) >= 15


@pytest.mark.parametrize(
    ("line", "python", "source"), porting_pairs(), ids=lambda x: x if isinstance(x, int) else ""
)
def test_porting_examples_match_their_flexattention_mods(line: int, python: str, source: str) -> None:
    namespace: dict[str, object] = {"torch": torch}
    exec(python, namespace)  # the page's own FlexAttention code
    module = attnc.loads(source, filename=f"porting.md:{line}")
    kern = module[module.own_patterns[-1]]()
    inputs = {d.name: namespace[d.name] for d in kern.pattern.inputs}
    B, H, L = 2, 4, 16
    b, h, qi, ki = (
        torch.arange(n).reshape([n if i == axis else 1 for i in range(4)])
        for axis, n in enumerate((B, H, L, L))
    )
    allowed = torch.ones(B, H, L, L, dtype=torch.bool)
    if "mask_mod" in namespace:
        allowed = allowed & namespace["mask_mod"](b, h, qi, ki)  # type: ignore[operator]
    assert torch.equal(kern.mask(L, L, batch=B, num_heads=H, **inputs).expand(B, H, L, L), allowed)
    if "score_mod" in namespace:
        g = torch.Generator().manual_seed(line)
        q, k, v = (torch.randn(B, H, L, 8, generator=g, dtype=torch.float64) for _ in range(3))
        scores = namespace["score_mod"](q @ k.transpose(-1, -2) * 8**-0.5, b, h, qi, ki)  # type: ignore[operator]
        weights = torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1).nan_to_num(0.0)
        # float32 tables: PyTorch multiplies them in float32, the oracle in float64
        assert torch.allclose(kern.reference(q, k, v, **inputs), weights @ v, atol=1e-6)
