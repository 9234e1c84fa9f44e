"""The pass driver on IR text (`attnc.compiler.optimize`, `attnc opt`): every pass tested alone on its
golden input, the CLI on files and stdin, and one-line errors for unknown passes, text that is not IR
and passes run on IR that lacks what they require.

Each golden case `tests/golden/<pass>/<case>.attn` has `<case>.in.ir`, the IR its pass receives (the
previous stage's text); ATTNC_UPDATE_GOLDEN=1 rewrites them from the `.attn` as it does the `.ir`
files. A `<case>.in.ir` without a `.attn` is a hand-written input that no source produces directly;
its `<case>.ir` is what the pass alone makes of it.
"""

from __future__ import annotations

import io
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from test_golden_ir import CASES, GOLDEN, _compile

from attnc.cli import _parse_define, main
from attnc.compiler import PIPELINE, STAGES, IRTextError, optimize, parse_ir
from attnc.errors import ParameterError
from attnc.ir.nodes import ModuleIR
from attnc.passes import PASSES
from attnc.passes.requirements import PipelineError

UPDATE = os.environ.get("ATTNC_UPDATE_GOLDEN") == "1"
INPUTS = sorted(GOLDEN.glob("*/*.in.ir"))
HAND_WRITTEN = [p for p in INPUTS if not p.with_name(p.name.removesuffix(".in.ir") + ".attn").exists()]
"""IR-only cases: `fuse/stale_hoisted_lets` is a fused pattern whose mask changed after fuse ran (its
hoisted lets and kernel mask are stale): fuse drops the stale lets and fuses the mask anew."""
STREAMING = GOLDEN / "derive-ranges" / "streaming"


def _case_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name.split('.')[0]}"


def _defines(attn: Path) -> dict[str, int | float | bool]:
    words = shlex.split(attn.read_text().splitlines()[0].removeprefix("# RUN:"))
    return dict(_parse_define(words[i + 1]) for i, w in enumerate(words) if w == "-D")


def _previous_stage(stage: str) -> str:
    return STAGES[STAGES.index(stage) - 1]


def _stages(attn: Path) -> Mapping[str, str]:
    """The text of every stage of a golden case, compiled as its RUN line says."""
    return _compile(attn)[0].stages


def _stage_text(case: str, stage: str) -> str:
    return _stages(GOLDEN / f"{case}.attn")[stage]


