"""The backward kernels: gradients of `kern(q, k, v)` judged against autograd through the dense oracle.

Every gradient (dq, dk, dv, the lse's contribution, and the float inputs of the score) is held to
float64 autograd through `Kernel.reference` by the tolerance rule of `attnc.testing`
(`compare_gradients`). Without a GPU the kernels run under Triton's interpreter on small shapes.
"""

from __future__ import annotations

import pytest
import torch
from cases import (
    DEVICE,
    DOCUMENT,
    GEMMA,
    HALF_PRECISION_PATTERNS,
    PATTERNS,
    STD,
    STREAMING,
    Inputs,
    documents,
    no_inputs,
    qkv,
)
from cases import pattern_id as _id

import attnc
from attnc.codegen.lower import build_backward_spec, checked_code, render
from attnc.errors import InputError
from attnc.runtime.autograd import NO_FLOAT_PARAMS as NO_FLOATS
from attnc.testing import GradientComparison, compare_gradients


def check(kern: attnc.Kernel, q, k, v, scale: float | None = None, lse_grad: bool = True, **inputs) -> None:
    comparison = compare_gradients(kern, q, k, v, scale=scale, lse_grad=lse_grad, **inputs)
    assert comparison.ok, f"{kern}: {comparison.describe()}"


def grads(kern: attnc.Kernel, q, k, v, seed: int = 1, **inputs) -> list[torch.Tensor]:
    """The kernel's gradients (q, k, v, then the inputs that require grad) for a random upstream."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = kern(*leaves, **inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    wrt = leaves + [t for t in inputs.values() if t.requires_grad]
    return list(torch.autograd.grad(out, wrt, upstream))


# ---- every stdlib pattern and example --------------------------------------------------------------------


@pytest.mark.parametrize(("kern", "inputs"), PATTERNS, ids=_id)
def test_every_pattern_has_the_oracles_gradients(kern: attnc.Kernel, inputs: Inputs) -> None:
    q, k, v = qkv(2, 4, 2, 67, 67, 24, 20)
    check(kern, q, k, v, **inputs(2, 4, 67, 67))


SHAPES = [  # batch, query heads, key/value heads, q_len, kv_len, head dim, v head dim
    (1, 1, 1, 1, 1, 16, 16),
    (2, 4, 1, 33, 33, 16, 16),
    (1, 2, 2, 17, 80, 64, 64),
    (1, 6, 2, 80, 17, 24, 24),
    (1, 3, 3, 64, 64, 24, 40),
    (1, 2, 2, 100, 37, 16, 16),
]
SHAPE_PATTERNS = [
    (STD.causal_bottom_right(), no_inputs),
    (STREAMING.streaming_llm(window=9, sinks=2), no_inputs),
    (DOCUMENT, documents),
    (GEMMA.gemma_local(window=12, cap=3.0), no_inputs),
]


@pytest.mark.parametrize(("kern", "inputs"), SHAPE_PATTERNS, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gqa_odd_and_cross_lengths(kern: attnc.Kernel, inputs: Inputs, shape: tuple[int, ...]) -> None:
    batch, heads, kv_heads, q_len, kv_len, dim, dim_v = shape
    q, k, v = qkv(batch, heads, kv_heads, q_len, kv_len, dim, dim_v, seed=q_len)
    check(kern, q, k, v, **inputs(batch, heads, q_len, kv_len))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("kern", "inputs"), HALF_PRECISION_PATTERNS, ids=_id)
def test_half_precision(kern: attnc.Kernel, inputs: Inputs, dtype: torch.dtype) -> None:
    q, k, v = qkv(2, 4, 2, 67, 67, 32, 32, dtype=dtype)
    check(kern, q, k, v, **inputs(2, 4, 67, 67))


@pytest.mark.parametrize("config", ["16,64", "64,16"])
def test_tile_shapes(monkeypatch: pytest.MonkeyPatch, config: str) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", config)
    q, k, v = qkv(1, 2, 1, 75, 90, 16, 16)
    for kern, inputs in SHAPE_PATTERNS[:3]:
        check(kern, q, k, v, **inputs(1, 2, 75, 90))


def test_a_given_scale_and_no_lse_gradient() -> None:
    q, k, v = qkv(1, 2, 2, 40, 40, 16)
    check(STD.sliding_window(window=7), q, k, v, scale=0.3)
    check(STD.sliding_window(window=7), q, k, v, lse_grad=False)


# ---- score functions and the gradients of inputs ---------------------------------------------------------

SCORES_SOURCE = """
fn softcap(x: float, cap: float) = cap * tanh(x / cap)

