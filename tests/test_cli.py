"""The `attnc` command line: diagnostics without tracebacks, IR output, parameters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from attnc.cli import main

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_check_accepts_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", *map(str, sorted(EXAMPLES.glob("*.attn")))]) == 0
    assert "streaming_llm.attn: ok (streaming_llm)" in capsys.readouterr().out


def test_check_reports_an_error_with_location_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.attn"
    bad.write_text("pattern p {\n    mask = q + true\n}\n")
    result = subprocess.run(
        [sys.executable, "-m", "attnc", "check", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"{bad}:2:14: error: operator '+' needs numbers, got int and bool")
    assert "    mask = q + true\n               ^" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "/nonexistent/x.attn"]) == 1
    assert "attnc: error: cannot read /nonexistent/x.attn" in capsys.readouterr().err


def test_ir_prints_the_final_stage_with_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ir", str(EXAMPLES / "streaming_llm.attn"), "-D", "window=16", "-D", "sinks=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pattern streaming_llm[window=16, sinks=2] {")
    assert "le(%0, 15)" in out and "le(kv, 1)" in out


def test_ir_after_a_named_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ir", str(EXAMPLES / "gemma_local.attn"), "-p", "gemma_local", "--after", "inline"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pattern gemma_local(window: int = 4096, cap: float = 50.0) {")
    assert "tanh" in out and "call" not in out


def test_ir_print_between_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ir", str(EXAMPLES / "streaming_llm.attn"), "--print-between-passes"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("// -----")] == [
        f"// ----- IR after {stage} -----"
        for stage in (
            "input",
            "inline",
            "bind-params",
            "canonicalize",
            "classify-tiles",
            "derive-ranges",
            "block-sparsify",
        )
    ]


def test_ir_rejects_an_unknown_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ir", str(EXAMPLES / "streaming_llm.attn"), "-p", "streaming_llm", "-D", "windw=3"]) == 1
    assert "has no parameter 'windw'" in capsys.readouterr().err


def test_ir_reports_a_missing_parameter_at_its_declaration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w.attn"
    path.write_text("pattern w(size: int) {\n    mask = q - kv < size\n}\n")
    assert main(["ir", str(path)]) == 1
    assert capsys.readouterr().err.startswith(
        f"{path}:1:11: error: parameter 'size' of pattern 'w' has no default"
    )
