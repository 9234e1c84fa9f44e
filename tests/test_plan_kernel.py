"""Plan = kernel: the tiles a kernel visits, and which of them it masks, are what its plan says.

The kernels count their visits in a debug mode (`attnc.runtime.launch.counting_visits`: + 1 per masked,
+ 16 per unmasked visit of a tile). Every non-empty tile of the plan is visited once, and unmasked exactly
when the plan calls it FULL, except a FULL tile cut by a length, which the kernel must bound-check (the
key tile in every kernel, the query tile too in the dK/dV kernel, whose rows are key tiles). Analytic
plans call a tile FULL when the cores of the conjuncts cover it together, not only when one does.
"""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.runtime.launch import counting_visits
from attnc.runtime.plan import EMPTY, FULL

STD = attnc.stdlib()
SINKS_AND_WINDOW = attnc.loads("pattern p { mask = kv < 20 or (kv <= q and q - kv < 28) }").p()
CAUSAL_OR_SINKS = attnc.loads("pattern p { mask = kv <= q or kv < 16 }").p()
THREE_CONJUNCTS = attnc.loads("pattern p { mask = kv < 5 or (kv <= q and q - kv < 9) or kv >= 40 }").p()
FOUR_CONJUNCTS = attnc.loads(
    "pattern p { mask = kv < 3 or (kv >= 30 and kv < 34) or (kv <= q and q - kv < 6) or kv > q + 20 }"
).p()
DOC = attnc.load("examples/document_causal.attn").document_causal()
BLOCK = (16, 16)


