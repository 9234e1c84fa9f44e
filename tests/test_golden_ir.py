"""Golden IR tests: each `tests/golden/<pass>/<case>.attn` compiles to the IR in `<case>.ir` after that
pass. The first line, `# RUN: -p PATTERN [-D NAME=VALUE ...]`, says what to compile; as in `attnc ir`,
`-D` specialises the kernel on the value (the parameter is static there), and the other runtime
parameters stay symbols (`!name`). Set ATTNC_UPDATE_GOLDEN=1 to rewrite the expected files (then read
the diff before committing it)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

import attnc
from attnc.cli import _parse_define
from attnc.compiler import CompiledPattern, compile_pattern
from attnc.ir.parser import parse_module
from attnc.ir.printer import print_module
from attnc.passes import PASSES

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(GOLDEN.glob("*/*.attn"))


BindArgs = tuple[tuple[tuple[str, int | float | bool], ...], frozenset[str]]
"""What `bind-params` runs with: the parameter values, and the names `-D` specialises."""


def _compile(path: Path) -> tuple[CompiledPattern, BindArgs]:
    """The case compiled, and the arguments its `bind-params` ran with."""
    words = shlex.split(path.read_text().splitlines()[0].removeprefix("# RUN:"))
    pattern = attnc.load(path)[words[words.index("-p") + 1]]
    params = dict(_parse_define(words[i + 1]) for i, w in enumerate(words) if w == "-D")
    specialize = frozenset(params)
    values = pattern._bind((), params)
    return compile_pattern(pattern._module_ir, values, specialize=specialize), (values, specialize)


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_pass_output_matches_golden(path: Path) -> None:
    stage = path.parent.name
    actual = _compile(path)[0].stages[stage]
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
    compiled, bind_args = _compile(path)
    once = compiled.passes.modules[stage]
    pass_ = PASSES[stage](*bind_args) if stage == "bind-params" else PASSES[stage]()
    assert pass_.run(once) == once


def test_every_pass_has_golden_cases() -> None:
    assert {p.parent.name for p in CASES} == set(PASSES)
