"""Runtime parameters from Python and torch (issue 16, item 4): binding checks a runtime int's range,
a call may give a runtime parameter another value (kernel, oracle, mask, tile map, plan, gradients), a
static one is bound once, a runtime parameter cannot take a name of the calls' keywords, a sweep of
runtime values runs the passes once, and `torch.compile` traces one graph for all values.

The judge is the oracle of a kernel bound to the value a call gives (`mod.p(window=9).reference`)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from cases import DEVICE, compile_counter

import attnc
from attnc import DuplicateError, InputError, ParameterError
from attnc.errors import AttnError
from attnc.passes.manager import PassManager
from attnc.runtime.launch import Forward
from attnc.testing import compare

SOURCE = (
    "pattern band(window: int = 4, sinks: int = 2, static dilation: int = 1, temperature: float = 1.0) {\n"
    "    mask = kv <= q and (q - kv) % dilation == 0 and (q - kv < window or kv < sinks)\n"
    "    score = s / temperature\n"
    "}\n"
)
MOD = attnc.loads(SOURCE)
KERN = MOD.band()


def _column(name: str) -> int:
    """The column of a parameter's declaration on the first line (where its errors point)."""
    return SOURCE.index(f"{name}:") + 1


def _raised(call: Any) -> AttnError:
    with pytest.raises(AttnError) as info:
        call()
    return info.value


def _qkv(length: int = 24, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(1, 1, length, 16, generator=g).to(DEVICE).requires_grad_(requires_grad) for _ in range(3)
    )


def _check(kern: attnc.Kernel, bound: attnc.Kernel, **values: Any) -> None:
    """`kern` called with `values` is attention with `bound`'s pattern, by the tests' tolerance rule."""
    q, k, v = _qkv()
    out, lse = kern(q, k, v, return_lse=True, **values)
    comparison = compare(bound, out, lse, q, k, v)
    assert comparison.ok, comparison.describe()


# ---- binding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [2**30 + 1, -(2**30) - 1, 2**62])
def test_a_runtime_int_outside_plus_or_minus_2_to_the_30_is_a_located_parameter_error(value: int) -> None:
    err = _raised(lambda: MOD.band(window=value))
    assert type(err) is ParameterError and (err.loc.line, err.loc.col) == (1, _column("window")), err
    assert err.reason == (
        f"parameter 'window' of pattern 'band' is a runtime int: it must lie in [-2**30, 2**30], "
        f"got {value} (a `static` parameter may take any int64 value)"
    )
    end = max(-(2**30), min(value, 2**30))
    assert MOD.band(window=end).params["window"] == end  # the ends are in the range
    assert MOD.band(dilation=value).params["dilation"] == value  # a static int may take any int64


def test_a_runtime_int_default_outside_its_range_is_a_located_parameter_error() -> None:
    err = _raised(lambda: attnc.loads("pattern p(window: int = 2000000000) { mask = q - kv < window }").p())
    assert type(err) is ParameterError and (err.loc.line, err.loc.col) == (1, 11), err
    assert "must lie in [-2**30, 2**30], got 2000000000" in err.reason


# ---- call-time values ----------------------------------------------------------------------------------


def test_a_call_time_int_value_overrides_the_kernels_own() -> None:
    _check(KERN, MOD.band(window=9, sinks=0), window=9, sinks=0)


def test_a_call_time_float_value_overrides_the_kernels_own() -> None:
    _check(KERN, MOD.band(temperature=0.25), temperature=0.25)


def test_a_call_time_value_lasts_one_call() -> None:
    q, k, v = _qkv()
    KERN(q, k, v, window=1, sinks=0)
    assert KERN.params["window"] == 4
    _check(KERN, MOD.band())


def test_the_reference_takes_call_time_values() -> None:
    q, k, v = _qkv()
    torch.testing.assert_close(
        KERN.reference(q, k, v, window=3, temperature=2.0),
        MOD.band(window=3, temperature=2.0).reference(q, k, v),
        rtol=0,
        atol=0,
    )


def test_the_mask_takes_call_time_values() -> None:
    assert torch.equal(KERN.mask(20, 20, window=7, sinks=1), MOD.band(window=7, sinks=1).mask(20, 20))


