"""Runtime parameters in the compiler: an int or float pattern parameter is a kernel argument, not a
constant, so every value of it shares one compiled kernel; `static` ones (and bools) specialise it.

The kernels are driven below the Python API here (`compile_pattern`, then the launchers with an
`oracle.Env` whose `params` holds the runtime values), and judged by the dense oracle on the same
`Env`: tiny shapes, Triton's interpreter without a GPU.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
import torch

import attnc
from attnc import oracle
from attnc.codegen.lower import _check_structure, build_backward_spec, render
from attnc.compiler import CompiledPattern, compile_pattern
from attnc.errors import AttnSyntaxError
from attnc.ir.nodes import Op
from attnc.runtime import cache
from attnc.runtime.launch import Forward
from attnc.runtime.plan import PARTIAL, make_plan
from attnc.testing import tile_classes

BACKWARD_TEMPLATE = "attention_bwd.py.jinja"
ATOL = 2e-5  # float32 kernels against the float64 oracle, at 40 keys per row
GRAD_ATOL = 2e-4


def compiled(
    source: str, name: str, specialize: frozenset[str] = frozenset(), **values: object
) -> CompiledPattern:
    pattern = attnc.loads(source)[name]
    return compile_pattern(pattern._module_ir, pattern._bind((), values), specialize=specialize)


def env_for(
    q: torch.Tensor, k: torch.Tensor, params: dict[str, int | float], **inputs: torch.Tensor
) -> oracle.Env:
    return oracle.Env(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device, inputs, params=params)


def qkv(q_len: int = 40, kv_len: int = 40, heads: int = 1, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, 16, generator=g) for n in (q_len, kv_len, kv_len)]


def check_forward(c: CompiledPattern, params: dict[str, int | float], **inputs: torch.Tensor) -> torch.Tensor:
    """Run the forward kernel with these runtime values and hold it to the oracle; return its output."""
    q, k, v = qkv()
    env = env_for(q, k, params, **inputs)
    out, lse = Forward(c.entry.name, c.entry, c.spec, c.source).run(q, k, v, env, 0.25)
    ref, ref_lse = oracle.attention(c.entry, env_for(q, k, params, **inputs), q, k, v, 0.25)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"rows without keys differ at {params}"
    assert (out[empty] == 0).all()
    assert (out.double() - ref).abs().max().item() <= ATOL, f"output differs from the oracle at {params}"
    assert ((lse.double() - ref_lse).abs()[~empty] <= ATOL).all()
    return out


def check_backward(c: CompiledPattern, params: dict[str, int | float], **inputs: torch.Tensor) -> None:
    """The backward kernels' dq, dk, dv with these runtime values against autograd through the oracle."""
    q, k, v = qkv(seed=1)
    g = torch.Generator().manual_seed(2)
    dout, dlse = torch.randn(1, 1, 40, 16, generator=g), torch.randn(1, 1, 40, generator=g)
    forward = Forward(c.entry.name, c.entry, c.spec, c.source)
    env = env_for(q, k, params, **inputs)
    out, lse = forward.run(q, k, v, env, 0.25)
    dq, dk, dv, _ = forward.backward.run(q, k, v, out, lse, dout, dlse, env, 0.25, ())
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = oracle.attention(c.entry, env_for(q, k, params, **inputs), *leaves, 0.25)
    seen = ~torch.isneginf(ref_lse)
    loss = (ref * dout.double()).sum() + (ref_lse[seen] * dlse.double()[seen]).sum()
    expected = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), expected, strict=True):
        assert (got.double() - want).abs().max().item() <= GRAD_ATOL, f"{name} differs at {params}"


STREAMING = """
pattern streaming(window: int, sinks: int) {
    mask = kv <= q and (q - kv < window or kv < sinks)
}
"""


# ---- kernels against the oracle -----------------------------------------------------------------------


@pytest.mark.parametrize(("window", "sinks"), [(5, 2), (1, 0), (0, 0), (-3, 1), (0, 3), (64, 4)])
def test_runtime_int_parameters_in_the_mask_match_the_oracle(window: int, sinks: int) -> None:
    c = compiled(STREAMING, "streaming", window=1, sinks=1)
    check_forward(c, {"window": window, "sinks": sinks})


