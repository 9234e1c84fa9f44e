"""The differential fuzzer (`attnc.testing.fuzz`, `attnc fuzz`): its program generator, its driver
(finding, shrinking, saving and replaying a failure), the front-end fuzzer, a bounded run with a fixed
seed and a short one with a random seed, and the replay of every case in `tests/fuzz_corpus/`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.cli import main
from attnc.errors import AttnSyntaxError, Loc, SourceFile
from attnc.testing import fuzz
from attnc.testing.fuzz import Case, CaseFailure, frontend_problem, replay
from attnc.testing.programs import Shape, programs

CORPUS = Path(__file__).parent / "fuzz_corpus"
GENERATOR = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@GENERATOR
@given(programs())
def test_generated_programs_are_well_typed(program) -> None:
    attnc.loads(program.source)[program.pattern](**program.params)


def test_generated_programs_use_the_whole_language() -> None:
    """Over a few hundred programs, every construct the generator promises appears."""
    texts: list[str] = []

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(programs())
    def collect(program) -> None:
        texts.append(program.source)

    collect()
    text = "\n".join(texts)
    constructs = [
        "let ", "fn f", "pattern aux", "aux(", "sliding_window(", "local(", "=", "where(", "clamp(", "min(",
        "max(", "abs(", "tanh(", "sigmoid(", "exp(", "exp2(", "log(", "log2(", "sqrt(", "floor(", "ceil(",
        " // ", " % ", "(-", "(not ", " and ", " or ", "score = ", "mask = ", "[h", "[b", "NUM_HEADS",
        "BATCH", "Q_LEN", "KV_LEN", ": int", ": float", ": bool", "= true",
        *(f": {dtype}[" for dtype in ("bool", "int32", "int64", "float16", "bfloat16", "float32")),
    ]  # fmt: skip
    missing = [c for c in constructs if c not in text]
    assert not missing, f"never generated: {missing}"
    assert re.search(r"\(\S+ <=? \S+ (<|<=|==) \S+\)", text), "no chained comparison"
    assert re.search(r"t\d\[[^\]]*t\d\[", text), "no data-dependent index"
    assert re.search(r"score = .*[(, ]s[), ]", text), "no score reads s"
    assert re.search(r" % \(-\d\)| // \(-\d\)", text), "no floor division by a negative number"


def test_a_case_is_a_valid_attn_file_with_its_shape_in_the_header() -> None:
    case = Case(
        "pattern main {\n    mask = kv <= q\n}\n",
        "main",
        {"w": 3},
        Shape(1, 2, 1, 9, 7, 16, 24, "float16"),
        5,
    )
    text = case.to_text()
    assert Case.from_text(text) == case
    attnc.loads(text).main()  # the header is a comment
    with pytest.raises(ValueError, match="not an attnc fuzz case"):
        Case.from_text(case.source or "")


def test_a_planted_bug_is_found_shrunk_saved_and_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that is wrong whenever the pattern has an input: the fuzzer finds it, shrinks the
    program to one input and nothing the bug does not need, and saves a case that fails on replay
    while the bug is there and passes once it is gone."""
    call = attnc.Kernel.__call__

    def wrong(self, q, k, v, **kw):
        result = call(self, q, k, v, **kw)
        if not self.inputs:
            return result
        out, *rest = result if isinstance(result, tuple) else (result,)
        out = out + 0.5
        return (out, *rest) if rest else out

    monkeypatch.setattr(attnc.Kernel, "__call__", wrong)
    report = fuzz.fuzz(fuzz.cases(grads=False, max_len=20), 300, seed=3, save=tmp_path, shrink_seconds=60)
    assert report.failure is not None, "the planted bug was not found"
    assert "forward" in report.error
    source = report.failure.source or ""
    assert source.count("input ") == 1, source
    assert "fn " not in source and "let " not in source and "pattern aux" not in source, source
    assert report.saved is not None and report.saved.parent == tmp_path
    with pytest.raises(CaseFailure, match="forward"):
        replay(report.saved)
    monkeypatch.undo()
    replay(report.saved)


