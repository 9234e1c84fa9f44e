"""`attnc bench` (attnc/bench.py): the smoke mode end to end through the command line — every pattern,
head configuration and mode, each attnc result held to the oracle before it was timed — and the
harness's parts: masks and pair counts, the dense reference, the check that gates timing, the derived
figures, the time budget, merging, and the report."""

from __future__ import annotations

import copy
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from attnc import bench
from attnc.cli import main
from attnc.runtime.backend import INTERPRETER, active

ROOT = Path(__file__).parents[1]
DEVICE = torch.device("cpu" if active() == INTERPRETER else "cuda")
SMOKE_LENGTH, SMOKE_HEADS = 64, 2


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], str, Path]:
    """`attnc bench --smoke`, run once: (exit status, the JSON report, the Markdown, the JSON's path)."""
    output = tmp_path_factory.mktemp("bench") / "smoke.json"
    status = main(["bench", "--smoke", "--output", str(output)])
    report = json.loads(output.read_text(encoding="utf-8"))
    return status, report, output.with_suffix(".md").read_text(encoding="utf-8"), output


def smoke_settings(*argv: str) -> bench.Settings:
    parser = bench.argparse.ArgumentParser()
    bench.configure_parser(parser)
    return bench.settings_from(parser.parse_args(["--smoke", *argv]))


def results(report: dict[str, Any]) -> list[tuple[dict[str, Any], str, dict[str, Any]]]:
    """(case, mode, the mode's results) for every case that ran."""
    return [(case, mode, case[mode]) for case in report["cases"] for mode in bench.MODES if mode in case]


# ---- the smoke run ---------------------------------------------------------------------------------------


def test_smoke_run_exits_0_and_names_device_versions_and_date(smoke) -> None:
    status, report, _, _ = smoke
    assert status == 0
    assert report["benchmark"] == "attention"
    assert report["date"] == datetime.date.today().isoformat()
    assert report["device_type"] == DEVICE.type and report["device"]
    assert report["torch"] == torch.__version__
    assert report["triton"] and report["attnc"] and report["python"]
    assert len(report["attnc_git"]["commit"]) == 40
    assert report["settings"]["smoke"] is True and report["settings"]["dtype"] == "bfloat16"


def test_smoke_run_covers_every_pattern_in_mha_and_gqa_both_modes(smoke) -> None:
    _, report, _, _ = smoke
    ran = {(c["pattern"], c["heads"], c["kv_heads"], c["length"], c["head_dim"]) for c in report["cases"]}
    assert ran == {(p, SMOKE_HEADS, kv, SMOKE_LENGTH, 16) for p in bench.PATTERNS for kv in (SMOKE_HEADS, 1)}
    assert len(report["cases"]) == len(ran)
    for case in report["cases"]:
        assert case["status"] == "ok", case
        assert set(bench.MODES) <= set(case)


def test_every_attnc_result_was_checked_against_the_oracle_and_the_reference_before_timing(smoke) -> None:
    _, report, _, _ = smoke
    checked = 0
    for case, mode, result in results(report):
        attnc_result = result["attnc"]
        assert attnc_result["status"] == "ok", (case["pattern"], mode)
        assert attnc_result["checks"]["oracle"]["ok"] is True
        assert attnc_result["checks"]["reference"]["ok"] is True
        names = ["out", "dq", "dk", "dv"] if mode == "forward_backward" else ["out"]
        assert list(attnc_result["checks"]["reference"]["errors"]) == names
        assert attnc_result["ms"] > 0 and attnc_result["calls"] >= 1 and attnc_result["first_call_s"] > 0
        checked += 1
    assert checked == 2 * 2 * len(bench.PATTERNS)


def test_every_mask_mod_was_checked_against_attncs_mask(smoke) -> None:
    _, report, _, _ = smoke
    checks = report["mask_checks"]
    assert set(checks) == set(bench.PATTERNS)
    for check in checks.values():
        assert check["ok"] and check["mismatches"] == 0 and check["allowed_pairs"] == check["counted_pairs"]


def test_flex_runs_checked_and_says_when_it_cannot_run(smoke) -> None:
    _, report, _, _ = smoke
    for case, mode, result in results(report):
        flex = result["flex"]
        if mode == "forward" or DEVICE.type == "cuda":
            assert flex["status"] == "ok" and flex["checks"]["reference"]["ok"], (case["pattern"], mode)
        else:
            assert flex["status"] == "unsupported" and "backward" in flex["reason"]
        mask = case["metadata"]["flex_block_mask"]
        assert mask["status"] == "ok" and mask["ms"] > 0
    if DEVICE.type == "cpu":
        assert report["flex"].startswith("eager")
        assert any("eagerly" in note for note in report["notes"])


