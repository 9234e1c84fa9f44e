"""The command line on hostile options, files and environments (the CLI rows of
`reports/reliability-probe.md`): every user mistake is one line naming the option, file or variable,
with exit status 1 (2 for a malformed option, as argparse reports it; 2 for `attnc bench`'s settings),
never a Python traceback; options are checked before anything long runs; a bug of attnc itself keeps its
traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnc import bench, cli
from attnc.cli import main
from attnc.errors import InternalError

ROOT = Path(__file__).parents[1]
STREAMING = str(ROOT / "examples" / "streaming_llm.attn")
DOCUMENT = str(ROOT / "examples" / "document_causal.attn")
CASE_HEADER = (
    '# attnc fuzz case: {"block": [16, 16], "file": null, "grads": false, "kind": "kernel", "params": {}, '
    '"pattern": "p", "seed": 0, "shape": [1, 1, 1, 8, 8, 16, 16, "float32"]}'
)


def one_line_error(
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    *names: str,
    status: int = 1,
    prefix: str = "attnc: error: ",
) -> str:
    """Run `attnc ARGV...`: it must exit with `status` and exactly one line on stderr, starting with
    `prefix` and naming each of `names`. That line."""
    assert main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    for name in names:
        assert name in lines[0]
    return lines[0]


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], option: str) -> str:
    """Run `attnc ARGV...`: argparse must refuse it (exit 2), its last line naming `option`. That line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert f"error: argument {option}: " in last, err
    return last


def bench_error(capsys: pytest.CaptureFixture[str], argv: list[str], *names: str) -> str:
    """Run `attnc bench ARGV...`: a bad setting, one line `attnc bench: error: ...`, exit status 2."""
    return one_line_error(capsys, ["bench", *argv], *names, status=2, prefix="attnc bench: error: ")