pattern alibi {
    input slopes: float32[NUM_HEADS]
    mask = kv <= q
    score = s - slopes[h] * (q - kv)
}
pattern relative_bias {
    input table: float32[127]
    input doc: int32[KV_LEN]
    mask = doc[q] == doc[kv]
    score = s + table[q - kv + 63] * 0.5
}
pattern full_bias {
    input bias: float32[NUM_HEADS, Q_LEN, KV_LEN]
    score = s + bias[h, q, kv]
}
pattern temperatures {
    input temp: float32[NUM_HEADS]
    input weight: float16[KV_LEN]
    mask = q - kv < 30 and kv <= q
    score = softcap(s / temp[h], 4.0) * weight[kv]
}
pattern kinks {
    input t: float32[NUM_HEADS]
    score = max(s, t[h]) + abs(s - 2.0) - min(s, 3.0) + sqrt(abs(s) + 1.0) + sigmoid(s) + exp2(s * 0.1)
}
pattern mask_only {
    input gate: float32[KV_LEN]
    mask = gate[kv] > 0.0
    score = s * 2.0
}
"""
SCORES = attnc.loads(SCORES_SOURCE)


def _tensor(shape: tuple[int, ...], seed: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(shape, generator=g)).to(DEVICE)


def test_alibi_slopes_get_their_gradient() -> None:
    q, k, v = qkv(2, 4, 2, 45, 45, 16)
    slopes = _tensor((4,), 1, 0.0, 0.5).requires_grad_()
    check(SCORES.alibi(), q, k, v, slopes=slopes)


def test_a_relative_bias_table_gets_its_gradient() -> None:
    q, k, v = qkv(1, 2, 1, 50, 50, 16)
    table = _tensor((127,), 2).requires_grad_()
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([12, 20, 3, 15])).to(torch.int32).to(DEVICE)
    check(SCORES.relative_bias(), q, k, v, table=table, doc=doc)


def test_a_bias_per_score_gets_its_gradient_with_cross_lengths() -> None:
    q, k, v = qkv(1, 3, 1, 29, 41, 16)
    bias = _tensor((3, 29, 41), 3).requires_grad_()
    check(SCORES.full_bias(), q, k, v, bias=bias)


def test_temperatures_and_half_precision_weights_through_a_soft_cap() -> None:
    q, k, v = qkv(2, 2, 1, 45, 45, 16)
    temp = _tensor((2,), 4, 0.5, 2.0).requires_grad_()
    weight = _tensor((45,), 5, 0.5, 1.5).to(torch.float16).requires_grad_()
    check(SCORES.temperatures(), q, k, v, temp=temp, weight=weight)


CONSTANT_SCORES = attnc.loads("""
pattern zero { mask = kv <= q
    score = 0.0 }
pattern per_head { input t: float32[NUM_HEADS]
    mask = q - kv < 9
    score = t[h] }
pattern per_query { score = q * 0.01 }
pattern per_key { mask = kv <= q
    score = kv * -0.02 + 1.0 }
pattern head_mask { mask = h * 0.25 < 0.3 }
""")


@pytest.mark.parametrize("name", ["zero", "per_head", "per_query", "per_key", "head_mask"])
def test_scores_that_do_not_read_s_or_a_whole_tile(name: str) -> None:
    """A score that is a constant, a row or a column is broadcast to the tile, and a mask of the head
    alone is a [1, 1] tile (the kernels once failed on both)."""
    from attnc.testing import compare

    kern = CONSTANT_SCORES[name]()
    q, k, v = qkv(1, 2, 1, 40, 40, 16)
    inputs = {"t": _tensor((2,), 6).requires_grad_()} if name == "per_head" else {}
    out, lse = kern(q, k, v, return_lse=True, **inputs)
    comparison = compare(kern, out.detach(), lse.detach(), q, k, v, **inputs)
    assert comparison.ok, comparison.describe()
    check(kern, q, k, v, **inputs)


ROW_BIASES = attnc.loads("""
pattern per_head { input t: float32[NUM_HEADS]
    mask = kv <= q
    score = s + t[h] }
pattern slopes { input t: float32[NUM_HEADS]
    mask = kv <= q
    score = s - t[h] * (q - kv) * 0.1 }
