"""Symbolic derivatives of score functions (`analysis/derivative.py`) against autograd through the oracle.

Random well-typed score expressions over `s`, two float inputs and the index variables are compiled;
the derivative by `s` and by each load, evaluated by the oracle, must equal what torch's autograd
computes through the oracle's evaluation of the score, at every point of a small grid — including the
kinks where PyTorch picks a value (the values lie on a coarse grid, so `max(s, t[h])` and
`abs(s - u[kv])` meet their ties).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import oracle
from attnc.analysis.derivative import derivative
from attnc.ir.nodes import Node, Op, Type, const, make
from attnc.passes.fuse import score_gradients

BATCH, HEADS, Q_LEN, KV_LEN = 1, 2, 5, 6

LEAVES = ("s", "s", "s", "t[h]", "u[kv]", "(q - kv)", "0.5", "2.0")


@st.composite
def float_exprs(draw: st.DrawFn, depth: int = 3) -> str:
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(LEAVES))
    sub = float_exprs(depth - 1)
    a, b = draw(sub), draw(sub)
    kind = draw(
        st.sampled_from(
            ["add", "sub", "mul", "div", "neg", "tanh", "sigmoid", "exp", "exp2", "log", "log2",
             "sqrt", "abs", "min", "max", "where", "same"]
        )
    )  # fmt: skip
    return {
        "add": f"({a} + {b})",
        "sub": f"({a} - {b})",
        "mul": f"({a} * {b})",
        "div": f"({a} / (abs({b}) + 1.0))",
        "neg": f"(-{a})",
        "tanh": f"tanh({a})",
        "sigmoid": f"sigmoid({a})",
        "exp": f"exp(tanh({a}))",
        "exp2": f"exp2(tanh({a}))",
        "log": f"log(abs({a}) + 1.0)",
        "log2": f"log2(abs({a}) + 1.0)",
        "sqrt": f"sqrt(abs({a}) + 0.5)",
        "abs": f"abs({a})",
        "min": f"min({a}, {b})",
        "max": f"max({a}, {b})",
        "where": f"where({a} > 0.25, {a}, {b})",
        "same": f"max({a}, {b}) + abs({a} - {b})",
    }[kind]


def _kernel(score: str) -> attnc.Kernel:
    source = f"""
pattern p {{
    input t: float32[NUM_HEADS]
    input u: float32[KV_LEN]
    score = {score}
}}"""
    return attnc.loads(source).p()


def _env(t: torch.Tensor, u: torch.Tensor, s: torch.Tensor) -> oracle.Env:
    env = oracle.Env(BATCH, HEADS, Q_LEN, KV_LEN, torch.device("cpu"), {"t": t, "u": u})
    env.score, env.float_dtype = s, torch.float64
    return env


def _evaluate(node: Node | None, pattern, env: oracle.Env) -> torch.Tensor:
    if node is None:
        return torch.zeros(BATCH, HEADS, Q_LEN, KV_LEN, dtype=torch.float64)
    return oracle.evaluate(node, pattern, env).to(torch.float64).expand(BATCH, HEADS, Q_LEN, KV_LEN)


def _check(score: str, seed: int) -> None:
    kern = _kernel(score)
    pattern = kern.pattern  # canonicalized and fused: what the kernels differentiate
    g = torch.Generator().manual_seed(seed)

    # Values on a coarse grid, so that s, t[h], u[kv] and the constants tie often: the kinks of min,
    # max and abs are where PyTorch's conventions matter.
    def grid(*shape: int) -> torch.Tensor:
        return torch.randint(-8, 9, shape, generator=g).to(torch.float64) / 4

    s = grid(BATCH, HEADS, Q_LEN, KV_LEN).requires_grad_()
    t = grid(HEADS).float().requires_grad_()
    u = grid(KV_LEN).float().requires_grad_()
    upstream = torch.randn(BATCH, HEADS, Q_LEN, KV_LEN, generator=g, dtype=torch.float64)
    value = _evaluate(pattern.score, pattern, _env(t, u, s))
    leaves = (s, t, u)
    found = (
        torch.autograd.grad(value, leaves, upstream, allow_unused=True)
        if value.requires_grad
        else (None,) * 3
    )
    ds, dt, du = (torch.zeros_like(x) if d is None else d for x, d in zip(leaves, found, strict=True))

    env = _env(t.detach(), u.detach(), s.detach())
    dscore, loads = score_gradients(pattern)
    mine_ds = upstream if dscore is None else upstream * _evaluate(dscore, pattern, env)
    torch.testing.assert_close(mine_ds, ds, equal_nan=True, rtol=1e-9, atol=1e-12, msg=score)
    mine = {"t": torch.zeros(HEADS, dtype=torch.float64), "u": torch.zeros(KV_LEN, dtype=torch.float64)}
    for load, grad in loads:
        share = upstream * _evaluate(grad, pattern, env)
        index = _evaluate(make(Op.TOFLOAT, load.args[0]), pattern, env).long()
        mine[str(load.attr)].index_add_(0, index.reshape(-1), share.reshape(-1))
    # t and u are float32: autograd rounds their gradient to it.
    torch.testing.assert_close(mine["t"].float(), dt, equal_nan=True, msg=score)
    torch.testing.assert_close(mine["u"].float(), du, equal_nan=True, msg=score)


SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@SETTINGS
@given(float_exprs(), st.integers(0, 3))
def test_derivatives_match_autograd_through_the_oracle(score: str, seed: int) -> None:
    _check(score, seed)


@pytest.mark.parametrize(
    "score",
    [
        "50.0 * tanh(s / 50.0)",  # soft-cap: 1 - tanh^2
        "s * t[h] + u[kv] * u[kv]",  # one load used twice: 2 u
        "max(s, t[h]) + min(s, 0.5)",  # a tie gives each side half
        "abs(s - u[kv]) + abs(s)",  # |x|' is 0 at 0
        "where(s > 0.0, exp(t[h]), sigmoid(s))",
        "s - t[h] * (q - kv)",  # an int factor: its derivative is 0
    ],
)
def test_named_rules(score: str) -> None:
    _check(score, 0)


def test_derivative_of_what_does_not_depend_is_none() -> None:
    s = Node(Op.SCORE, Type.FLOAT)
    assert derivative(const(2.0), s) is None
    assert derivative(make(Op.TOFLOAT, const(3)), s) is None
    assert derivative(make(Op.MUL, s, const(3.0)), s) == const(3.0)
    with pytest.raises(ValueError):
        derivative(const(1), s)