def test_the_block_map_takes_call_time_values() -> None:
    got = KERN.block_map(64, 64, block=(16, 16), window=20, sinks=0)
    assert torch.equal(got, MOD.band(window=20, sinks=0).block_map(64, 64, block=(16, 16)))
    assert not torch.equal(got, KERN.block_map(64, 64, block=(16, 16)))


def test_the_plan_takes_call_time_values() -> None:
    got = KERN.plan(64, 64, block=(16, 16), window=20, sinks=0).block_map()
    assert torch.equal(got, MOD.band(window=20, sinks=0).plan(64, 64, block=(16, 16)).block_map())


def test_gradients_use_the_call_time_value() -> None:
    q, k, v = _qkv(requires_grad=True)
    grads = torch.autograd.grad(KERN(q, k, v, window=6, temperature=0.5).square().sum(), (q, k, v))
    bound = MOD.band(window=6, temperature=0.5)
    expected = torch.autograd.grad(bound.reference(q, k, v).square().sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_gradients_flow_where_a_pattern_has_int_parameters_only() -> None:
    """One list of runtime values empty, the other not: `torch.library` checks each one's gradient."""
    kern = attnc.stdlib().sliding_window(window=3)
    q, k, v = _qkv(requires_grad=True)
    grads = torch.autograd.grad(kern(q, k, v, window=5).sum(), (q, k, v))
    expected = attnc.stdlib().sliding_window(window=5).reference(q, k, v)
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_a_static_parameter_at_call_time_is_a_located_input_error() -> None:
    q, k, v = _qkv()
    err = _raised(lambda: KERN(q, k, v, dilation=2))
    assert type(err) is InputError and (err.loc.line, err.loc.col) == (1, _column("dilation")), err
    assert err.reason == "parameter 'dilation' is static: bind it with mod.band(dilation=...)"


def test_a_runtime_int_outside_its_range_at_call_time_is_a_located_input_error() -> None:
    err = _raised(lambda: KERN.mask(8, 8, window=2**31))
    assert type(err) is InputError and (err.loc.line, err.loc.col) == (1, _column("window")), err
    assert "is a runtime int: it must lie in [-2**30, 2**30], got 2147483648" in err.reason


def test_a_call_time_value_of_the_wrong_type_is_a_located_input_error() -> None:
    err = _raised(lambda: KERN.mask(8, 8, window=2.5))
    assert type(err) is InputError and (err.loc.line, err.loc.col) == (1, _column("window")), err
    assert err.reason == "parameter 'window' of pattern 'band' is int, got float 2.5"


def test_an_unknown_keyword_lists_the_inputs_and_runtime_parameters() -> None:
    err = _raised(lambda: KERN.mask(8, 8, widnow=3))
    assert type(err) is InputError
    assert err.reason == (
        "pattern 'band' has no input or runtime parameter 'widnow' (its inputs: none; its runtime "
        "parameters: window, sinks, temperature)"
    )


# ---- reserved names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scale", "block", "batch", "device", "q_len", "return_lse", "inputs"])
def test_a_runtime_parameter_named_like_a_keyword_of_the_kernel_calls_is_a_located_error(name: str) -> None:
    err = _raised(lambda: attnc.loads(f"pattern p(n: int = 1, {name}: int = 2) {{ mask = q - kv < {name} }}"))
    assert type(err) is DuplicateError and (err.loc.line, err.loc.col) == (1, 23), err
    assert err.reason == (
        f"'{name}' is reserved: a runtime parameter may be given by keyword to kern(...) and its methods, "
        f"where '{name}' is a keyword; declare it 'static {name}' or choose another name"
    )


def test_a_static_parameter_may_take_a_keyword_of_the_kernel_calls() -> None:
    kern = attnc.loads("pattern p(static block: int = 2) { mask = q - kv < block and kv <= q }").p(block=3)
    assert torch.equal(kern.mask(8, 8), attnc.stdlib().sliding_window(window=3).mask(8, 8))


# ---- one compilation for a sweep -----------------------------------------------------------------------


@pytest.fixture
def pipeline_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The entry names of every pipeline run from now on."""
    runs: list[str] = []
    run = PassManager.run

    def counted(self: PassManager, module: Any) -> Any:
        runs.append(module.entry.name)
        return run(self, module)

    monkeypatch.setattr(PassManager, "run", counted)
    return runs


def test_a_sweep_of_runtime_values_runs_the_passes_once(pipeline_runs: list[str]) -> None:
    mod = attnc.loads(SOURCE)
    kernels = [mod.band(window=w, sinks=w % 3, temperature=w / 7) for w in range(1, 9)]
    assert pipeline_runs == ["band"]
    assert [k.params["window"] for k in kernels] == list(range(1, 9))
    _check(kernels[-1], MOD.band(window=8, sinks=2, temperature=8 / 7))


def test_a_new_static_value_runs_the_passes_again(pipeline_runs: list[str]) -> None:
    mod = attnc.loads(SOURCE)
    mod.band(dilation=2)
    mod.band(dilation=2, window=5)
    mod.band(dilation=3)
    assert pipeline_runs == ["band", "band"]


# ---- how a kernel shows its parameters ------------------------------------------------------------------


def test_repr_marks_the_static_parameters() -> None:
    kern = MOD.band(window=8, dilation=2)
    assert repr(kern) == "<attnc.Kernel band(window=8, sinks=2, static dilation=2, temperature=1.0)>"
    assert kern.params == {"window": 8, "sinks": 2, "dilation": 2, "temperature": 1.0}


def test_runtime_params_lists_the_runtime_parameters_in_order() -> None:
    assert KERN.runtime_params == ("window", "sinks", "temperature")


def test_pattern_repr_marks_the_static_parameters() -> None:
    assert (
        repr(MOD.band)
        == "<attnc.Pattern band(window: int, sinks: int, static dilation: int, temperature: float)>"
    )


# ---- torch.compile -------------------------------------------------------------------------------------


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The keys of every forward kernel launched from now on."""
    keys: set[str] = set()
    run = Forward.run

    def recorded(self: Forward, *args: Any, **kwargs: Any) -> Any:
        keys.add(self.source.key)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Forward, "run", recorded)
    return keys