""")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["per_head", "slopes"])
def test_half_precision_input_gradients_use_an_exact_delta(name: str, dtype: torch.dtype) -> None:
    """An input's gradient sums dZ over whole rows, where Delta = rowsum(dO * O) from the rounded
    16-bit O does not cancel (a per-head bias's true gradient is the lse's alone): the dQ kernel then
    computes Delta from P and dP. The input gradients come out far better than the dense 16-bit
    computation (with the rounded O they were up to 2x worse)."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 2, 64, 32, generator=g).to(dtype) for _ in range(3))
        t = torch.rand(2, generator=g).requires_grad_()
        comparison = compare_gradients(ROW_BIASES[name](), q, k, v, seed=seed, t=t)
        assert comparison.ok, comparison.describe()
        error, dense, _ = comparison.errors["dt"]
        assert error < 0.1 * dense, comparison.describe()


def test_a_coarser_inputs_gradient_may_round_a_unit_of_its_own_dtype_apart() -> None:
    # A float16 input beside float32 q: the kernel rounds its float64 sum of the gradient to float16
    # once, the oracle its own sum, and sums a float32 rounding apart may round one float16 unit apart
    # (the fuzzer's kernel-d61b45df7fe6: 1.22e-4, a unit at 0.2). No more than that unit is admitted.
    unit = torch.finfo(torch.float16).eps * 0.25  # a float16 unit at values in [0.25, 0.5)
    errors = {"dt": (unit, 0.0, 0.3)}
    assert GradientComparison(torch.float32, errors, False, storage={"dt": torch.float16}).ok
    assert not GradientComparison(torch.float32, errors, False).ok
    far = {"dt": (2 * torch.finfo(torch.float16).eps, 0.0, 0.3)}
    assert not GradientComparison(torch.float32, far, False, storage={"dt": torch.float16}).ok
    # And compare_gradients says in which dtype each input's gradient is stored.
    half = attnc.loads("pattern p { input t: float16[NUM_HEADS]\n mask = kv <= q\n score = s + t[h] }").p()
    q, k, v = qkv(1, 1, 1, 20, 20, 8)
    t = torch.rand(1, dtype=torch.float16).requires_grad_()
    comparison = compare_gradients(half, q, k, v, t=t)
    assert comparison.ok and comparison.storage == {"dt": torch.float16}, comparison.describe()


def test_kinks_follow_pytorchs_conventions() -> None:
    """max/min split ties evenly and |x|' is 0 at 0: with q and k of 0s and 1s and scale 1, the
    scores are small integers, exactly, and meet t[h], 2 and 3 often."""
    g = torch.Generator().manual_seed(3)
    q, k = (
        torch.randint(0, 2, shape, generator=g).float().to(DEVICE) for shape in ((1, 2, 33, 8), (1, 1, 33, 8))
    )
    v = torch.randn(1, 1, 33, 8, generator=g).to(DEVICE)
    t = torch.tensor([1.0, 2.0], device=DEVICE).requires_grad_()
    check(SCORES.kinks(), q, k, v, scale=1.0, t=t)


def test_only_inputs_that_require_grad_get_one() -> None:
    q, k, v = qkv(1, 2, 1, 30, 30, 16)
    temp = _tensor((2,), 6, 0.5, 2.0)
    weight = _tensor((30,), 7, 0.5, 1.5).to(torch.float16).requires_grad_()
    kern = SCORES.temperatures()
    out = kern(q, k, v, temp=temp, weight=weight)
    (dweight,) = torch.autograd.grad(out.sum(), [weight])
    assert dweight.dtype == torch.float16 and dweight.abs().sum() > 0
    assert temp.grad is None
    check(kern, q, k, v, temp=temp, weight=weight)


def test_a_mask_only_input_that_requires_grad_is_an_error() -> None:
    q, k, v = qkv(1, 1, 1, 8, 8, 16)
    gate = torch.ones(8, device=DEVICE, requires_grad=True)
    with pytest.raises(InputError, match="input 'gate' requires grad, but it has no gradient") as err:
        SCORES.mask_only()(q, k, v, gate=gate)
    assert err.value.loc is not None  # the input's declaration
    assert err.value.loc.line == SCORES_SOURCE.splitlines().index("    input gate: float32[KV_LEN]") + 1
    out = SCORES.mask_only()(q, k, v, gate=gate.detach())  # detached, it is fine
    assert out.shape == q.shape


# ---- empty rows, determinism, custom op and torch.compile ------------------------------------------------


def test_rows_that_see_no_key_get_zero_gradients_never_nan() -> None:
    # Bottom-right causal with more queries than keys: the first 20 queries see nothing.
    q, k, v = qkv(1, 2, 1, 50, 30, 16)
    dq, dk, dv = grads(STD.causal_bottom_right(), q, k, v)
    assert not any(g.isnan().any() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, :20], torch.zeros_like(dq[:, :, :20]))
    check(STD.causal_bottom_right(), q, k, v)
    false = attnc.loads("pattern never { mask = kv > q + 1000 }").never()
    dq, dk, dv = grads(false, q, k, v)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in (dq, dk, dv))


