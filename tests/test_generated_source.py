"""Golden tests of the generated Triton source (`lower-triton`), FileCheck-style: the lines that matter.

Each kind of tile is one `@triton.jit` tile function, defined once and called by every loop of every
conjunct, so that the mask and the score are rendered once and the source does not grow with the loops
(issue 18 item 1). `expect_in_order` is FileCheck's CHECK: each pattern matches a later line than the
one before.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import types

import pytest
import torch

import attnc
import attnc.examples
from attnc.codegen import lower, signature
from attnc.codegen.emit import BLOCK_MARK, Assign
from attnc.codegen.lower import build_backward_spec, build_spec, checked_code, render, tile_parameters
from attnc.errors import InternalError
from attnc.runtime import cache, launch
from attnc.testing import kernel_lines


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


def test_a_block_map_is_read_as_four_scalars_per_tile_where_the_tiles_allow() -> None:
    # blocks[b, h, q // 128, kv // 128] (`codegen/gather.py`): over a tile of at most 128 positions
    # (256 starting at a multiple of 256) each index is its value at the tile's first position or
    # the next, so the tile reads four scalars and chooses per row and per key column; the per-element
    # gather stays for other tiles. In each kernel's PARTIAL tile.
    kern = example("dynamic_sparse.attn").block_sparse(block=128)

    def line(text: str) -> str:
        return f"^{re.escape(text)}$"

    def load(target: str, row: str, key: str) -> str:  # the start of `target = tl.load(...)`
        return "^" + re.escape(
            f"{target} = tl.load(in_blocks_ptr + tl.cast(b_idx, tl.int64) * in_blocks_stride0 + "
            f"tl.cast(h_idx, tl.int64) * in_blocks_stride1 + tl.cast({row}, tl.int64) * in_blocks_stride2 + "
            f"tl.cast({key}, tl.int64) * in_blocks_stride3, "
        )

    source = forward(kern)
    expect_in_order(
        source,
        [
            r"^def _fwd_partial_tile\(",
            line("m0 = kv_idx >> 7"),
            line(
                "m1 = (((BLOCK_M <= 128) | (((SHIFTED == 0) & (ROW_OFFSETS == 0)) & (BLOCK_M <= 256))) & "
                "(PACK_GQA == 0)) & ((BLOCK_N <= 128) | ((SHIFTED == 0) & (BLOCK_N <= 256)))"
            ),
            line("if m1:"),
            line("m1_i0 = q_first >> 7"),  # the indices at the tile's first row and key
            line("m1_i1 = (start_n + kv_shift) >> 7"),
            load("m1_00", "m1_i0", "m1_i1"),
            line("if (((SHIFTED == 0) & (BLOCK_N <= 128))):"),  # one key block per tile: no select
            line("m1_0s = tl.where(m0 == m1_i1, m1_00, m1_00)"),
            line("else:"),
            load("m1_01", "m1_i0", "(m1_i1 + 1)"),
            line("m1_0s = tl.where(m0 == m1_i1, m1_00, m1_01)"),
            load("m1_10", "(m1_i0 + 1)", "m1_i1"),
            load("m1_11", "(m1_i0 + 1)", "(m1_i1 + 1)"),
            line("m1_1s = tl.where(m0 == m1_i1, m1_10, m1_11)"),
            line("m1_v = tl.where(row_0 == m1_i0, m1_0s, m1_1s)"),
            line("else:"),
            load("m1_v", "row_0", "m0"),
            line('s = tl.where(m1_v, s, float("-inf"))'),  # the mask alone (the length test is apart)
            r"^def _fwd_full_tile\(",
        ],
    )
    assert count(source, r"tl\.load\(in_blocks_ptr") == 5  # once each, in the PARTIAL tile only
    source = backward(kern)
    for tile, m, key_first in (
        ("_dq_partial_tile", "dq_m", "(start_n + kv_shift)"),
        ("_dkv_partial_tile", "dkv_m", "kv_first"),
    ):
        expect_in_order(
            source,
            [
                rf"^def {tile}\(",
                line(f"if {m}1:"),
                line(f"{m}1_i0 = q_first >> 7"),
                line(f"{m}1_i1 = {key_first} >> 7"),
                line(f"{m}1_v = tl.where(row_0 == {m}1_i0, {m}1_0s, {m}1_1s)"),
                line("else:"),
                load(f"{m}1_v", "row_0", f"{m}0"),
                line(f"allowed = allowed & ({m}1_v)"),
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
    # prefix_lm's dK/dV kernel, as the forward's: per conjunct a PARTIAL loop over its hull and a FULL
    # loop, each stepping over the tiles others visit (no `if` in a loop, which Triton would not pipeline).
    source = backward(attnc.stdlib().prefix_lm(prefix=7))
    dkv = source[source.index("def attnc_bwd_dkv(") :]
    assert count(source, r"^def _dkv_partial_tile\(") == 1
    assert count(source, r"^def _dkv_full_tile\(") == 1
    assert count(source, r"^dk \+= tl\.dot\(") == 2
    assert count(source, calls("_dkv_partial_tile", "dk, dv")) == 2
    assert count(source, calls("_dkv_full_tile", "dk, dv")) == 2
    assert count(dkv, r"^m = _step_over\(i, ") == 3 and count(dkv, r"^if .*\bm\b") == 0


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


# ---- the kernels' arguments, described once (`codegen/signature.py`) ------------------------------------


# Every source of a kernel's arguments: an input with a gradient and a runtime parameter.
BIASED_WINDOW = """
pattern biased_window(window: int) {
    input bias: float32[NUM_HEADS]
    mask = kv <= q and q - kv < window
    score = s + bias[h]
}
"""


def recorded_launches(monkeypatch) -> list[tuple[object, tuple, dict]]:
    """The kernel launches of a forward and a backward call of `BIASED_WINDOW`, recorded instead of
    run: (the jitted function, its positional arguments, its keywords)."""
    launches: list[tuple[object, tuple, dict]] = []

    def launcher(kernel, grid, warmup):
        return lambda *positional, **keywords: launches.append((kernel, positional, keywords))

    monkeypatch.setattr(launch, "_launcher", launcher)
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    bias = torch.zeros(2, requires_grad=True)
    attnc.loads(BIASED_WINDOW).biased_window(window=5)(q, k, v, bias=bias).sum().backward()
    return launches


def test_every_kernel_is_launched_by_keyword_with_exactly_the_parameters_of_its_def(monkeypatch) -> None:
    launches = recorded_launches(monkeypatch)
    names = [kernel.fn.__name__ for kernel, _, _ in launches]
    assert names == ["attnc_fwd", "attnc_bwd_preprocess", "attnc_bwd_dq", "attnc_bwd_dkv"]
    for kernel, positional, keywords in launches:
        parameters = list(inspect.signature(kernel.fn).parameters)
        assert positional == ()
        options = ["num_warps", "num_stages"] if kernel.fn.__name__ != "attnc_bwd_preprocess" else []
        assert list(keywords) == parameters + options
        assert "in_bias_ptr" in parameters or kernel.fn.__name__ == "attnc_bwd_preprocess"


def test_the_forward_def_is_rendered_from_its_argument_description() -> None:
    source = forward(attnc.stdlib().sliding_window(window=3))
    expect_in_order(
        source,
        [
            r"^@triton\.jit\(do_not_specialize=\[$",
            r'^"param_0", "BATCH", "NUM_HEADS", "Q_ROWS", "KV_ROWS", "Q_SIZE", "KV_SIZE", "q_offset",',
            r"^def attnc_fwd\($",
            r"^Q, K, V, Out, Lse,$",
            r"^param_0, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb,",
            r"^split_tiles, split_out, split_lse, MaxScores,$",
            r"^HEAD_DIM: tl\.constexpr, HEAD_DIM_V: tl\.constexpr, D_PAD: tl\.constexpr,",
            r"^PTX: tl\.constexpr, KV_ROW_COUNTS: tl\.constexpr,",
            r"^VARLEN: tl\.constexpr, PACK_GQA: tl\.constexpr, STORE_MAX: tl\.constexpr, "
            r"SCALE_NEGATIVE: tl\.constexpr,$",
            r"^\):$",
            r"^tl\.static_assert\(\(\(D_PAD & \(D_PAD - 1\)\) == 0\) & \(D_PAD >= 16\) & .* & "
            r"\(D_PAD >= HEAD_DIM\) & \(DV_PAD >= HEAD_DIM_V\), "
            r'"D_PAD, DV_PAD: powers of two, >= 16 and >= HEAD_DIM, HEAD_DIM_V"\)$',
            r'^tl\.static_assert\(.*"BLOCK_M, BLOCK_N: powers of two, >= 16"\)$',
        ],
    )


def test_a_launch_whose_values_differ_from_the_description_is_refused(monkeypatch) -> None:
    kern = attnc.stdlib().causal()
    q = k = v = torch.randn(1, 1, 24, 16)
    constants = launch._constants
    monkeypatch.setattr(launch, "_constants", lambda *a: {**constants(*a), "BLOCK_K": 32})
    with pytest.raises(
        InternalError, match=r"attnc_fwd: the launcher's 'config' values .*not arguments \['BLOCK_K'\]"
    ):
        kern(q, k, v)
    monkeypatch.setattr(
        launch, "_constants", lambda *a: {n: x for n, x in constants(*a).items() if n != "D_PAD"}
    )
    with pytest.raises(
        InternalError, match=r"attnc_fwd: the launcher's 'config' values .*missing \['D_PAD'\]"
    ):
        kern(q, k, v)


def test_a_loaded_kernel_whose_def_differs_from_its_description_is_rejected() -> None:
    spec = build_spec(attnc.stdlib().causal().pattern)
    source = forward(attnc.stdlib().causal())
    for broken in (
        source.replace("    Q, K, V, Out, Lse,\n", "    Q, V, K, Out, Lse,\n"),
        source.replace("STORE_MAX: tl.constexpr", "STORE_MAX"),
    ):
        assert broken != source
        with pytest.raises(
            InternalError, match=r"attnc_fwd's parameters differ from its argument description"
        ):
            checked_code(broken, spec, "attention_fwd.py.jinja")


def test_a_launch_that_breaks_a_constexpr_contract_stops_at_its_static_assert(monkeypatch) -> None:
    # A head dim of 24 padded to itself, not to 32: no power of two, which tl.arange needs.
    monkeypatch.setattr(launch.autotune, "padded", lambda dim: dim)
    q = k = v = torch.randn(1, 1, 24, 24)
    with pytest.raises(Exception, match=r"D_PAD, DV_PAD: powers of two, >= 16 and >= HEAD_DIM, HEAD_DIM_V"):
        attnc.stdlib().causal()(q, k, v)


def test_the_kernel_cache_key_covers_the_argument_descriptions_the_templates_render() -> None:
    # An edited description renders another def: a kernel cached before it must not be loaded after.
    assert signature.__file__ in [path for path, _, _ in cache._template_files()]


# ---- size (item 1): forward <= 350 lines and backward <= 700, for every kernel of the corpus ----------


def test_every_stdlib_example_and_fuzz_corpus_kernel_renders_within_the_size_bounds() -> None:
    counts = [(name, *kernel_lines.lines(kern)) for name, kern in kernel_lines.kernels()]
    assert len(counts) >= 55  # 11 stdlib patterns (8 at two parameter sets), 34 examples, the corpus
    over = [c for c in counts if c[1] > kernel_lines.FORWARD_LINES or c[2] > kernel_lines.BACKWARD_LINES]
    assert not over, over


def test_a_kernel_imports_its_kernel_functions_instead_of_defining_them() -> None:
    source = forward(attnc.stdlib().neighborhood_1d(kernel=7))
    expect_in_order(
        source,
        [
            r"^from attnc\.codegen\.kernel_functions import _conjunct_tiles, _cut, _disjoint, _kv_rows, "
            r"_step_over, _tile_of$",
            r"^def _fwd_partial_tile\(",
            r"^k_rows, v_rows = _kv_rows\(start_n, offs_n, b_idx, BlockTable,",
        ],
    )
    assert count(source, r"^def _(tile_of|conjunct_tiles|disjoint|cut|step_over|kv_rows)\(") == 0


def test_the_names_a_kernel_may_import_are_the_functions_kernel_functions_defines() -> None:
    # `checked_code` accepts an import of these names alone; the list is written in lower.py (which
    # imports no Triton) and must not drift from the module.
    module = importlib.import_module(lower.KERNEL_FUNCTIONS)
    defined = {name for name, value in vars(module).items() if name.startswith("_") and hasattr(value, "fn")}
    assert defined == lower._KERNEL_FUNCTIONS


def test_a_hoisted_value_is_assigned_to_its_name_not_copied_from_a_temporary() -> None:
    # sliding_window's row bound and key range: `row_0 = q_idx - ...`, not `r1 = ...; row_0 = r1`.
    source = forward(attnc.stdlib().sliding_window(window=3))
    assert count(source, r"^(row|kv_lo|kv_hi|kv_full_lo|kv_full_hi)_\d+ = [rk]b?\d+$") == 0
    assert count(source, r"^row_0 = ") == 1


def test_a_value_whose_statement_reads_its_own_name_is_copied_not_renamed() -> None:
    # A reduction's accumulator is updated in its loop by name: renamed, the loop would update another
    # variable. Its value is copied instead; a plain temporary is renamed.
    emitter = types.SimpleNamespace(lines=[], names={})
    loop = f"tl.full([], 0, tl.int32)\n{BLOCK_MARK}for r0_i in range(0, n):\n{BLOCK_MARK * 2}r0 = r0 + r0_i"

    def accumulate(node: object) -> str:
        emitter.lines.append(Assign("r0", loop))
        emitter.names[node] = "r0"
        return "r0"

    def subtract(node: object) -> str:
        emitter.lines.append(Assign("r1", "q_idx - 3"))
        emitter.names[node] = "r1"
        return "r1"

    lower._bind(emitter, "row_0", "sum", accumulate)
    lower._bind(emitter, "row_1", "difference", subtract)
    assert emitter.lines == [Assign("r0", loop), Assign("row_0", "r0"), Assign("row_1", "q_idx - 3")]
    assert emitter.names == {"sum": "r0", "difference": "row_1"}