def test_sdpa_runs_only_where_expressible_and_keeps_its_fastest_checked_backend(smoke) -> None:
    _, report, _, _ = smoke
    for case, _mode, result in results(report):
        if case["pattern"] not in ("full", "causal"):
            assert "sdpa" not in result
            continue
        sdpa = result["sdpa"]
        assert sdpa["status"] == "ok"
        passed = {n: r for n, r in sdpa["backends"].items() if r["status"] == "ok"}
        assert all(r["checks"]["reference"]["ok"] for r in passed.values())
        assert set(sdpa["backends"]) == set(bench.SDPA_BACKENDS)
        assert sdpa["backend"] in passed and sdpa["ms"] == min(r["ms"] for r in passed.values())


def test_allowed_pairs_are_the_oracle_masks_count(smoke) -> None:
    _, report, _, _ = smoke
    for case in report["cases"]:
        shape = bench.Shape(case["length"], case["batch"], case["heads"])
        workload = bench.PATTERNS[case["pattern"]](shape, bench.SMOKE_SCALE, DEVICE, 0)
        mask = workload.kernel.mask(
            shape.length, shape.length, batch=1, num_heads=shape.heads, **workload.inputs
        )
        assert case["allowed_pairs"] == int(mask.sum()), case["pattern"]
        assert case["density"] == pytest.approx(case["allowed_pairs"] / (shape.heads * shape.length**2))
        assert case["flops"]["forward"] == 4 * case["allowed_pairs"] * case["head_dim"]
        assert case["flops"]["forward_backward"] == pytest.approx(3.5 * case["flops"]["forward"])


def test_derived_figures_follow_from_the_times(smoke) -> None:
    _, report, _, _ = smoke
    full = {(c["kv_heads"], m): c[m] for c in report["cases"] if c["pattern"] == "full" for m in bench.MODES}
    for case, mode, result in results(report):
        attnc_result, flex = result["attnc"], result["flex"]
        assert attnc_result["tflops"] == pytest.approx(case["flops"][mode] / attnc_result["ms"] / 1e9)
        derived = case["derived"][mode]
        if flex["status"] == "ok":
            assert derived["speedup_vs_flex"] == pytest.approx(flex["ms"] / attnc_result["ms"])
        else:
            assert derived["speedup_vs_flex"] is None
        dense = min(full[case["kv_heads"], mode]["attnc"]["ms"], full[case["kv_heads"], mode]["sdpa"]["ms"])
        assert derived["dense_ms"] == dense
        assert derived["ideal_fraction"] == pytest.approx(dense * case["density"] / attnc_result["ms"])


def test_markdown_has_a_row_per_case_and_mode_and_the_metadata_table(smoke) -> None:
    _, report, text, _ = smoke
    assert text.startswith(f"## Attention kernels on {report['device']}, {report['date']}")
    sections = text.split("\n### ")
    assert [s.splitlines()[0] for s in sections[1:]] == ["forward", "forward + backward", "launch metadata"]
    for section in sections[1:3]:
        rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
        assert len(rows) == 1 + len(report["cases"])  # the header and a row per case
        assert "| causal | 64 | 16 | 2/1 | 0.508 |" in section
    metadata = [line for line in sections[3].splitlines() if line.startswith("| ")]
    assert len(metadata) == 1 + len(bench.PATTERNS)
    assert "Checks: 40 attnc results timed, each checked first" in text
    for note in report["notes"]:
        assert f"- {note}" in text