def test_a_compiled_call_with_three_windows_compiles_at_most_twice(launched: set[str]) -> None:
    """The second value makes the window dynamic (a SymInt through the custom op); the third reuses it."""
    counter = compile_counter()
    f = torch.compile(lambda q, k, v, w: KERN(q, k, v, window=w), backend=counter)
    q, k, v = _qkv()
    for window in (3, 7, 11):
        torch.testing.assert_close(f(q, k, v, window), MOD.band(window=window).reference(q, k, v))
    assert counter.frame_count <= 2
    assert launched == {KERN._key}


def test_a_fullgraph_compiled_call_with_a_window_gives_the_oracles_gradients() -> None:
    counter = compile_counter()
    f = torch.compile(lambda q, k, v, w: KERN(q, k, v, window=w, sinks=0), fullgraph=True, backend=counter)
    for window in (2, 5, 9):
        q, k, v = _qkv(requires_grad=True)
        out = f(q, k, v, window)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        bound = MOD.band(window=window, sinks=0)
        expected = bound.reference(q, k, v)
        torch.testing.assert_close(out, expected)
        for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v)), strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert counter.frame_count <= 2


def test_a_compiled_call_with_new_float_values_matches_the_oracle() -> None:
    """Dynamo specialises a float argument (one graph per value, as for `scale`): never a stale one."""
    f = torch.compile(lambda q, k, v, t: KERN(q, k, v, temperature=t), backend=compile_counter())
    q, k, v = _qkv()
    for temperature in (0.5, 2.0, 3.0):
        torch.testing.assert_close(
            f(q, k, v, temperature), MOD.band(temperature=temperature).reference(q, k, v)
        )


INHERITED = attnc.loads(
    """
pattern inner(n: int) {
    input t: int32[n]
    mask = t[kv] > 0 and kv < n
}
pattern outer(m: int) {
    mask = inner(m)
}
"""
)


def test_a_parameter_that_shapes_an_input_of_a_referenced_pattern_is_static() -> None:
    """`m` reaches an input's shape only after inlining: bind-params specialises on it, so the API must
    not take it for runtime and hand `outer(m=8)` the pipeline compiled for `m=4` (a mask of 4 keys)."""
    assert INHERITED.outer.static_names == frozenset({"m"})
    four, eight = INHERITED.outer(m=4), INHERITED.outer(m=8)
    assert eight.runtime_params == ()
    assert eight.ir("bind-params").splitlines()[0] == "pattern outer[m=8] {"
    t = torch.ones(8, dtype=torch.int32)
    assert int(eight.mask(10, 10, t=t).sum()) == 10 * 8
    assert int(four.mask(10, 10, t=t[:4]).sum()) == 10 * 4


