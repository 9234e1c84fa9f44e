"""The length check of PARTIAL tiles (issue 18 item 2): a key tile below the last, partly filled one lies
inside the valid rows, so that there only the pattern's mask is checked; tile `n_complete` (the one the
rows may cut) alone checks them, visited once after the loops (`_common.py.jinja`'s `analytic_loops`
with `inside`, `metadata_loops` with `complete`). The generated source says so line by line; the dense
oracle judges the values at lengths whose last tile is cut, and is not.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

import attnc
from attnc.codegen.lower import build_spec, render

STD = attnc.stdlib()
DOC = attnc.load("examples/document_causal.attn").document_causal()
THREE_CONJUNCTS = attnc.loads("pattern p { mask = kv < 5 or (kv <= q and q - kv < 9) or kv >= 40 }").p()
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


CASES = [
    (STD.causal(), 40, 40, {}),  # the last key tile holds 8 rows
    (STD.causal(), 48, 48, {}),  # no tile is cut
    (STD.sliding_window(window=20), 29, 37, {}),
    (STD.prefix_lm(prefix=7), 45, 50, {}),  # two conjuncts: the cut tile is in both hulls
    (THREE_CONJUNCTS, 45, 50, {}),
    (DOC, 50, 50, {"doc": torch.tensor([[0] * 10 + [1] * 21 + [2] * 19], dtype=torch.int32)}),
    (DOC, 41, 41, {"doc": torch.tensor([[0] * 30 + [1] * 11], dtype=torch.int32)}),
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
