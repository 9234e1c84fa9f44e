"""The IR: printer/parser round-trip at every stage, the verifier, and the pass manager."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

import attnc
from attnc.compiler import compile_pattern
from attnc.errors import InternalError
from attnc.ir import evaluate as oracle
from attnc.ir.nodes import ModuleIR, Node, Op, PatternIR, Type, const, var
from attnc.ir.parser import IRParseError, parse_module
from attnc.ir.printer import print_module
from attnc.ir.verify import verify

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.attn"))

# Parameters for the stdlib patterns that have no defaults.
STDLIB_PARAMS = {
    "sliding_window": {"window": 3},
    "local": {"left": 2, "right": 1},
    "sinks": {"count": 2},
    "prefix_lm": {"prefix": 3},
    "dilated": {"window": 2, "dilation": 2},
    "neighborhood_1d": {"kernel": 3, "dilation": 2},
    "neighborhood_2d": {"height": 3, "width": 4, "kernel_h": 3, "kernel_w": 3},
    "neighborhood_3d": {"depth": 2, "height": 2, "width": 3, "kernel_d": 1, "kernel_h": 1, "kernel_w": 3},
}


def all_kernels() -> list[tuple[str, attnc.Kernel]]:
    kernels = [
        (f"stdlib.{n}", attnc.stdlib()[n](**STDLIB_PARAMS.get(n, {}))) for n in attnc.stdlib().patterns
    ]
    for path in EXAMPLES:
        module = attnc.load(path)
        kernels += [(f"{path.stem}.{n}", module[n]()) for n in module.own_patterns]
    return kernels


KERNELS = all_kernels()


@pytest.mark.parametrize(("name", "kernel"), KERNELS, ids=[n for n, _ in KERNELS])
def test_every_stage_round_trips_through_text(name: str, kernel: attnc.Kernel) -> None:
    for stage, module in kernel._compiled.modules.items():
        text = kernel.stages[stage]
        assert parse_module(text) == module, stage
        assert print_module(parse_module(text)) == text, stage


@pytest.mark.parametrize(("name", "kernel"), KERNELS, ids=[n for n, _ in KERNELS])
def test_canonical_ir_means_what_the_source_means(name: str, kernel: attnc.Kernel) -> None:
    inputs = {}
    if "document" in name:
        inputs["doc"] = torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 4]], dtype=torch.int32)
    env = oracle.Env(1, 1, 12, 12, torch.device("cpu"), inputs)
    expected = oracle.mask(kernel._compiled.modules["bind-params"].entry, env)
    actual = oracle.mask(kernel.pattern, env)
    assert torch.equal(actual.expand(1, 1, 12, 12), expected.expand(1, 1, 12, 12))


def test_kernel_keeps_every_stage_in_pipeline_order() -> None:
    kernel = attnc.stdlib().causal()
    assert list(kernel.stages) == [
        "input", "inline", "bind-params", "canonicalize", "classify-tiles", "derive-ranges", "block-sparsify"
    ]  # fmt: skip
    assert kernel.ir() == kernel.ir("block-sparsify")
    assert "ge(%0, 0)" in kernel.ir("canonicalize")


def test_asking_for_an_unknown_stage_names_the_stages() -> None:
    with pytest.raises(ValueError, match="inline, bind-params"):
        attnc.stdlib().causal().ir("fuse")


def test_verifier_rejects_an_ill_typed_node() -> None:
    bad = Node(Op.ADD, Type.BOOL, (var("q"), var("kv")))
    module = ModuleIR((), (PatternIR("p", mask=bad),))
    with pytest.raises(InternalError, match="add typed bool"):
        verify(module)


def test_verifier_rejects_a_load_of_an_undeclared_input() -> None:
    load = Node(Op.LOAD, Type.BOOL, (var("q"),), "missing")
    with pytest.raises(InternalError, match="undeclared input @missing"):
        verify(ModuleIR((), (PatternIR("p", mask=load),)))


def test_verifier_rejects_the_score_in_a_mask() -> None:
    mask = Node(Op.GT, Type.BOOL, (Node(Op.SCORE, Type.FLOAT), const(0.0)))
    with pytest.raises(InternalError, match="score s used outside score"):
        verify(ModuleIR((), (PatternIR("p", mask=mask),)))


def test_ir_parser_rejects_a_use_before_definition() -> None:
    with pytest.raises(IRParseError, match="%3 used before it is defined"):
        parse_module("pattern p[] {\n  mask = %3\n}\n")


def test_print_between_passes_writes_every_stage() -> None:
    out = io.StringIO()
    module = attnc.stdlib()["sliding_window"]._module_ir
    compile_pattern(module, (("window", 4),), print_between=out)
    text = out.getvalue()
    for stage in ("input", "inline", "bind-params", "canonicalize"):
        assert f"// ----- IR after {stage} -----" in text
    assert "le(%0, 3)" in text


def test_dump_dir_receives_one_file_per_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_DUMP_DIR", str(tmp_path))
    kernel = attnc.stdlib().sinks(count=2)
    files = sorted(p.name for p in (tmp_path / "stdlib.sinks").iterdir())
    assert files == [
        "00-input.ir", "01-inline.ir", "02-bind-params.ir", "03-canonicalize.ir", "04-classify-tiles.ir",
        "05-derive-ranges.ir", "06-block-sparsify.ir",
    ]  # fmt: skip
    assert (tmp_path / "stdlib.sinks" / "03-canonicalize.ir").read_text() == kernel.ir("canonicalize")
    assert (tmp_path / "stdlib.sinks" / "06-block-sparsify.ir").read_text() == kernel.ir()


def test_constants_keep_their_type_in_text() -> None:
    module = parse_module(
        "pattern p[] {\n  %0 = tofloat(q) : float\n  %1 = gt(%0, 1.0) : bool\n  mask = %1\n}\n"
    )
    comparison = module.entry.mask
    assert comparison is not None
    assert comparison.args[1] == const(1.0)
    assert comparison.args[1] != const(1)