def test_fixed_seed_kernel_fuzz() -> None:
    """CI's bounded budget: a dozen random programs at random shapes, forward, tiles and gradients."""
    report = fuzz.fuzz(fuzz.cases(max_len=48), 240, seed=20261124, max_cases=12)
    assert report.failure is None, f"{report.failure.describe()}\n{report.error}\n{report.failure.source}"
    assert report.cases >= 12


def test_random_seed_kernel_fuzz() -> None:
    """A short run from a new seed each time (printed on failure, to reproduce with `attnc fuzz --seed`)."""
    seed = random.randrange(1 << 31)
    report = fuzz.fuzz(fuzz.cases(max_len=48), 20, seed=seed, shrink_seconds=60)
    assert report.failure is None, (
        f"seed {seed}: {report.failure.describe()}\n{report.error}\n{report.failure.source}"
    )
    assert report.cases >= 1


@pytest.mark.parametrize("seed", [0, None], ids=["fixed", "random"])
def test_frontend_fuzz(seed: int | None) -> None:
    seed = random.randrange(1 << 31) if seed is None else seed
    report = fuzz.fuzz(fuzz.frontend_cases(), 60, seed=seed, max_cases=250)
    assert report.failure is None, f"seed {seed}: {report.error}\n{report.failure.source!r}"
    assert report.cases >= 250


def test_frontend_problems_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    assert frontend_problem("pattern p { mask = kv <= q }") is None
    assert frontend_problem("pattern p { mask = kv <= }") is None  # a located syntax error is fine
    assert frontend_problem("pattern p(w: int) { mask = kv < w }") is None  # a missing parameter too

    def escape(text: str, filename: str = "<string>"):
        raise KeyError("oops")

    monkeypatch.setattr(attnc, "loads", escape)
    assert "KeyError escaped" in (frontend_problem("pattern p {}") or "")

    def misplaced(text: str, filename: str = "<string>"):
        raise AttnSyntaxError("bad", Loc(SourceFile(filename, text), 7, 1))

    monkeypatch.setattr(attnc, "loads", misplaced)
    assert "line 7 of a 1-line text" in (frontend_problem("pattern p {}") or "")


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.attn")), ids=lambda p: p.name)
def test_fuzz_corpus_replays(path: Path) -> None:
    """Every failure the fuzzer found (and that was fixed) stays fixed."""
    replay(path)


def test_cli_fuzz_runs_reports_and_replays(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fuzz", "--seconds", "4", "--seed", "1", "--target", "frontend"]) == 0
    out = capsys.readouterr().out
    assert "seed 1" in out and re.search(r"front end: \d+ sources run", out) and "no failure" in out
    corpus = sorted(str(p) for p in CORPUS.glob("*.attn"))
    assert main(["fuzz", "--replay", *corpus]) == 0
    assert capsys.readouterr().out.count(": ok") == len(corpus)


def test_cli_fuzzes_a_users_file(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["fuzz", "--pattern", "examples/streaming_llm.attn", "--seconds", "5", "--seed", "2", "--no-grad"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "the patterns of examples/streaming_llm.attn" in out
    assert int(re.search(r"kernels: (\d+) cases run", out)[1]) >= 1  # type: ignore[index]


def test_a_users_file_case_names_the_file_and_replays(tmp_path: Path) -> None:
    path = tmp_path / "mine.attn"
    path.write_text("pattern band(w: int = 4) {\n    mask = abs(q - kv) <= w\n}\n")
    draw = st.data()

    @settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(draw)
    def check(data) -> None:
        case = data.draw(fuzz.file_cases(str(path), grads=False, max_len=20))
        assert case.file == str(path.resolve()) and case.source is None and case.pattern == "band"
        fuzz.run_case(case)
        assert Case.from_text(case.to_text()) == case

    check()


def test_long_runs_show_a_sign_of_life(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    code = fuzz.command(2, 4, target="frontend", out=lines.append, progress_seconds=0.0)
    assert code == 0 and lines[-1] == "no failure"
    assert re.search(r"attnc fuzz: front end: \d+ cases so far", capsys.readouterr().err)