@pytest.mark.parametrize(("kern", "inputs"), [(STD.causal(), no_inputs), (DOCUMENT, documents)], ids=_id)
def test_gradients_are_deterministic(kern: attnc.Kernel, inputs: Inputs) -> None:
    q, k, v = qkv(2, 4, 1, 70, 70, 16)
    first = grads(kern, q, k, v, **inputs(2, 4, 70, 70))
    second = grads(kern, q, k, v, **inputs(2, 4, 70, 70))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_backward_kernels_skip_the_mask_on_full_tiles() -> None:
    for kern in (STD.sliding_window(window=40), DOCUMENT):
        spec = build_backward_spec(kern.pattern)
        assert spec.dq_masked.mask is not None and spec.dkv_masked.mask is not None
        assert spec.dq_full.mask is None and spec.dkv_full.mask is None
        checked_code(render(spec, "attention_bwd.py.jinja"), spec, "attention_bwd.py.jinja")  # parses


def test_the_score_derivative_is_symbolic_in_the_ir() -> None:
    fused = GEMMA.gemma_local(window=8, cap=50.0).ir(after="fuse")
    assert ", dscore = %" in fused and "tanh" in fused


def test_custom_op_is_registered_with_a_fake_implementation() -> None:
    q, k, v = qkv(1, 2, 1, 20, 20, 16)
    torch.library.opcheck(
        torch.ops.attnc.attention.default,
        (q, k, v, [], STD.causal()._op_pattern, 0.25, [], NO_FLOATS),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_the_backward_op_has_a_faithful_fake_implementation() -> None:
    """opcheck on the backward op, and the fake's strides are the real op's (opcheck does not compare
    strides): here with a dense but permuted input, whose gradient comes back contiguous."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kern = SCORES.full_bias()
    q, k, v = qkv(1, 2, 1, 20, 24, 16)
    bias = _tensor((24, 20, 2), 7).permute(2, 1, 0)
    out, lse = torch.ops.attnc.attention(q, k, v, [bias], kern._op_pattern, 0.25, [], NO_FLOATS)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    args = (q, k, v, out, lse, dout, dlse, [bias], kern._op_pattern, 0.25, [], NO_FLOATS, [True])
    op = torch.ops.attnc.attention_backward.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(
            *[
                [mode.from_tensor(t) for t in a]
                if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                else mode.from_tensor(a)
                if isinstance(a, torch.Tensor)
                else a
                for a in args
            ]
        )
    assert [t.stride() for t in fake] == [t.stride() for t in real]


class _Block(torch.nn.Module):
    def __init__(self, kern: attnc.Kernel) -> None:
        super().__init__()
        self.kern = kern
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
        q = self.proj(x)
        return self.kern(q, x, x, slopes=slopes).sum(dim=1)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(compiler: str) -> None:
    """No graph break around attnc (fullgraph=True), and the compiled model's values and gradients
    are the eager model's."""
    torch._dynamo.reset()
    block = _Block(SCORES.alibi()).to(DEVICE)
    x = torch.randn(1, 2, 24, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    slopes = torch.tensor([0.1, 0.3], device=DEVICE, requires_grad=True)
    eager = block(x, slopes)
    eager_grads = torch.autograd.grad(eager.square().sum(), [slopes, block.proj.weight])
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    out = compiled(x, slopes)
    out_grads = torch.autograd.grad(out.square().sum(), [slopes, block.proj.weight])
    torch.testing.assert_close(out, eager)
    for a, b in zip(out_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_reference_passes_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    kern = GEMMA.gemma_local(window=4, cap=2.0)
    assert torch.autograd.gradcheck(lambda q, k, v: kern.reference(q, k, v), (q, k, v))


def test_the_tolerance_knows_the_shift_by_the_stored_output() -> None:
    """Delta from the output rounded to bf16 shifts dq and dk (through the lse's path), never dv; in
    float32 the shift is at the level of float32's rounding."""
    q, k, v = qkv(1, 2, 1, 3, 5, 16, dtype=torch.bfloat16, seed=4)
    shifts = compare_gradients(STD.full(), q, k, v, seed=1).stored
    assert shifts["dv"] == 0.0 and shifts["dq"] > 1e-4 and shifts["dk"] > 1e-4
    q, k, v = (t.float() for t in (q, k, v))
    shifts = compare_gradients(STD.full(), q, k, v, seed=1).stored
    assert max(shifts.values()) < 1e-6