@pytest.mark.parametrize(("left", "right", "prefix"), [(3, 0, 2), (-2, 5, 0), (3, -5, 0), (0, 0, -4)])
def test_closed_form_ranges_symbolic_in_runtime_parameters_match_the_oracle(
    left: int, right: int, prefix: int
) -> None:
    # Analytic: the kernel computes its key ranges from the values (negative ones, empty windows too).
    c = compiled(
        """
        pattern p(left: int, right: int, prefix: int) {
            mask = q - left <= kv <= q + right or kv < prefix
        }
        """,
        "p",
        left=1,
        right=1,
        prefix=1,
    )
    assert c.spec.analytic
    check_forward(c, {"left": left, "right": right, "prefix": prefix})


def test_runtime_int_and_float_parameters_in_the_score_match_the_oracle() -> None:
    c = compiled(
        """
        pattern p(window: int, slope: float, offset: int) {
            mask = abs(q - kv) < window
            score = s * slope - 0.125 * abs(q - kv - offset)
        }
        """,
        "p",
        window=1,
        slope=1.0,
        offset=0,
    )
    for values in ({"window": 7, "slope": 1.5, "offset": 0}, {"window": 40, "slope": -0.75, "offset": -3}):
        check_forward(c, values)


@pytest.mark.parametrize("period", [3, -4, 1, 0])
def test_division_by_a_runtime_int_keeps_floor_semantics_and_zero_divisors(period: int) -> None:
    # `a // 0 == 0` and `a % 0 == a`: with period 0 the mask is `kv <= q and q - kv == 0 ...`.
    c = compiled(
        """
        pattern p(period: int) {
            mask = (q - kv) % period == 0 or (kv - q) // period == 2
        }
        """,
        "p",
        period=2,
    )
    check_forward(c, {"period": period})


def test_a_runtime_float_parameter_reaches_the_mask_as_exact_float64() -> None:
    # 3 * 0.1 is 0.30000000000000004 in float64, above the float64 0.3 but below its float32 rounding
    # (0.30000001...): a threshold passed as float32 would let q - kv == 3 through.
    c = compiled(
        """
        pattern p(radius: float) {
            mask = kv <= q and (q - kv) * 0.1 < radius
        }
        """,
        "p",
        radius=1.0,
    )
    q, k, _ = qkv()
    allowed = oracle.mask(c.entry, env_for(q, k, {"radius": 0.3}))[0, 0]
    assert not allowed[10, 7] and allowed[10, 8]  # the float64 boundary the kernel must meet
    check_forward(c, {"radius": 0.3})


def test_backward_kernels_take_runtime_int_and_float_parameters() -> None:
    c = compiled(
        """
        pattern p(window: int, sinks: int, slope: float) {
            mask = kv <= q and (q - kv < window or kv < sinks)
            score = s * slope
        }
        """,
        "p",
        window=1,
        sinks=1,
        slope=1.0,
    )
    check_backward(c, {"window": 6, "sinks": 2, "slope": 0.5})
    check_backward(c, {"window": -1, "sinks": 0, "slope": -2.0})


# ---- one kernel for every value ------------------------------------------------------------------------


def _misses() -> int:
    return cache.STATS.renders + cache.STATS.disk_hits


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    cache.clear_memory()


@pytest.mark.usefixtures("fresh_cache")
def test_sweeping_sliding_window_over_32_windows_renders_one_kernel() -> None:
    pattern = attnc.stdlib()["sliding_window"]
    before = _misses()
    keys = {
        compile_pattern(pattern._module_ir, pattern._bind((), {"window": w})).source.key
        for w in range(1, 33 * 7, 7)
    }
    assert len(keys) == 1
    assert _misses() - before == 1


@pytest.mark.usefixtures("fresh_cache")
def test_sweeping_streaming_llm_over_8_pairs_renders_one_kernel() -> None:
    pattern = attnc.load("examples/streaming_llm.attn")["streaming_llm"]
    before = _misses()
    pairs = [(64, 0), (128, 1), (256, 4), (512, 4), (1024, 4), (1024, 8), (4096, 16), (3, 2)]
    keys = {compile_pattern(pattern._module_ir, pattern._bind((w, s), {})).source.key for w, s in pairs}
    assert len(keys) == 1
    assert _misses() - before == 1