def test_merge_combines_reports_and_derives_anew(smoke, tmp_path: Path) -> None:
    _, report, _, _ = smoke
    parts = []
    for kv_heads in (SMOKE_HEADS, 1):
        part = copy.deepcopy(dict(report, cases=[c for c in report["cases"] if c["kv_heads"] == kv_heads]))
        for case in part["cases"]:
            case.pop("derived")
        path = tmp_path / f"part{kv_heads}.json"
        path.write_text(json.dumps(part), encoding="utf-8")
        parts.append(str(path))
    merged_path = tmp_path / "merged.json"
    assert main(["bench", "--merge", *parts, "--output", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text(encoding="utf-8"))
    assert merged["merged_from"] == parts
    assert [c["derived"] for c in merged["cases"]] == [c["derived"] for c in report["cases"]]
    # two head configurations x two modes, and the launch metadata table
    assert merged_path.with_suffix(".md").read_text(encoding="utf-8").count("| causal | 64 |") == 5


# ---- the parts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", list(bench.PATTERNS))
def test_mask_mods_equal_attncs_masks_with_several_batch_rows_and_heads(pattern: str) -> None:
    shape = bench.Shape(100, 2, 3)  # a 10 x 10 grid; the block map's last block is cut by the length
    workload = bench.PATTERNS[pattern](shape, bench.SMOKE_SCALE, DEVICE, 1)
    check = bench.check_mask(workload, shape, DEVICE)
    assert check["ok"] and check["mismatches"] == 0, check
    assert check["counted_pairs"] == check["allowed_pairs"] > 0


def test_counting_in_blocks_of_rows_gives_the_same_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = bench.Shape(96, 2, 3)
    workload = bench.PATTERNS["block_sparse"](shape, bench.SMOKE_SCALE, DEVICE, 0)
    whole = bench.allowed_pairs(workload, shape, DEVICE)
    monkeypatch.setattr(bench, "ROW_ELEMENTS", 2 * 3 * 96 * 7)  # blocks of 7 rows
    assert len(list(bench.row_blocks(shape, 2 * 3))) == 14
    assert bench.allowed_pairs(workload, shape, DEVICE) == whole


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_the_dense_reference_in_float64_is_attncs_oracle(
    kv_heads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "ROW_ELEMENTS", 2 * 40 * 20)  # several blocks of query rows
    shape = bench.Shape(40, 1, 2)
    workload = bench.PATTERNS["document_causal"](shape, bench.SMOKE_SCALE, DEVICE, 0)
    tensors = bench.random_tensors(bench.HeadConfig(8, 2, kv_heads), shape, torch.float64, 0, DEVICE)
    args = (tensors.q, tensors.k, tensors.v, tensors.dout, torch.float64)
    dense, oracle = bench.dense_attention(workload, shape, *args), bench.oracle_attention(workload, *args)
    leaves = [t.clone().requires_grad_() for t in (tensors.q, tensors.k, tensors.v)]
    out = workload.kernel.reference(*leaves, **workload.inputs)
    grads = torch.autograd.grad(out, leaves, tensors.dout)
    for judge in (dense, oracle):
        torch.testing.assert_close(judge.out, out, rtol=1e-12, atol=1e-12)
        assert judge.grads is not None
        for ours, theirs in zip(judge.grads, grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_the_oracle_in_the_input_dtype_rounds_its_gradients_to_it() -> None:
    shape = bench.Shape(16, 1, 1)
    workload = bench.PATTERNS["causal"](shape, bench.SMOKE_SCALE, DEVICE, 0)
    tensors = bench.random_tensors(bench.HeadConfig(8, 1, 1), shape, torch.bfloat16, 0, DEVICE)
    low = bench.oracle_attention(workload, tensors.q, tensors.k, tensors.v, tensors.dout, torch.bfloat16)
    high = bench.oracle_attention(workload, tensors.q, tensors.k, tensors.v, tensors.dout, torch.float64)
    assert low.out.dtype == high.out.dtype == torch.float64
    assert low.grads is not None and high.grads is not None
    assert {g.dtype for g in low.grads} == {torch.bfloat16} and {g.dtype for g in high.grads} == {
        torch.float64
    }
    assert 0 < (low.out - high.out).abs().max() < 0.05


def test_a_query_that_sees_no_key_gets_zero_in_the_reference() -> None:
    shape = bench.Shape(8, 1, 1)
    workload = bench.PATTERNS["causal"](shape, bench.SMOKE_SCALE, DEVICE, 0)
    workload = bench.dataclasses.replace(workload, mask_mod=lambda b, h, q, kv: (kv <= q) & (q != 3))
    tensors = bench.random_tensors(bench.HeadConfig(4, 1, 1), shape, torch.float32, 0, DEVICE)
    dense = bench.dense_attention(
        workload, shape, tensors.q, tensors.k, tensors.v, tensors.dout, torch.float32
    )
    assert (dense.out[0, 0, 3] == 0).all() and not dense.out.isnan().any()
    assert dense.grads is not None and not any(g.isnan().any() for g in dense.grads)


def reference_for(workload: bench.Workload, shape: bench.Shape, tensors: bench.Tensors) -> bench.Reference:
    high, low = (
        bench.dense_attention(workload, shape, tensors.q, tensors.k, tensors.v, tensors.dout, precision)
        for precision in (torch.float32, torch.bfloat16)
    )
    return bench.Reference(high, low, torch.bfloat16)


@pytest.mark.parametrize("mode", bench.MODES)
def test_a_contender_that_fails_the_check_is_not_timed(mode: str) -> None:
    shape = bench.Shape(32, 1, 2)
    workload = bench.PATTERNS["causal"](shape, bench.SMOKE_SCALE, DEVICE, 0)
    tensors = bench.random_tensors(bench.HeadConfig(8, 2, 2), shape, torch.bfloat16, 0, DEVICE)
    reference = reference_for(workload, shape, tensors)
    calls = []

    def wrong(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return q * 0 + (k.sum() + v.sum()) * 0  # zeros, and differentiable

    result = bench.measure(wrong, mode, tensors, reference, bench.Timing(1, 1, 3), 1.0)
    assert result["status"] == "check failed" and "ms" not in result
    assert (
        result["checks"]["reference"]["ok"] is False and "MISMATCH" in result["checks"]["reference"]["text"]
    )
    assert calls == [1]  # the first call only


def test_a_contender_that_passes_is_timed_with_its_flops() -> None:
    shape = bench.Shape(32, 1, 2)
    workload = bench.PATTERNS["causal"](shape, bench.SMOKE_SCALE, DEVICE, 0)
    tensors = bench.random_tensors(bench.HeadConfig(8, 2, 2), shape, torch.bfloat16, 0, DEVICE)
    reference = reference_for(workload, shape, tensors)
    result = bench.measure(
        bench.sdpa_attention(causal=True, gqa=False),
        "forward",
        tensors,
        reference,
        bench.Timing(1, 1, 3),
        1e6,
    )
    assert result["status"] == "ok" and result["checks"]["reference"]["ok"]
    assert result["ms"] > 0 and result["calls"] >= 1
    if DEVICE.type == "cpu":
        assert result["calls"] == 3  # the repeats (on a GPU, do_bench decides)
    assert result["tflops"] == pytest.approx(1e6 / result["ms"] / 1e9)


@pytest.mark.parametrize(
    ("error", "status"),
    [(NotImplementedError("no backward here"), "unsupported"), (RuntimeError("boom"), "error")],
)
def test_a_contender_that_raises_is_recorded(error: Exception, status: str) -> None:
    shape = bench.Shape(16, 1, 1)
    workload = bench.PATTERNS["full"](shape, bench.SMOKE_SCALE, DEVICE, 0)
    tensors = bench.random_tensors(bench.HeadConfig(8, 1, 1), shape, torch.bfloat16, 0, DEVICE)

    def raising(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise error

    result = bench.measure(
        raising, "forward", tensors, reference_for(workload, shape, tensors), bench.Timing(1, 1, 1), 1.0
    )
    assert result == {"status": status, "reason": f"{type(error).__name__}: {error}"}


def test_a_mask_mod_that_disagrees_stops_its_pattern_from_being_timed(tmp_path: Path) -> None:
    def off_by_one(shape: bench.Shape, scale: bench.Scale, device: torch.device, seed: int) -> bench.Workload:
        causal = bench.PATTERNS["causal"](shape, scale, device, seed)
        return bench.dataclasses.replace(causal, mask_mod=lambda b, h, q, kv: kv < q)

    lines: list[str] = []
    settings = smoke_settings("--patterns", "causal", "--gqa-kv-heads", "0")
    report = bench.run(settings, DEVICE, tmp_path / "r.json", {"causal": off_by_one}, lines.append)
    check = report["mask_checks"]["causal"]
    assert not check["ok"] and check["mismatches"] == SMOKE_HEADS * SMOKE_LENGTH  # the diagonal, per head
    [case] = report["cases"]
    assert case["status"] == "mask mismatch" and "forward" not in case
    assert bench.failed(report)
    assert "mask check causal at L=64: MISMATCH (128 pairs differ)" in lines
    assert "- mask mismatch: causal at 64 tokens: 128 pairs differ" in (tmp_path / "r.md").read_text()


def test_past_the_time_budget_cases_are_recorded_as_skipped(tmp_path: Path) -> None:
    settings = smoke_settings("--patterns", "causal", "full", "--time-budget-s", "0")
    report = bench.run(settings, DEVICE, tmp_path / "r.json", log=lambda line: None)
    assert [c["status"] for c in report["cases"]] == ["skipped"] * 4
    assert all(c["reason"] == "past the time budget of 0 s" for c in report["cases"])
    assert not bench.failed(report)
    assert json.loads((tmp_path / "r.json").read_text())["cases"] == report["cases"]


def test_smoke_settings_and_their_overrides() -> None:
    settings = smoke_settings()
    assert settings.lengths == (SMOKE_LENGTH,) and settings.scale == bench.SMOKE_SCALE
    assert settings.configs == (bench.HeadConfig(16, 2, 2), bench.HeadConfig(16, 2, 1))
    assert not settings.flex_compiled and settings.timing.repeats == 1
    settings = smoke_settings(
        "--lengths", "96", "--gqa-kv-heads", "0", "--flex", "compiled", "--modes", "forward"
    )
    assert settings.lengths == (96,) and settings.configs == (bench.HeadConfig(16, 2, 2),)
    assert settings.flex_compiled and settings.modes == ("forward",)
    assert smoke_settings("--head-dims").configs == (bench.HeadConfig(16, 2, 1),)  # the GQA case alone


def test_gpu_settings_are_the_issues_sweep() -> None:
    parser = bench.argparse.ArgumentParser()
    bench.configure_parser(parser)
    settings = bench.settings_from(parser.parse_args([]))
    assert settings.lengths == (4096, 16384, 32768) and settings.dtype == torch.bfloat16
    assert settings.configs == (
        bench.HeadConfig(128, 16, 16),
        bench.HeadConfig(64, 16, 16),
        bench.HeadConfig(128, 16, 4),
    )
    assert settings.flex_compiled and settings.methods == bench.METHODS and settings.modes == bench.MODES
    assert settings.scale.window == 1024 and settings.scale.block_density == 0.1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--smoke", "--gqa-kv-heads", "3"], "--gqa-kv-heads must divide the 2 query heads"),
        (["--smoke", "--lengths", "0"], "--lengths must be positive"),
        (["--smoke", "--head-dims", "--gqa-kv-heads", "0"], "no head configuration"),
        (["--merge", "a.json"], "--merge needs --output"),
    ],
)
def test_bad_settings_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnc bench: error: {message}") and "Traceback" not in err


@pytest.mark.skipif(DEVICE.type == "cuda", reason="needs a process without a GPU")
def test_without_a_gpu_the_full_sweep_asks_for_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert "--smoke runs tiny sizes on the CPU" in capsys.readouterr().err


def test_document_ids_pack_documents_of_log_normal_lengths() -> None:
    ids = bench.document_ids(1 << 16, 2, 512, 0, torch.device("cpu"))
    assert ids.shape == (2, 1 << 16) and ids.dtype == torch.int32
    steps = ids.diff(dim=1)
    assert ((steps == 0) | (steps == 1)).all() and (ids[:, 0] == 0).all()
    assert not torch.equal(ids[0], ids[1])  # each batch row packs its own documents
    lengths = torch.unique_consecutive(ids[0], return_counts=True)[1][:-1].double()  # the last one is cut
    assert 400 < lengths.median() < 650 and lengths.max() > 4 * 512


def test_block_maps_give_every_query_block_the_same_number_of_key_blocks() -> None:
    blocks = bench.block_map(2, 3, 20, 40, 0.1, seed=0)
    assert blocks.shape == (2, 3, 20, 40) and (blocks.sum(-1) == 4).all()
    assert not torch.equal(blocks[0, 0], blocks[0, 1])
    assert (bench.block_map(1, 1, 4, 4, 0.1, seed=0).sum(-1) == 1).all()  # at least one


@pytest.mark.parametrize(
    ("length", "grid"),
    [(64, (8, 8)), (128, (8, 16)), (4096, (64, 64)), (32768, (128, 256)), (96, (8, 12)), (7, (1, 7))],
)
def test_near_square_grids(length: int, grid: tuple[int, int]) -> None:
    assert bench.near_square_grid(length) == grid


def test_the_script_runs_the_same_harness() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--smoke" in done.stdout and "FlexAttention" in done.stdout