def expected_visits(classes: torch.Tensor, rows_len: int, cols_len: int, cut_rows: bool) -> torch.Tensor:
    """The counts a kernel should leave for plan classes [.., rows, cols]: 0 for EMPTY, 16 for FULL, 1
    for the rest and for FULL tiles cut by the length of the columns' axis (and of the rows' axis, with
    `cut_rows`)."""
    n_rows, n_cols = classes.shape[-2:]
    cut = torch.arange(n_cols) >= cols_len // BLOCK[1 if not cut_rows else 0]
    if cut_rows:
        cut = cut.reshape(1, -1) | (torch.arange(n_rows) >= rows_len // BLOCK[1]).reshape(-1, 1)
    full = (classes == FULL) & ~cut
    return torch.where(classes == EMPTY, 0, torch.where(full, 16, 1)).to(torch.int32)


def run_counted(kern: attnc.Kernel, q_len: int, kv_len: int, backward: bool, plan, **inputs) -> dict:
    torch.manual_seed(0)
    q = torch.randn(1, 2, q_len, 16, requires_grad=backward)
    k, v = (torch.randn(1, 2, kv_len, 16, requires_grad=backward) for _ in range(2))
    with counting_visits() as visits:
        out = kern(q, k, v, plan=plan, **inputs)
        if backward:
            out.sum().backward()
    torch.testing.assert_close(out, kern.reference(q, k, v, **inputs), atol=1e-5, rtol=1e-5)
    return dict(visits)


def test_a_tile_one_conjunct_proves_full_is_unmasked_where_an_earlier_conjunct_visits_it() -> None:
    # Query tile 0 = [0, 15]: `kv <= q` visits key tile 0 (masked, by itself); `kv < 16` proves it FULL.
    plan = CAUSAL_OR_SINKS.plan(40, 40, block=BLOCK)
    assert plan.block_map()[0, 0, 0, 0] == FULL
    visits = run_counted(CAUSAL_OR_SINKS, 40, 40, backward=False, plan=plan)
    assert visits["forward"][0, 0, 0, 0] == 16
    assert torch.equal(visits["forward"][0, 0], expected_visits(plan.block_map()[0, 0], 40, 40, False))


def test_a_tile_the_cores_cover_together_is_full_in_the_plan_and_unmasked_in_the_kernel() -> None:
    # Query tile 2 = [32, 47], key tile 1 = [16, 31]: the sinks' core is [0, 19], the window's [20, 32];
    # neither covers the tile, their union does.
    plan = SINKS_AND_WINDOW.plan(50, 50, block=BLOCK)
    assert SINKS_AND_WINDOW.block_map(50, 50, block=BLOCK)[0, 0, 2, 1] == FULL
    assert plan.block_map()[0, 0, 2, 1] == FULL
    visits = run_counted(SINKS_AND_WINDOW, 50, 50, backward=False, plan=plan)
    assert visits["forward"][0, 0, 2, 1] == 16


# Every analytic pattern of the standard library, and a few unions the cores cover together; lengths
# that are no multiple of the block (the last tiles cut), queries longer than keys and the reverse.
ANALYTIC = [
    (STD.full(), 45, 50),
    (STD.causal(), 45, 50),
    (STD.causal_bottom_right(), 50, 37),
    (STD.sliding_window(window=20), 45, 50),
    (STD.local(left=9, right=5), 45, 50),
    (STD.sinks(count=3), 45, 50),
    (STD.prefix_lm(prefix=9), 45, 50),
    (STD.dilated(window=2, dilation=3), 45, 50),
    (STD.neighborhood_1d(kernel=5, dilation=2, is_causal=True), 45, 45),
    (SINKS_AND_WINDOW, 45, 50),
    (CAUSAL_OR_SINKS, 45, 50),
    (attnc.loads("pattern p { mask = q // 8 == kv // 8 or kv < 3 }").p(), 45, 50),
    (attnc.loads("pattern p { mask = q < 10 and kv > 20 or kv == q }").p(), 45, 50),
    # Three and four conjuncts: the loops of a later conjunct step over the ranges of all earlier ones
    # (sorted and merged once per program), in the forward and dQ.
    (THREE_CONJUNCTS, 45, 50),
    (FOUR_CONJUNCTS, 50, 37),
]


@pytest.mark.parametrize(
    ("kern", "q_len", "kv_len"), ANALYTIC, ids=[f"{kern}-{q}x{kv}" for kern, q, kv in ANALYTIC]
)
def test_forward_and_backward_kernels_visit_what_the_analytic_plan_says(
    kern: attnc.Kernel, q_len: int, kv_len: int
) -> None:
    plan = kern.plan(q_len, kv_len, block=BLOCK)
    assert plan.analytic
    visits = run_counted(kern, q_len, kv_len, backward=True, plan=plan)
    forward = expected_visits(plan.block_map()[0, 0], q_len, kv_len, cut_rows=False)
    assert torch.equal(visits["forward"][0, 0], forward)
    assert torch.equal(visits["dq"][0, 0], forward)
    transposed = expected_visits(plan.block_map(transposed=True)[0, 0], kv_len, q_len, cut_rows=True)
    assert torch.equal(visits["dkv"][0, 1], transposed)


def test_forward_and_backward_kernels_visit_what_the_metadata_plan_says() -> None:
    doc = torch.tensor([[0] * 10 + [1] * 21 + [2] * 19], dtype=torch.int32)
    plan = DOC.plan(50, 50, block=BLOCK, doc=doc)
    assert not plan.analytic
    visits = run_counted(DOC, 50, 50, backward=True, plan=plan, doc=doc)
    forward = expected_visits(plan.block_map()[0, 0], 50, 50, cut_rows=False)
    assert (forward == 16).any() and (forward == 1).any() and (forward == 0).any()
    assert torch.equal(visits["forward"][0, 1], forward)
    assert torch.equal(visits["dq"][0, 1], forward)
    transposed = expected_visits(plan.block_map(transposed=True)[0, 0], 50, 50, cut_rows=True)
    assert torch.equal(visits["dkv"][0, 0], transposed)


@pytest.mark.parametrize("kern", [THREE_CONJUNCTS, FOUR_CONJUNCTS], ids=["three", "four"])
def test_gradients_of_several_conjuncts_match_the_oracle(kern: attnc.Kernel) -> None:
    torch.manual_seed(1)
    q = torch.randn(1, 2, 45, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 50, 16, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, 2, 45, 16)
    got = torch.autograd.grad(kern(q, k, v), (q, k, v), grad)
    want = torch.autograd.grad(kern.reference(q, k, v), (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