def test_a_float_given_as_a_tensor_keeps_one_compiled_graph_for_all_values() -> None:
    """A 0-d CPU tensor reaches the op as a graph input (`float_params`), where a Python float would be
    specialised: four temperatures, one graph, each the oracle's attention."""
    counter = compile_counter()
    f = torch.compile(lambda q, k, v, t: KERN(q, k, v, temperature=t), fullgraph=True, backend=counter)
    q, k, v = _qkv()
    for temperature in (0.5, 2.0, 3.0, 7.25):
        got = f(q, k, v, torch.tensor(temperature))
        torch.testing.assert_close(got, MOD.band(temperature=temperature).reference(q, k, v))
    assert counter.frame_count == 1


def test_a_float_given_as_a_tensor_keeps_one_graph_with_a_plan() -> None:
    """Under `torch.compile` a plan is checked, not used (the op plans for itself), and a tensor's
    value is a graph input unknown while tracing: the check leaves it, so `fullgraph=True` holds."""
    counter = compile_counter()
    q, k, v = _qkv()
    plan = KERN.plan(24, 24, block=(16, 16))
    f = torch.compile(
        lambda q, k, v, t: KERN(q, k, v, temperature=t, plan=plan), fullgraph=True, backend=counter
    )
    for temperature in (1.0, 2.5):
        got = f(q, k, v, torch.tensor(temperature))
        torch.testing.assert_close(got, MOD.band(temperature=temperature).reference(q, k, v))
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.int64])
def test_a_float_given_as_a_tensor_is_its_value(dtype: torch.dtype) -> None:
    q, k, v = _qkv()
    value = torch.tensor(3, dtype=dtype)
    torch.testing.assert_close(KERN(q, k, v, temperature=value), KERN(q, k, v, temperature=3.0))
    torch.testing.assert_close(
        KERN.reference(q, k, v, temperature=value), MOD.band(temperature=3.0).reference(q, k, v)
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.tensor([2.0]), "0-d real tensor on the CPU .* got 1-d float32 on cpu"),
        (torch.tensor(True), "0-d real tensor on the CPU .* got 0-d bool on cpu"),
        (torch.tensor(2.0, dtype=torch.complex64), "0-d real tensor on the CPU .* got 0-d complex64"),
        (torch.tensor(2.0, requires_grad=True), "takes no gradient: pass the tensor detached"),
    ],
    ids=["1-d", "bool", "complex", "requires-grad"],
)
def test_a_float_given_as_a_wrong_tensor_is_a_located_error(value: torch.Tensor, message: str) -> None:
    q, k, v = _qkv()
    error = _raised(lambda: KERN(q, k, v, temperature=value))
    assert isinstance(error, InputError)
    assert re.search(message, str(error)), str(error)
    assert error.loc is not None and error.loc.col == _column("temperature")


def test_an_int_parameter_takes_no_tensor() -> None:
    q, k, v = _qkv()
    error = _raised(lambda: KERN(q, k, v, window=torch.tensor(3)))
    assert isinstance(error, InputError) and "is int, got Tensor" in str(error)


@pytest.mark.parametrize(
    ("ints", "floats"), [([4, 2], []), ([4, 2], [1.0, 2.0]), ([4], [1.0]), ([4, 2, 1], [1.0])]
)
def test_the_op_refuses_runtime_values_of_another_count(ints: list[int], floats: list[float]) -> None:
    q, k, v = _qkv()
    values = torch.tensor(floats, dtype=torch.float64)
    with pytest.raises(InputError, match="the pattern has 2 int and 1 float runtime parameters"):
        torch.ops.attnc.attention(q, k, v, [], KERN._op_pattern, 0.25, ints, values)


def test_the_op_refuses_float_params_that_are_not_a_float64_cpu_vector() -> None:
    q, k, v = _qkv()
    with pytest.raises(InputError, match="float_params must be a 1-d float64 CPU tensor"):
        torch.ops.attnc.attention(q, k, v, [], KERN._op_pattern, 0.25, [4, 2], torch.tensor([1.0]))