def attnc(*argv: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m attnc ARGV...` in a process of its own (environment variables read once per process)."""
    return subprocess.run(
        [sys.executable, "-m", "attnc", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        cwd=cwd,
    )


# ---- the general mechanism of `main` --------------------------------------------------------------------


def test_an_os_error_names_its_file_and_reason_not_the_errno(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(args: object) -> int:
        raise FileNotFoundError(2, "No such file or directory", "some/file.attn")

    monkeypatch.setattr(cli, "_cmd_check", missing)
    line = one_line_error(capsys, ["check", "x.attn"])
    assert line == "attnc: error: some/file.attn: No such file or directory"


def test_a_value_error_from_deep_inside_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def deep(args: object) -> int:
        raise ValueError("Overflow when unpacking long long\nmore detail")

    monkeypatch.setattr(cli, "_cmd_check", deep)
    assert one_line_error(capsys, ["check", "x.attn"]) == "attnc: error: Overflow when unpacking long long"


def test_an_internal_error_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise InternalError("an invariant broke")

    monkeypatch.setattr(cli, "_cmd_check", broken)
    assert main(["check", "x.attn"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "InternalError: an invariant broke" in err
    assert err.splitlines()[-1].startswith("attnc: internal error: a bug in attnc; please report it")


def test_ctrl_c_is_one_line_and_the_shells_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_check", interrupted)
    assert main(["check", "x.attn"]) == 130
    assert capsys.readouterr().err == "attnc: interrupted\n"


# ---- row 17: sizes, seeds, environment and files that raised tracebacks ------------------------------


@pytest.mark.parametrize("shape", ["1,1,1000000000000,16", "100000,100000,8,16"])
def test_run_refuses_a_shape_the_memory_cannot_hold_before_allocating(
    capsys: pytest.CaptureFixture[str], shape: str
) -> None:
    line = one_line_error(capsys, ["run", STREAMING, "-p", "causal", "--shape", shape], f"--shape {shape}")
    assert "needs about" in line


CPU_ALLOCATION = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 64000000000000 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(CPU_ALLOCATION),
        torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 58.21 TiB.\nOf the allocated memory ..."
        ),
        MemoryError(),
    ],
    ids=["cpu", "cuda", "python"],
)
def test_a_failed_allocation_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: BaseException
) -> None:
    # The allocator's refusal, simulated: a real one could instead overcommit and meet the OOM killer.
    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise error

    monkeypatch.setattr(torch, "randn", refuse)
    argv = ["run", STREAMING, "-p", "causal", "--shape", "1,1,8,16", "--no-check"]
    assert one_line_error(capsys, argv).startswith("attnc: error: out of memory")


@pytest.mark.parametrize(
    "argv",
    [
        ["run", STREAMING, "-p", "causal", "--shape", "1,1,8,16", "--seed", "99999999999999999999999"],
        ["run", STREAMING, "-p", "causal", "--shape", "1,1,8,16", "--seed", "-1"],
        ["show", DOCUMENT, "-p", "document_causal", "--q-len", "8", "--random-inputs", str(2**64)],
        ["fuzz", "--seed", str(2**63)],
    ],
)
def test_a_seed_out_of_64_bits_is_a_usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    option = "--random-inputs" if "--random-inputs" in argv else "--seed"
    assert "a seed is an int from 0 to 2**63 - 1" in usage_error(capsys, argv, option)


@pytest.mark.parametrize(
    "args",
    [
        ["-p", "causal", "--q-len", "1000000000000"],
        ["-p", "causal", "--q-len", "1073741824"],
        ["-p", "causal", "--q-len", "262144", "--block", "16,16"],
    ],
)
def test_show_refuses_a_tile_map_too_large_to_compute(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    assert "the tile map would have" in one_line_error(capsys, ["show", STREAMING, *args], "tiles")


def test_show_refuses_a_block_side_past_its_limit(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["show", STREAMING, "-p", "causal", "--q-len", "64", "--block", "99999999999999999999,16"]
    one_line_error(capsys, argv, "block sides are at most 4096")


def test_show_refuses_a_huge_batch_row_before_drawing_its_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["show", DOCUMENT, "-p", "document_causal", "--q-len", "64", "--batch", "1000000000"]
    one_line_error(capsys, [*argv, "--random-inputs", "0"], "1000000001 batch rows")


def test_a_bad_attnc_config_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "abc")
    argv = ["run", STREAMING, "-p", "causal", "--shape", "1,1,8,16", "--repeat", "1", "--no-check"]
    one_line_error(capsys, argv, "ATTNC_CONFIG", "'abc'")


@pytest.mark.parametrize("max_len", ["0", "-3"])
def test_fuzz_max_len_below_1_is_a_usage_error(capsys: pytest.CaptureFixture[str], max_len: str) -> None:
    usage_error(capsys, ["fuzz", "--max-len", max_len, "--seconds", "1"], "--max-len")


def test_fuzz_replay_of_a_file_that_is_not_a_case_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notcase.attn"
    path.write_text("pattern p { mask = kv <= q }\n")
    one_line_error(capsys, ["fuzz", "--replay", str(path)], str(path), "not an attnc fuzz case")


@pytest.mark.parametrize(
    "header",
    [
        '# attnc fuzz case: {"block": [16, 16]',  # cut JSON
        "# attnc fuzz case: []",  # not an object
        '# attnc fuzz case: {"block": [16, 16], "pattern": "p", "shape": [1, 1]}',  # fields missing
    ],
)
def test_fuzz_replay_of_a_malformed_case_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], header: str
) -> None:
    path = tmp_path / "bad.attn"
    path.write_text(header + "\npattern p { mask = kv <= q }\n")
    one_line_error(capsys, ["fuzz", "--replay", str(path)], str(path), "malformed")


def test_fuzz_replay_of_text_that_is_not_utf8_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "latin1.attn"
    path.write_bytes(CASE_HEADER.encode() + b"\npattern p { mask = kv <= q } # \xe9\n")
    one_line_error(capsys, ["fuzz", "--replay", str(path)], str(path))


def test_fuzz_replay_of_a_directory_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(capsys, ["fuzz", "--replay", str(tmp_path)], f"{tmp_path}: Is a directory")


def test_fuzz_replay_reads_every_file_before_running_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from attnc.testing import fuzz

    good = tmp_path / "good.attn"
    good.write_text(CASE_HEADER + "\npattern p { mask = kv <= q }\n")
    ran: list[object] = []
    monkeypatch.setattr(fuzz, "run_case", ran.append)
    one_line_error(capsys, ["fuzz", "--replay", str(good), str(tmp_path / "nope.attn")], "nope.attn")
    assert ran == []


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("garbage", "not a JSON report"),
        ("[1, 2]", "not an attnc bench report"),
        ('{"device": "cpu", "settings": {"modes": []}, "mask_checks": {}, "cases": [{}]}', "malformed"),
    ],
)
def test_bench_merge_of_a_file_that_is_not_a_report_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, reason: str
) -> None:
    path = tmp_path / "garbage.json"
    path.write_text(content)
    output = tmp_path / "out.json"
    bench_error(capsys, ["--merge", str(path), "--output", str(output)], reason)
    assert not output.exists()


def test_a_dump_dir_that_is_a_file_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    done = attnc("ir", STREAMING, "-p", "causal", env={"ATTNC_DUMP_DIR": "afile"}, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "attnc: error: afile/stdlib.causal: Not a directory (under ATTNC_DUMP_DIR=afile)"
    ]


# ---- row 18: bench --output checked before the run ----------------------------------------------------


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """`bench.run` replaced: what it was called with (a check that comes first leaves it empty)."""
    calls: list[object] = []
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: calls.append(args) or {})
    return calls


def test_bench_output_that_is_a_directory_fails_before_running(
    tmp_path: Path, no_run: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    bench_error(capsys, ["--smoke", "--output", str(tmp_path)], f"--output {tmp_path}", "is a directory")
    assert no_run == []


def test_bench_output_whose_markdown_path_is_a_directory_fails_before_running(
    tmp_path: Path, no_run: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "report.md").mkdir()
    bench_error(capsys, ["--smoke", "--output", str(tmp_path / "report.json")], "report.md is a directory")
    assert no_run == []


def test_bench_output_in_a_folder_that_cannot_be_made_fails_before_running(
    tmp_path: Path, no_run: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("")
    output = tmp_path / "afile" / "report.json"
    bench_error(capsys, ["--smoke", "--output", str(output)], f"--output {output}", "cannot write")
    assert no_run == []


def test_bench_output_named_like_its_markdown_fails_before_running(
    tmp_path: Path, no_run: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    bench_error(capsys, ["--smoke", "--output", str(tmp_path / "report.md")], "--output", ".json")
    assert no_run == []


def test_bench_merge_output_that_is_a_directory_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"device": "cpu", "settings": {"modes": []}, "mask_checks": {}, "cases": []}))
    (tmp_path / "out.json").mkdir()
    bench_error(capsys, ["--merge", str(part), "--output", str(tmp_path / "out.json")], "is a directory")
    assert not (tmp_path / "out.json.tmp").exists() and not (tmp_path / "out.md").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--time-budget-s", "nan"),
        ("--warmup-ms", "-1"),
        ("--rep-ms", "inf"),
        ("--seed", str(2**64)),
        ("--lengths", str(10**20)),
    ],
)
def test_bench_numbers_out_of_range_fail_before_running(
    no_run: list[object], capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    bench_error(capsys, ["--smoke", option, value], option)
    assert no_run == []


# ---- row 19: fuzz time budgets ----------------------------------------------------------------------


@pytest.mark.parametrize("seconds", ["nan", "inf", "-5", "0"])
def test_fuzz_seconds_must_be_finite_and_positive(capsys: pytest.CaptureFixture[str], seconds: str) -> None:
    line = usage_error(capsys, ["fuzz", "--seconds", seconds], "--seconds")
    assert "must be a finite number of seconds more than 0" in line


@pytest.mark.parametrize("seconds", ["nan", "-1"])
def test_fuzz_shrink_seconds_must_be_finite(capsys: pytest.CaptureFixture[str], seconds: str) -> None:
    usage_error(capsys, ["fuzz", "--shrink-seconds", seconds], "--shrink-seconds")


# ---- row 25: options that were silently ignored ----------------------------------------------------------


def test_ir_without_a_pattern_rejects_a_parameter_no_pattern_has(capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(capsys, ["ir", STREAMING, "-D", "typo=3"], "-D typo", "'typo'", STREAMING)


def test_ir_without_a_pattern_passes_a_parameter_to_the_patterns_that_have_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `window` belongs to streaming_llm (the file's own pattern): accepted, and used.
    assert main(["ir", STREAMING, "-D", "window=7", "--after", "bind-params"]) == 0
    assert "window=7" in capsys.readouterr().out


def test_fuzz_p_without_pattern_file_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(capsys, ["fuzz", "-p", "nope", "--seconds", "1"], "-p", "--pattern")


def test_fuzz_p_naming_no_pattern_of_the_file_fails_before_fuzzing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["fuzz", "--pattern", STREAMING, "-p", "nope", "--seconds", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran: no "attnc fuzz: seed ..." header
    assert captured.err.startswith("attnc: error: no pattern 'nope'") and len(captured.err.splitlines()) == 1


def test_fuzz_pattern_file_with_target_frontend_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(
        capsys,
        ["fuzz", "--pattern", STREAMING, "--target", "frontend", "--seconds", "1"],
        "--target frontend",
    )