def _opt(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["opt", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# Golden inputs and per-pass golden outputs.


@pytest.mark.parametrize("path", CASES, ids=_case_id)
def test_golden_input_is_the_previous_stage(path: Path) -> None:
    actual = _stages(path)[_previous_stage(path.parent.name)]
    expected_path = path.with_suffix(".in.ir")
    if UPDATE:
        expected_path.write_text(actual)
    assert actual == expected_path.read_text()


@pytest.mark.parametrize("path", INPUTS, ids=_case_id)
def test_pass_alone_on_its_golden_input_gives_its_golden_output(path: Path) -> None:
    stage = path.parent.name
    attn = path.with_name(path.name.removesuffix(".in.ir") + ".attn")
    values = _defines(attn) if attn.exists() and stage == "bind-params" else {}
    actual = optimize(path.read_text(), [stage], values, filename=str(path))
    expected_path = path.with_name(path.name.removesuffix(".in.ir") + ".ir")
    if UPDATE and path in HAND_WRITTEN:
        expected_path.write_text(actual)
    assert actual == expected_path.read_text()


def test_every_golden_case_has_its_input() -> None:
    assert [p.with_suffix(".in.ir") for p in CASES if not p.with_suffix(".in.ir").exists()] == []


@pytest.mark.parametrize("path", CASES, ids=_case_id)
def test_whole_pipeline_on_the_input_stage_gives_the_compiled_ir(path: Path) -> None:
    stages = _stages(path)
    passes = [p.name for p in PIPELINE]
    assert optimize(stages["input"], passes, _defines(path)) == stages["fuse"]


def test_the_pass_registry_is_the_pipeline_in_its_order() -> None:
    assert list(PASSES.items()) == [(p.name, p) for p in PIPELINE]


def test_lower_triton_last_gives_the_kernel_source() -> None:
    stages = _stages(STREAMING.with_suffix(".attn"))
    assert optimize(stages["fuse"], ["lower-triton"]) == stages["lower-triton"]


def test_a_module_in_gives_a_module_out() -> None:
    module = parse_ir(STREAMING.with_suffix(".in.ir").read_text())
    result = optimize(module, ["derive-ranges"])
    assert isinstance(result, ModuleIR)
    assert result == parse_ir(STREAMING.with_suffix(".ir").read_text())


def test_a_pass_may_run_again_on_its_own_output() -> None:
    text = (GOLDEN / "fuse" / "hoisting.ir").read_text()
    assert optimize(text, ["fuse", "fuse"]) == text


def test_a_pass_run_twice_is_printed_as_a_stage_of_its_own() -> None:
    text = _stage_text("canonicalize/bounds_merge", "inline")
    out = io.StringIO()
    result = optimize(text, ["canonicalize", "bind-params", "canonicalize"], {"w": 8}, print_between=out)
    assert result == _stage_text("canonicalize/bounds_merge", "canonicalize")
    assert out.getvalue().endswith(f"// ----- IR after canonicalize (2) -----\n{result}\n")


# Requirements: each pass refuses input that lacks what it needs, naming the pass that provides it.


@pytest.mark.parametrize(
    ("case", "stage", "passes", "message"),
    [
        (
            "inline/pattern_refs",
            "input",
            "bind-params",
            "bind-params needs fn calls, pattern references "
            "and lets expanded, which the input lacks: run inline first",
        ),
        (
            "fuse/hoisting",
            "fuse",
            "inline",
            "inline needs IR that fuse has not run on (its lets are the kernel values' own)",
        ),
        (
            "inline/lets_any_order",
            "input",
            "canonicalize",
            "canonicalize needs fn calls, pattern "
            "references and lets expanded, which the input lacks: run inline first",
        ),
        (
            "derive-ranges/streaming",
            "inline",
            "classify-tiles",
            "classify-tiles needs parameters bound, which the input lacks: run bind-params first",
        ),
        (
            "canonicalize/causal_forms",
            "bind-params",
            "classify-tiles",
            "classify-tiles needs mask and "
            "score in canonical form, which the input lacks: run canonicalize first",
        ),
        (
            "canonicalize/causal_forms",
            "bind-params",
            "derive-ranges",
            "derive-ranges needs mask and "
            "score in canonical form, which the input lacks: run canonicalize first",
        ),
        (
            "canonicalize/causal_forms",
            "bind-params",
            "fuse",
            "fuse needs mask and score in canonical form, which the input lacks: run canonicalize first",
        ),
        (
            "derive-ranges/streaming",
            "canonicalize",
            "block-sparsify",
            "block-sparsify needs tile classes, which the input lacks: run classify-tiles first",
        ),
        (
            "derive-ranges/streaming",
            "classify-tiles",
            "block-sparsify",
            "block-sparsify needs key ranges "
            "(or proof that none exist in closed form), which the input lacks: run derive-ranges first",
        ),
        (
            "derive-ranges/streaming",
            "derive-ranges",
            "fuse,lower-triton",
            "lower-triton needs a sparsity, which the input lacks: run block-sparsify first",
        ),
        (
            "derive-ranges/streaming",
            "block-sparsify",
            "lower-triton",
            "lower-triton needs kernel values, which the input lacks: run fuse first",
        ),
    ],
    ids=lambda x: x if " " not in x else "",
)
def test_a_pass_refuses_input_lacking_what_it_requires(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str, stage: str, passes: str, message: str
) -> None:
    path = tmp_path / "in.ir"
    path.write_text(_stage_text(case, stage))
    assert _opt(capsys, str(path), "--passes", passes) == (1, "", f"attnc: error: {message}\n")


def test_a_requirement_provided_earlier_in_the_run_is_not_checked_again() -> None:
    text = _stage_text("derive-ranges/streaming", "canonicalize")
    with pytest.raises(PipelineError, match="run classify-tiles first"):
        optimize(text, ["derive-ranges", "block-sparsify"])
    assert optimize(text, ["classify-tiles", "derive-ranges", "block-sparsify"]) == _stage_text(
        "derive-ranges/streaming", "block-sparsify"
    )


def test_a_pass_earlier_in_the_pipeline_undoes_what_later_ones_provided() -> None:
    text = _stage_text("canonicalize/bounds_merge", "inline")  # `q - kv <= w`: w=8 makes two bounds
    with pytest.raises(PipelineError, match="classify-tiles needs mask and score in canonical form"):
        optimize(text, ["canonicalize", "bind-params", "classify-tiles"], {"w": 8})


def test_block_sparsify_needs_no_derive_ranges_where_no_closed_form_ranges_exist() -> None:
    case = "block-sparsify/metadata_b"
    assert optimize(_stage_text(case, "classify-tiles"), ["block-sparsify"]) == _stage_text(
        case, "block-sparsify"
    )


# Parameters for bind-params.


def test_bind_params_takes_values_that_specialise_and_defaults_for_the_rest() -> None:
    text = (GOLDEN / "bind-params" / "fold.in.ir").read_text()
    result = optimize(text, ["bind-params"], {"w": 16, "causal_only": False, "temp": 0.5})
    assert result == (GOLDEN / "bind-params" / "fold.ir").read_text()


def test_a_value_for_an_unknown_parameter_is_an_error() -> None:
    text = (GOLDEN / "bind-params" / "fold.in.ir").read_text()
    with pytest.raises(ParameterError, match=r"pattern 'p' has no parameter 'width' \(its parameters: w, "):
        optimize(text, ["bind-params"], {"width": 16})


def test_a_static_parameter_without_value_or_default_is_an_error() -> None:
    text = (GOLDEN / "bind-params" / "fold.in.ir").read_text()  # w shapes an input: static
    with pytest.raises(ParameterError, match="parameter 'w' of pattern 'p' has no default and was not given"):
        optimize(text, ["bind-params"])


def test_a_value_of_the_wrong_type_is_an_error() -> None:
    text = (GOLDEN / "bind-params" / "fold.in.ir").read_text()
    with pytest.raises(ParameterError, match="parameter 'causal_only' of pattern 'p' is bool, got 1"):
        optimize(text, ["bind-params"], {"w": 16, "causal_only": 1})


def test_values_for_a_pattern_bound_already_are_an_error() -> None:
    text = (GOLDEN / "bind-params" / "fold.ir").read_text()
    assert optimize(text, ["bind-params"]) == text
    with pytest.raises(PipelineError, match=r"pattern 'p' is bound already: no value to give \(w\)"):
        optimize(text, ["bind-params"], {"w": 16})


def test_values_without_bind_params_are_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(STREAMING.with_suffix(".in.ir"))
    assert _opt(capsys, path, "--passes", "derive-ranges", "-D", "window=4") == (
        1,
        "",
        "attnc: error: values for parameters (window) need bind-params among the passes\n",
    )


# The command line.


def test_opt_prints_the_result_of_the_passes_on_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(STREAMING.with_suffix(".in.ir"))
    expected = STREAMING.with_suffix(".ir").read_text()
    assert _opt(capsys, path, "--passes", "derive-ranges") == (0, expected, "")


def test_opt_reads_standard_input(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(STREAMING.with_suffix(".in.ir").read_bytes()))
    monkeypatch.setattr(sys, "stdin", stdin)
    expected = STREAMING.with_suffix(".ir").read_text()
    assert _opt(capsys, "-", "--passes", "derive-ranges") == (0, expected, "")


def test_opt_writes_the_result_to_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out.ir"
    path = str(STREAMING.with_suffix(".in.ir"))
    assert _opt(capsys, path, "--passes", "derive-ranges", "-o", str(out)) == (0, "", "")
    assert out.read_text() == STREAMING.with_suffix(".ir").read_text()


def test_opt_takes_values_for_bind_params(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(GOLDEN / "bind-params" / "fold.in.ir")
    args = ("-D", "w=16", "-D", "causal_only=false", "-D", "temp=0.5")
    expected = (GOLDEN / "bind-params" / "fold.ir").read_text()
    assert _opt(capsys, path, "--passes", "bind-params", *args) == (0, expected, "")


def test_opt_prints_between_passes(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(GOLDEN / "classify-tiles" / "affine.in.ir")
    status, out, _ = _opt(capsys, path, "--passes", "classify-tiles,derive-ranges", "--print-between-passes")
    assert status == 0
    assert [line for line in out.splitlines() if line.startswith("// -----")] == [
        "// ----- IR after input -----",
        "// ----- IR after classify-tiles -----",
        "// ----- IR after derive-ranges -----",
    ]
    assert out.endswith(_stage_text("classify-tiles/affine", "derive-ranges") + "\n")


def test_opt_rejects_an_unknown_pass_naming_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(STREAMING.with_suffix(".in.ir"))
    assert _opt(capsys, path, "--passes", "canonicalize,derive-range") == (
        1,
        "",
        "attnc: error: unknown pass 'derive-range' (passes: inline, bind-params, canonicalize, "
        "classify-tiles, derive-ranges, block-sparsify, fuse, lower-triton)\n",
    )


def test_opt_rejects_lower_triton_before_the_last_pass(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(STREAMING.with_suffix(".in.ir"))
    assert _opt(capsys, path, "--passes", "lower-triton,fuse") == (
        1,
        "",
        "attnc: error: lower-triton makes Triton source, not IR: it can only come last\n",
    )


def test_opt_reports_text_that_does_not_parse_at_its_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.ir"
    path.write_text("pattern p[] {\n  %0 = sub(q, kv) : int\n  %1 = frob(%0, 0) : bool\n  mask = %1\n}\n")
    assert _opt(capsys, str(path), "--passes", "canonicalize") == (
        1,
        "",
        f"{path}:3:3: error: 'frob' is not a valid Op\n"
        "    %1 = frob(%0, 0) : bool\n"
        "    ^~~~~~~~~~~~~~~~~~~~~~~\n",
    )


def test_opt_reports_a_use_before_definition_at_its_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.ir"
    path.write_text("pattern p[] {\n  %1 = ge(%0, 0) : bool\n  mask = %1\n}\n")
    status, out, err = _opt(capsys, str(path), "--passes", "canonicalize")
    assert (status, out) == (1, "")
    assert err.startswith(f"{path}:2:3: error: %0 used before it is defined\n")


def test_opt_reports_text_that_ends_inside_a_pattern(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.ir"
    path.write_text("pattern p[] {\n  %0 = ge(q, kv) : bool\n")
    status, _, err = _opt(capsys, str(path), "--passes", "canonicalize")
    assert status == 1
    assert err.startswith(f"{path}:2:3: error: the text ends inside a definition\n")


def test_opt_reports_ir_that_does_not_verify(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.ir"
    path.write_text("pattern p[] {\n  %0 = sub(q, kv) : bool\n  mask = %0\n}\n")
    status, out, err = _opt(capsys, str(path), "--passes", "canonicalize")
    assert (status, out) == (1, "")
    assert err.startswith(f"attnc: error: {path}: the IR does not verify: ")
    assert len(err.splitlines()) == 1


def test_opt_refuses_a_pattern_that_refers_to_itself(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "cycle.ir"
    path.write_text(
        "pattern a() {\n  %0 = pattern @b() : bool\n  mask = %0\n}\n\n"
        "pattern b() {\n  %0 = pattern @a() : bool\n  mask = %0\n}\n"
    )
    assert _opt(capsys, str(path), "--passes", "inline") == (
        1,
        "",
        f"attnc: error: {path}: a definition refers to itself: a -> b -> a\n",
    )


def test_opt_reports_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert _opt(capsys, "/nonexistent/x.ir", "--passes", "inline") == (
        1,
        "",
        "attnc: error: /nonexistent/x.ir: No such file or directory\n",
    )


def test_ir_text_error_is_an_attn_error() -> None:
    with pytest.raises(IRTextError, match="IR text has no pattern"):
        parse_ir("\n", "empty.ir")
