"""The length check of PARTIAL tiles (issue 18 item 2): a key tile below the last, partly filled one lies
inside the valid rows, so that there only the pattern's mask is checked; tile `n_complete` (the one the
rows may cut) alone checks them, visited once after the loops (`_common.py.jinja`'s `analytic_loops`
with `inside`, `metadata_loops` with `complete`). The generated source says so line by line; the dense
oracle judges the values at lengths whose last tile is cut, and is not.

So do the inputs' bound tests: an input axis declared BATCH or KV_LEN is read at `b` without one, and
at `kv` without one in the tiles inside the rows (`emit.covered_sizes`), which the launcher makes safe
by refusing an input that does not cover those sizes.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

import attnc
from attnc.codegen.lower import build_spec, render
from attnc.runtime.autograd import NO_FLOAT_PARAMS as NO_FLOATS
from attnc.testing import compare

STD = attnc.stdlib()
DOC = attnc.load("examples/document_causal.attn").document_causal()
THREE_CONJUNCTS = attnc.loads("pattern p { mask = kv < 5 or (kv <= q and q - kv < 9) or kv >= 40 }").p()
LONGFORMER = attnc.load("examples/longformer.attn").longformer_global(w=4)
BLOCK = (16, 16)


def partial_tile_calls(source: str, name: str) -> list[tuple[str, str]]:
    """Each call of the PARTIAL tile function `name`: (the line before it, the CHECK_ROWS it passes)."""
    lines = [line.strip() for line in source.splitlines()]
    header = next(line for line in lines if line.startswith(f"def {name}("))
    params = header[len(f"def {name}(") : -2].split(", ")
    at = params.index("CHECK_ROWS")
    calls = []
    for before, line in itertools.pairwise(lines):
        if call := re.search(rf"= {name}\((.*)\)$", line):
            calls.append((before, call.group(1).split(", ")[at]))
    return calls


def test_forward_partial_loops_skip_the_length_check_and_the_cut_tile_makes_it() -> None:
    source = render(build_spec(STD.causal().pattern))
    calls = partial_tile_calls(source, "_fwd_partial_tile")
    # Both PARTIAL loops stop at n_complete, unchecked; tile n_complete, checked, after them.
    assert [check for _, check in calls] == ["False", "False", "True"]
    assert [before.endswith(", n_complete)):") for before, _ in calls[:2]] == [True, True]
    assert calls[2][0] == "if ((first_0 <= n) & (n <= last_0)):"
    tile = source[source.index("def _fwd_partial_tile(") : source.index("def _fwd_full_tile(")].splitlines()
    checks = [i for i, line in enumerate(tile) if "< kv_rows" in line]
    assert len(checks) == 3  # K's and V's loads and the score
    # Each is off where CHECK_ROWS is false: or'ed with `not CHECK_ROWS`, or under `if CHECK_ROWS:`.
    assert all("| (not CHECK_ROWS)" in tile[i] or tile[i - 1].strip() == "if CHECK_ROWS:" for i in checks)


def test_with_several_conjuncts_the_cut_tile_is_visited_once_if_in_any_hull() -> None:
    source = render(build_spec(STD.prefix_lm(prefix=7).pattern))
    calls = partial_tile_calls(source, "_fwd_partial_tile")
    assert [check for _, check in calls] == ["False", "False", "True"]
    assert calls[2][0] == "if ((first[0] <= n) & (n <= last[0])) | ((first[1] <= n) & (n <= last[1])):"


def test_a_metadata_forward_checks_the_rows_of_its_last_partial_or_cut_full_tile_only() -> None:
    source = render(build_spec(DOC.pattern))
    calls = partial_tile_calls(source, "_fwd_partial_tile")
    assert [check for _, check in calls] == ["False", "True"]
    assert calls[1][0] == "n = tl.where(ragged > 0, last_partial, last_full)"
    assert "for i in range(0, partial_count - ragged):" in source
    assert "if ragged + cut > 0:" in source


def input_loads(source: str, function: str, name: str) -> list[str]:
    """The lines of the generated function `function` that load input `name`."""
    start = source.index(f"def {function}(")
    end = source.find("\n\n\n", start)
    return [line.strip() for line in source[start:end].splitlines() if f"tl.load(in_{name}_ptr" in line]


def test_an_input_read_at_b_and_kv_has_no_bound_test_where_they_lie_inside_it() -> None:
    source = render(build_spec(LONGFORMER.pattern))  # is_global: bool[BATCH, KV_LEN]
    (column,) = input_loads(source, "_fwd_partial_tile", "is_global")  # is_global[b, kv]
    # b is in [0, BATCH) everywhere; kv below KV_LEN in every PARTIAL tile but the cut one.
    assert "b_idx" not in column.split("mask=")[1]
    assert "mask=((((kv_idx >= 0) & (kv_idx < in_is_global_dim1)) | (not CHECK_ROWS))) != 0" in column
    # is_global[b, q]: q is not what KV_LEN sizes, and may pass it (Q_LEN > KV_LEN).
    (row,) = input_loads(source, "attnc_fwd", "is_global")
    assert "mask=((q_idx >= 0) & (q_idx < in_is_global_dim1)) != 0" in row


def test_a_full_tile_reads_an_input_at_kv_with_no_test_at_all() -> None:
    kern = attnc.loads(
        "pattern p { input bias: float32[BATCH, KV_LEN]\n mask = kv <= q\n score = s + bias[b, kv] }"
    ).p()
    source = render(build_spec(kern.pattern))
    (full,) = input_loads(source, "_fwd_full_tile", "bias")
    assert "mask=" not in full
    (partial,) = input_loads(source, "_fwd_partial_tile", "bias")
    assert "| (not CHECK_ROWS)" in partial


@pytest.mark.parametrize("index", ["h, kv", "kv, 1", "b, h, kv"])
def test_a_full_tile_reads_an_input_at_kv_and_at_a_tested_scalar_index(index: str) -> None:
    """The load's only test is of a scalar index (h, a constant), its pointers per key: Triton's
    interpreter takes no scalar mask for a tile of pointers, so the mask must stay per key."""
    dims = {"h, kv": "NUM_HEADS, KV_LEN", "kv, 1": "KV_LEN, 2", "b, h, kv": "BATCH, NUM_HEADS, KV_LEN"}[index]
    kern = attnc.loads(
        f"pattern p {{ input bias: float32[{dims}]\n mask = kv <= q\n score = s + bias[{index}] }}"
    ).p()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    shape = {"h, kv": (2, 40), "kv, 1": (40, 2), "b, h, kv": (2, 2, 40)}[index]
    bias = torch.randn(shape)
    out, lse = kern(q, k, v, return_lse=True, kernel_options={"BLOCK_M": 16, "BLOCK_N": 16}, bias=bias)
    comparison = compare(kern, out, lse, q, k, v, bias=bias)
    assert comparison.ok, comparison.describe()


@pytest.mark.parametrize(
    ("declared", "b_tested", "kv_inside"),
    [
        ("int32[4, KV_LEN]", True, True),
        ("int32[BATCH, 64]", False, False),
        ("int32[BATCH, KV_LEN + 1]", False, False),
        ("int32[BATCH, Q_LEN]", False, False),
    ],
)
def test_only_axes_declared_batch_or_kv_len_lose_their_bound_tests(
    declared: str, b_tested: bool, kv_inside: bool
) -> None:
    kern = attnc.loads(f"pattern p {{ input doc: {declared}\n mask = doc[b, q] == doc[b, kv] }}").p()
    source = render(build_spec(kern.pattern))
    (column,) = input_loads(source, "_fwd_partial_tile", "doc")
    assert ("(b_idx >= 0) & (b_idx < in_doc_dim0)" in column) == b_tested
    assert "(kv_idx >= 0) & (kv_idx < in_doc_dim1)" in column  # (the cut tile's)
    assert ("| (not CHECK_ROWS)" in column) == kv_inside


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            (2, 40),
            r"input 'doc' has size 40 along axis 1, declared KV_LEN: .* up to 40, so it needs at least 41",
        ),
        ((1, 41), r"input 'doc' has size 1 along axis 0, declared BATCH: .* up to 1, so it needs at least 2"),
    ],
)
def test_a_launch_refuses_an_input_that_does_not_cover_what_its_kernels_read_untested(
    shape: tuple[int, int], message: str
) -> None:
    # The calls hold an input to its declared shape; the custom op, called directly, is held by the
    # launcher to what the kernels read without a bound test: an error at the declaration, no read past it.
    q, k, v = (torch.randn(2, 2, 41, 16) for _ in range(3))
    doc = torch.zeros(shape, dtype=torch.int32)
    with pytest.raises(attnc.InputError, match=message) as error:
        torch.ops.attnc.attention(q, k, v, [doc], DOC._op_pattern, 0.25, [], NO_FLOATS)
    assert error.value.loc == DOC.pattern.input("doc").loc


def global_tokens(length: int, *positions: int) -> torch.Tensor:
    marks = torch.zeros(1, length, dtype=torch.bool)
    marks[0, list(positions)] = True
    return marks


CASES = [
    (STD.causal(), 40, 40, {}),  # the last key tile holds 8 rows
    (STD.causal(), 48, 48, {}),  # no tile is cut
    (STD.sliding_window(window=20), 29, 37, {}),
    (STD.prefix_lm(prefix=7), 45, 50, {}),  # two conjuncts: the cut tile is in both hulls
    (THREE_CONJUNCTS, 45, 50, {}),
    (DOC, 50, 50, {"doc": torch.tensor([[0] * 10 + [1] * 21 + [2] * 19], dtype=torch.int32)}),
    (DOC, 41, 41, {"doc": torch.tensor([[0] * 30 + [1] * 11], dtype=torch.int32)}),
    # Global keys in the cut tile and below it; global queries past the keys (Q_LEN > KV_LEN).
    (LONGFORMER, 41, 41, {"is_global": global_tokens(41, 3, 20, 40)}),
    (LONGFORMER, 50, 37, {"is_global": global_tokens(37, 0, 17, 33, 36)}),
]


@pytest.mark.parametrize(
    ("kern", "q_len", "kv_len", "inputs"), CASES, ids=[f"{i}-{c[1]}x{c[2]}" for i, c in enumerate(CASES)]
)
def test_forward_matches_the_oracle_where_the_last_key_tile_is_cut_or_not(
    kern: attnc.Kernel, q_len: int, kv_len: int, inputs: dict
) -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 2, q_len, 16)
    k, v = (torch.randn(1, 2, kv_len, 16) for _ in range(2))
    plan = kern.plan(q_len, kv_len, block=BLOCK, **inputs)
    out = kern(q, k, v, plan=plan, **inputs)
    torch.testing.assert_close(out, kern.reference(q, k, v, **inputs), atol=1e-5, rtol=1e-5)
