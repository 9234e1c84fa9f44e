"""Golden tests of the generated Triton source (`lower-triton`), FileCheck-style: the lines that matter.

Each kind of tile is one `@triton.jit` tile function, defined once and called by every loop of every
conjunct, so that the mask and the score are rendered once and the source does not grow with the loops
(issue 18 item 1). `expect_in_order` is FileCheck's CHECK: each pattern matches a later line than the
one before.
"""

from __future__ import annotations

import importlib
import random
import re

import pytest
import torch

import attnc
import attnc.examples
from attnc.codegen.lower import build_backward_spec, build_spec, checked_code, render, tile_parameters
from attnc.errors import InternalError
from attnc.runtime import launch


def example(name: str) -> attnc.AttnModule:
    return attnc.load(attnc.examples.path(name))


def forward(kern: attnc.Kernel) -> str:
    return render(build_spec(kern.pattern))


def backward(kern: attnc.Kernel) -> str:
    return render(build_backward_spec(kern.pattern), launch.BACKWARD_TEMPLATE)


def count(source: str, pattern: str) -> int:
    """The lines matching the regular expression `pattern` (searched, after leading spaces)."""
    return sum(1 for line in source.splitlines() if re.search(pattern, line.strip()))


def expect_in_order(source: str, patterns: list[str]) -> None:
    lines = [line.strip() for line in source.splitlines()]
    at = 0
    for pattern in patterns:
        found = next((i for i in range(at, len(lines)) if re.search(pattern, lines[i])), None)
        assert found is not None, f"no line matching {pattern!r} after line {at + 1}"
        at = found + 1


def calls(name: str, state: str = "acc, l_i, m_i") -> str:
    return rf"^{re.escape(state)} = {name}\("


def test_causal_forward_calls_one_partial_and_one_full_tile_function_from_its_loops() -> None:
    source = forward(attnc.stdlib().causal())
    expect_in_order(
        source,
        [
            r"^def _fwd_partial_tile\(",
            r"^m0 = q_idx >= kv_idx$",
            r"^return acc, l_i, m_i$",
            r"^def _fwd_full_tile\(",
            r"^return acc, l_i, m_i$",
            r"^def attnc_fwd\(",
            r"^for n in range\(first_0, tl\.minimum\(tl\.minimum\(full_first_0, last_0 \+ 1\), "
            r"n_complete\)\):$",
            calls("_fwd_partial_tile"),
            r"^for n in range\(full_first_0, full_last_0 \+ 1\):$",
            calls("_fwd_full_tile"),
            r"^for n in range\(tl\.maximum\(full_last_0 \+ 1, first_0\), "
            r"tl\.minimum\(last_0 \+ 1, n_complete\)\):$",
            calls("_fwd_partial_tile"),
            r"^n = n_complete$",  # the one tile the key length may cut (`test_length_checks.py`)
            r"^if \(\(first_0 <= n\) & \(n <= last_0\)\):$",
            calls("_fwd_partial_tile"),
        ],
    )
    assert count(source, r"^def _fwd_(partial|full)_tile\(") == 2
    assert count(source, r"q_idx >= kv_idx") == 1  # the mask, once


def test_a_four_conjunct_forward_renders_the_tile_body_once_per_kind() -> None:
    # neighborhood_1d's mask has four conjuncts: 4 loops over PARTIAL tiles and 4 over FULL ones, and
    # one visit of the tile the key length may cut.
    source = forward(attnc.stdlib().neighborhood_1d(kernel=7))
    assert count(source, r"^def _fwd_partial_tile\(") == 1
    assert count(source, r"^def _fwd_full_tile\(") == 1
    assert count(source, calls("_fwd_partial_tile")) == 5
    assert count(source, calls("_fwd_full_tile")) == 4
    assert count(source, r"tl\.dot\(") == 4  # q kᵀ and p v, in each of the two functions
    assert count(source, r"^s = tl\.where\(") == 2  # the length and the mask, in the PARTIAL tile only


def test_a_metadata_forward_calls_the_tile_functions_from_its_loops() -> None:
    source = forward(example("dynamic_sparse.attn").block_sparse())
    expect_in_order(
        source,
        [
            r"^def _fwd_partial_tile\(",
            r"^def _fwd_full_tile\(",
            r"^def attnc_fwd\(",
            r"^n = next_n$",
            calls("_fwd_partial_tile"),
            r"^n = next_n$",
            calls("_fwd_full_tile"),
            r"^n = tl\.where\(ragged > 0, last_partial, last_full\)$",  # the tile the length may cut
            calls("_fwd_partial_tile"),
        ],
    )


def test_the_dq_kernel_calls_its_tile_functions_from_every_loop_of_every_conjunct() -> None:
    # prefix_lm: two conjuncts, each with a PARTIAL and a FULL loop in dQ (the forward's loops).
    source = backward(attnc.stdlib().prefix_lm(prefix=7))
    assert count(source, r"^def _dq_partial_tile\(") == 1
    assert count(source, r"^def _dq_full_tile\(") == 1
    assert count(source, r"^dq \+= tl\.dot\(ds_k, k,") == 2
    assert count(source, calls("_dq_partial_tile", "dq")) == 2
    assert count(source, calls("_dq_full_tile", "dq")) == 2


