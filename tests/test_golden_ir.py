"""Golden IR tests: each `tests/golden/<pass>/<case>.attn` compiles to the IR in `<case>.ir` after that
pass. The first line, `# RUN: -p PATTERN [-D NAME=VALUE ...]`, says what to compile. Set
ATTNC_UPDATE_GOLDEN=1 to rewrite the expected files (then read the diff before committing it)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

import attnc
from attnc.cli import _parse_define
from attnc.ir.parser import parse_module
from attnc.ir.printer import print_module
from attnc.passes import PASSES

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(GOLDEN.glob("*/*.attn"))


def _compile(path: Path) -> attnc.Kernel:
    words = shlex.split(path.read_text().splitlines()[0].removeprefix("# RUN:"))
    pattern = words[words.index("-p") + 1]
    params = dict(_parse_define(words[i + 1]) for i, w in enumerate(words) if w == "-D")
    return attnc.load(path)[pattern](**params)


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_pass_output_matches_golden(path: Path) -> None:
    stage = path.parent.name
    actual = _compile(path).ir(stage)
    expected_path = path.with_suffix(".ir")
    if os.environ.get("ATTNC_UPDATE_GOLDEN") == "1":
        expected_path.write_text(actual)
    assert actual == expected_path.read_text()


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*/*.ir")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_ir_round_trips(path: Path) -> None:
    text = path.read_text()
    assert print_module(parse_module(text)) == text


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_running_the_pass_twice_changes_nothing(path: Path) -> None:
    stage = path.parent.name
    kernel = _compile(path)
    once = kernel._compiled.passes.modules[stage]
    pass_ = PASSES[stage](tuple(kernel.params.items())) if stage == "bind-params" else PASSES[stage]()
    assert pass_.run(once) == once


def test_every_pass_has_golden_cases() -> None:
    assert {p.parent.name for p in CASES} == set(PASSES)