# Run with Triton's GPU compiler (TRITON_INTERPRET=0; no GPU needed): Triton's launch binder's
# specialization of a forward launch for each float value, what keys Triton's compiled kernels.
_FLOAT_SPECIALIZATIONS = """
import json, sys, torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from attnc.api import loads
from attnc.testing import static

kern = loads("pattern p(t: float) {\\n score = s * t\\n}\\n").p(t=1.0)
q = torch.zeros(1, 1, 64, 64, dtype=torch.bfloat16)
backend = make_backend(GPUTarget("cuda", 90, 32))
found = []
for t in json.loads(sys.argv[1]):
    env = kern._env(64, 64, 1, 1, {}, {"t": t}, q.device)
    launches = []
    with static._recording(launches, static.first_config(static.Job("causal", 64))):
        kern._forward.run(q, q, q, env, 0.125)
    (launch,) = launches
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    found.append(str(binder(*launch.args, debug=False, **launch.kwargs)[1]))
print(json.dumps(found))
"""


def test_every_value_of_a_runtime_float_compiles_to_one_triton_kernel() -> None:
    # A float goes in as its int64 bit pattern; 0.0's is 0 and the smallest subnormals' are small,
    # which Triton would type int32 (a second compile) were the argument not declared int64.
    values = [1.0, 0.0, -0.0, 5e-324, -2.5, float("inf")]
    child = subprocess.run(
        [sys.executable, "-c", _FLOAT_SPECIALIZATIONS, json.dumps(values)],
        env={**os.environ, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    assert len(set(json.loads(child.stdout))) == 1


@pytest.mark.usefixtures("fresh_cache")
def test_a_static_parameter_still_specialises_the_kernel() -> None:
    pattern = attnc.stdlib()["dilated"]
    before = _misses()
    keys = {
        compile_pattern(pattern._module_ir, pattern._bind((w, d), {})).source.key
        for w, d in [(3, 2), (5, 2), (3, 3), (9, 3)]
    }
    assert len(keys) == 2  # one per dilation; the window is runtime
    assert _misses() - before == 2


def test_specialising_a_runtime_parameter_makes_it_a_constant() -> None:
    pattern = attnc.stdlib()["sliding_window"]
    values = pattern._bind((), {"window": 64})
    runtime = compile_pattern(pattern._module_ir, values)
    special = compile_pattern(pattern._module_ir, values, specialize=frozenset({"window"}))
    assert special.stages["bind-params"].splitlines()[0] == "pattern stdlib.sliding_window[window=64] {"
    assert "!window" not in special.stages["bind-params"] and "lt(%1, 64)" in special.stages["bind-params"]
    assert runtime.source.key != special.source.key


# ---- what the IR and the kernel show -----------------------------------------------------------------


def test_the_bound_ir_shows_static_values_and_runtime_parameters() -> None:
    c = compiled(
        """
        pattern p(window: int, static stride: int, temp: float = 2.0, causal_only: bool = true) {
            mask = where(causal_only, kv <= q, true) and q // stride - kv // stride < window
            score = s * temp
        }
        """,
        "p",
        window=3,
        stride=4,
    )
    text = c.stages["bind-params"]
    assert text.splitlines()[0] == "pattern p[stride=4, causal_only=true](window: int, temp: float = 2.0) {"
    assert "!window" in text and "!temp" in text and "$" not in text
    assert [p.name for p in c.entry.params] == ["window", "temp"]
    assert dict(c.entry.bindings or ()) == {"stride": 4, "causal_only": True}
    assert {n.attr for n in c.entry.mask.walk() if n.op is Op.PARAM} == {"window"}  # type: ignore[union-attr]


def test_the_unbound_ir_shows_which_parameters_are_static() -> None:
    c = compiled("pattern p(a: int, static c: int) {\n    mask = q - kv < a * c\n}\n", "p", a=1, c=2)
    assert c.stages["inline"].splitlines()[0] == "pattern p(a: int, static c: int) {"


def test_a_parameter_in_an_input_shape_is_static() -> None:
    c = compiled(
        """
        pattern p(n: int, window: int) {
            input bias: float32[2 * n + 1]
            mask = q - kv < window
            score = s + bias[clamp(q - kv, -n, n) + n]
        }
        """,
        "p",
        n=3,
        window=5,
    )
    assert dict(c.entry.bindings or ()) == {"n": 3}
    assert [p.name for p in c.entry.params] == ["window"]


def test_no_parameter_name_reaches_the_rendered_kernels() -> None:
    c = compiled(
        """
        pattern p(zq_window_size: int, zq_slope: float) {
            mask = kv <= q and q - kv < zq_window_size
            score = s * zq_slope
        }
        """,
        "p",
        zq_window_size=1,
        zq_slope=1.0,
    )
    backward_spec = build_backward_spec(c.entry)
    for spec, text in ((c.spec, c.source.text), (backward_spec, render(backward_spec, BACKWARD_TEMPLATE))):
        assert "zq_" not in text
        assert [(p.arg, p.type) for p in spec.params] == [("param_0", "int"), ("param_1", "float")]
        assert '"param_0",' in text and '"param_1",' in text  # in do_not_specialize


def test_the_structure_check_rejects_a_kernel_whose_parameter_arguments_differ_from_the_spec() -> None:
    c = compiled(STREAMING, "streaming", window=1, sinks=1)
    template = "attention_fwd.py.jinja"
    _check_structure(ast.parse(c.source.text), c.spec, template)
    # The kernel's def no longer matches its argument description (codegen/signature.py), checked first.
    with pytest.raises(ValueError, match=r"attnc_fwd's parameters differ .*'param_7'.*'param_1'"):
        _check_structure(ast.parse(c.source.text.replace("param_1", "param_7")), c.spec, template)


# ---- plans ---------------------------------------------------------------------------------------------

WINDOWED_DOCUMENTS = """
pattern p(window: int) {
    input doc: int32[BATCH, KV_LEN]
    mask = doc[b, q] == doc[b, kv] and kv <= q and q - kv < window
}
"""
"""A metadata pattern (its mask loads an input) whose tiles depend on a runtime window."""


def test_plans_of_a_metadata_pattern_follow_the_runtime_value() -> None:
    c = compiled(
        WINDOWED_DOCUMENTS,
        "p",
        window=1,
    )
    assert not c.spec.analytic
    q, k, _ = qkv()
    doc = torch.tensor([[0] * 25 + [1] * 15], dtype=torch.int32)
    plans = []
    for window in (1, 30):
        env = env_for(q, k, {"window": window}, doc=doc)
        planned = make_plan(c.entry, env, (16, 16)).block_map()
        exact = tile_classes(oracle.mask(c.entry, env), (16, 16))
        planned = planned.expand_as(exact)
        assert ((planned == exact) | (planned == PARTIAL)).all(), f"plan claims a wrong class at {window}"
        plans.append(planned)
        check_forward(c, {"window": window}, doc=doc)
    assert not torch.equal(plans[0], plans[1])


def test_backward_of_a_metadata_pattern_plans_with_the_runtime_value() -> None:
    c = compiled(
        WINDOWED_DOCUMENTS,
        "p",
        window=1,
    )
    doc = torch.tensor([[0] * 25 + [1] * 15], dtype=torch.int32)
    for window in (1, 30):
        check_backward(c, {"window": window}, doc=doc)


# ---- the syntax ----------------------------------------------------------------------------------------


def test_static_is_for_pattern_parameters_only() -> None:
    with pytest.raises(AttnSyntaxError, match="'static' is for pattern parameters") as err:
        attnc.loads("fn f(static x: int) = x\n")
    assert err.value.loc is not None and (err.value.loc.line, err.value.loc.col) == (1, 6)


def test_an_unknown_parameter_modifier_is_a_located_syntax_error() -> None:
    with pytest.raises(AttnSyntaxError, match="the only modifier is 'static'") as err:
        attnc.loads("pattern p(const w: int) {\n    mask = q - kv < w\n}\n")
    assert err.value.loc is not None and (err.value.loc.line, err.value.loc.col) == (1, 11)