def test_input_gradients_compute_the_exact_delta_in_tile_functions_too() -> None:
    source = backward(example("score_mods.attn").relative_bias())
    assert count(source, r"^def _delta_partial_tile\(") == 1
    assert count(source, r"^def _delta_full_tile\(") == 1
    assert count(source, r"^delta_sum \+= tl\.sum\(p \* dp, 1\)$") == 2
    assert count(source, calls("_delta_partial_tile", "delta_sum")) == 2
    assert count(source, calls("_delta_full_tile", "delta_sum")) == 1


def test_a_tile_functions_parameters_are_the_names_it_reads_before_assigning_them() -> None:
    spec = build_spec(attnc.stdlib().causal().pattern)
    body = "\n".join(
        [
            "a = tl.where(b, c, _tile_of(c, BLOCK))",  # tl and the helpers are module names
            "if FLAG:  # a comment's words are not read",
            "    d = tl.load(x.ptr + a, mask=a < n, other=float('-inf'))",  # no attribute, keyword, string
            "e, f = d, a == g",
            "h = h + 1",  # read before it is bound
            "acc += e",
            "for i in range(0, LIMIT):",
            "    acc = acc + i * u",
        ]
    )
    assert tile_parameters(body, spec) == ["b", "c", "BLOCK", "FLAG", "x", "n", "g", "h", "acc", "LIMIT", "u"]


def test_the_loaded_source_is_rejected_where_a_tile_function_lacks_a_parameter() -> None:
    spec = build_spec(attnc.stdlib().causal().pattern)
    source = forward(attnc.stdlib().causal())
    checked_code(source, spec, "attention_fwd.py.jinja")
    broken = source.replace("def _fwd_full_tile(n, ", "def _fwd_full_tile(")
    with pytest.raises(InternalError, match=r"tile function _fwd_full_tile reads \['n'\]"):
        checked_code(broken, spec, "attention_fwd.py.jinja")


def test_the_dkv_kernel_calls_its_tile_functions_from_every_loop_of_every_conjunct() -> None:
    # prefix_lm's dK/dV kernel: per conjunct a PARTIAL loop on each side of a FULL one, each tile tested.
    source = backward(attnc.stdlib().prefix_lm(prefix=7))
    assert count(source, r"^def _dkv_partial_tile\(") == 1
    assert count(source, r"^def _dkv_full_tile\(") == 1
    assert count(source, r"^dk \+= tl\.dot\(") == 2
    assert count(source, calls("_dkv_partial_tile", "dk, dv")) == 4
    assert count(source, calls("_dkv_full_tile", "dk, dv")) == 2


# ---- the step-over helpers of several conjuncts (`_disjoint`, `_cut`, `_step_over`) -------------------

_PROBE = """

@triton.jit
def _probe(Lo, Hi, Out, End, K: tl.constexpr, FIRST, END):
    lo, hi = (), ()
    for a in tl.static_range(K):
        lo, hi = lo + (tl.load(Lo + a),), hi + (tl.load(Hi + a),)
    s_lo, s_hi = _disjoint(lo, hi)
    n, end = _cut(s_lo, s_hi, FIRST, END)
    tl.store(End, end)
    for i in range(FIRST, end):
        tl.store(Out + i - FIRST, _step_over(i, s_lo, n))
"""


def test_a_step_over_loop_visits_its_range_less_the_skipped_ranges_in_order(tmp_path, monkeypatch) -> None:
    # The helpers as a four-conjunct forward renders them, run under the interpreter on random ranges
    # (empty, overlapping, nested, touching, past either end): the loop from FIRST visits exactly the
    # tiles of [FIRST, END) outside every range, ascending, each once.
    source = forward(attnc.stdlib().neighborhood_1d(kernel=7))
    (tmp_path / "step_over_probe.py").write_text(source + _PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("step_over_probe")._probe
    rng = random.Random(18)
    for _ in range(40):
        k = rng.randint(1, 5)
        lo = [rng.randint(-3, 20) for _ in range(k)]
        hi = [a + rng.randint(-3, 6) for a in lo]
        first, end = rng.randint(-2, 8), rng.randint(4, 22)
        out = torch.full((32,), -99, dtype=torch.int32)
        stop = torch.zeros(1, dtype=torch.int32)
        probe[(1,)](
            torch.tensor(lo, dtype=torch.int32), torch.tensor(hi, dtype=torch.int32), out, stop, k, first, end
        )
        skipped = {t for a, b in zip(lo, hi, strict=True) for t in range(a, b + 1)}
        expected = [t for t in range(first, end) if t not in skipped]
        visited = out[: max(int(stop) - first, 0)].tolist()
        assert visited == expected, (lo, hi, first, end, visited)
