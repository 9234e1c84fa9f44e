"""The differential fuzzer (`attnc.testing.fuzz`, `attnc fuzz`): its program generator, its driver
(finding, shrinking, saving and replaying a failure), the front-end fuzzer, a bounded run with a fixed
seed and a short one with a random seed, and the replay of every case in `tests/fuzz_corpus/`.
"""

from __future__ import annotations

import dataclasses
import json
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
from attnc.testing.programs import _BOUNDED_BY_W, Scope, Shape, _Draw, programs

CORPUS = Path(__file__).parent / "fuzz_corpus"
GENERATOR = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@GENERATOR
@given(programs())
def test_generated_programs_are_well_typed(program) -> None:
    attnc.loads(program.source)[program.pattern](**program.params)


def test_generated_programs_use_the_whole_language() -> None:
    """Over several hundred programs, every construct the generator promises appears."""
    texts: list[str] = []

    @settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
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


def test_a_helper_whose_parameter_bounds_a_reduction_is_given_literals() -> None:
    """A reduction's bound cannot read a position, also through a pattern's parameter (`aux(w=q)` where
    aux loops to `w`: a located error): such a helper is referenced with literal arguments, the others
    with any int (a random-seed run drew `aux(w=q)` for a bound `clamp(w, -4, 24)`)."""
    assert _BOUNDED_BY_W.search("(q == kv) or all(ri0 in 0..clamp(w, -4, 24): true)")
    assert not _BOUNDED_BY_W.search("any(ri0 in 0..3: kv <= q + w)")
    literal = re.compile(r"(w=)?(\(-\d+\)|\d+)")
    arguments: dict[bool, list[str]] = {True: [], False: []}

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.data(), st.booleans())
    def collect(data: st.DataObject, fixed: bool) -> None:
        scope = Scope(names={"int": ["p0"], "float": [], "bool": []}, patterns=[("aux", ("w",), fixed)])
        reference = _Draw(data.draw, scope).pattern_ref()
        if reference.startswith("aux("):
            arguments[fixed].append(reference.removeprefix("aux(").removesuffix(")"))

    collect()
    assert arguments[True] and all(literal.fullmatch(a) for a in arguments[True])
    assert any(not literal.fullmatch(a) for a in arguments[False])


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


# ---- runtime and static parameters (issue 16) ------------------------------------------------------------

RUNTIME_SOURCE = """\
pattern main(window: int = 5, static stride: int = 1, temperature: float = 1.0, static cap: float = 9.0) {
    mask = kv <= q and q - kv < window * stride
    score = cap * tanh(s * temperature / cap)
}
"""
RUNTIME_CASE = Case(RUNTIME_SOURCE, "main", {"window": 3}, Shape(1, 2, 1, 21, 19, 16, 16, "float32"), 4)


def test_generated_programs_declare_static_and_runtime_parameters() -> None:
    """Among a few hundred drawn programs, the pattern's ints and floats are declared `static` and
    left runtime, bools are written `static` too, and so is the helper pattern's parameter; every
    program binds, a kernel's runtime parameters are exactly its non-static ints and floats, and
    their values lie in a runtime int's range."""
    seen: set[str] = set()

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(programs())
    def check(program) -> None:
        kern = attnc.loads(program.source)[program.pattern](**program.params)
        header = program.source[program.source.index("pattern main") :].split("{", 1)[0]
        declared = {name: static for static, name in re.findall(r"(static )?(p\d): (?:int|float)", header)}
        assert set(kern.runtime_params) == {name for name, static in declared.items() if not static}
        for name in kern.runtime_params:
            value = kern.params[name]
            assert isinstance(value, float) or -(2**30) <= value <= 2**30, (name, value)
        for kind, found in (
            ("static int", re.search(r"static p\d: int", header)),
            ("static float", re.search(r"static p\d: float", header)),
            ("static bool", re.search(r"static p\d: bool", header)),
            ("runtime", kern.runtime_params),
            ("static helper", "pattern aux(static w: int)" in program.source),
            ("runtime helper", "pattern aux(w: int)" in program.source),
        ):
            if found:
                seen.add(kind)

    check()
    kinds = {"static int", "static float", "static bool", "runtime", "static helper", "runtime helper"}
    assert seen == kinds, f"never drawn: {kinds - seen}"


def test_runtime_overrides_are_drawn_from_the_seed_within_range() -> None:
    kern = attnc.loads(RUNTIME_SOURCE).main(window=3)
    shape = RUNTIME_CASE.shape
    draws = [fuzz.runtime_overrides(kern, shape, seed) for seed in range(200)]
    assert draws == [fuzz.runtime_overrides(kern, shape, seed) for seed in range(200)]
    assert all(set(d) == {"window", "temperature"} for d in draws)
    windows = [d["window"] for d in draws]
    assert all(type(w) is int and -(2**30) <= w <= 2**30 for w in windows)
    assert {-(2**30), 2**30} <= set(windows) and {2, 4} <= set(windows)  # ends, and next to the bound 3
    assert all(isinstance(d["temperature"], float) for d in draws)
    assert fuzz.runtime_overrides(attnc.stdlib().causal(), shape, 0) == {}


def test_a_case_runs_its_kernel_again_with_runtime_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second call gives the case's overrides by keyword, and is judged by a kernel bound to them:
    a kernel that ignores them is a failure saying with which values."""
    calls: list[dict] = []
    call = attnc.Kernel.__call__

    def spy(self, q, k, v, **kw):
        calls.append({name: kw[name] for name in self.runtime_params if name in kw})
        return call(self, q, k, v, **kw)

    monkeypatch.setattr(attnc.Kernel, "__call__", spy)
    overrides = {"window": 7, "temperature": 0.5}
    fuzz.run_case(dataclasses.replace(RUNTIME_CASE, overrides=overrides))
    assert {} in calls and overrides in calls

    def ignoring(self, q, k, v, **kw):
        return call(self, q, k, v, **{n: x for n, x in kw.items() if n not in self.runtime_params})

    monkeypatch.setattr(attnc.Kernel, "__call__", ignoring)
    with pytest.raises(CaseFailure, match=r"with runtime parameters \{'window': 7.*forward"):
        fuzz.run_case(dataclasses.replace(RUNTIME_CASE, overrides=overrides))


def test_a_wrong_runtime_override_is_found_shrunk_saved_and_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel whose calls ignore the runtime values they are given: the fuzzer finds it on a program
    with a runtime parameter, saves the case with the override values it drew, and the case fails on
    replay while the bug is there and passes once it is gone."""
    call = attnc.Kernel.__call__

    def ignoring(self, q, k, v, **kw):
        return call(self, q, k, v, **{n: x for n, x in kw.items() if n not in self.runtime_params})

    monkeypatch.setattr(attnc.Kernel, "__call__", ignoring)
    report = fuzz.fuzz(fuzz.cases(grads=False, max_len=20), 300, seed=5, save=tmp_path, shrink_seconds=10)
    assert report.failure is not None, "the planted bug was not found"
    assert "with runtime parameters" in report.error, report.error
    assert report.failure.overrides, report.failure  # the drawn values are written out
    assert report.saved is not None
    saved = Case.from_text(report.saved.read_text())
    assert saved == report.failure
    assert all(not re.search(rf"static {name}\b", saved.source or "") for name in saved.overrides)
    with pytest.raises(CaseFailure, match="with runtime parameters"):
        replay(report.saved)
    monkeypatch.undo()
    replay(report.saved)


def test_a_saved_case_with_runtime_parameters_round_trips_and_replays(tmp_path: Path) -> None:
    case = dataclasses.replace(RUNTIME_CASE, params={"window": 3, "stride": 2, "cap": 4.0})
    pinned = fuzz._with_overrides(case)
    assert pinned.overrides == fuzz.runtime_overrides(fuzz._kernel(case), case.shape, case.seed)
    path = fuzz.save_case(pinned, tmp_path)
    assert Case.from_text(path.read_text()) == pinned
    replay(path)
    # A case saved before overrides existed has none in its header: they are drawn from its seed.
    header, _, source = case.to_text().partition("\n")
    meta = json.loads(header.removeprefix(fuzz.HEADER))
    del meta["overrides"]
    assert Case.from_text(fuzz.HEADER + json.dumps(meta) + "\n" + source) == case


def test_a_users_file_case_draws_runtime_ints_within_range(tmp_path: Path) -> None:
    path = tmp_path / "mine.attn"
    path.write_text(
        "pattern band(w: int = 4, static stride: int = 1, t: float = 1.0) {\n"
        "    mask = abs(q - kv) <= w * stride\n    score = s * t\n}\n"
    )
    windows: list[int] = []

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(fuzz.file_cases(str(path), grads=False, max_len=20))
    def collect(case: Case) -> None:
        windows.extend([case.params["w"]] if "w" in case.params else [])
        assert 0 <= case.params.get("stride", 1) <= 40

    collect()
    assert all(-(2**30) <= w <= 2**30 for w in windows)
    assert {-(2**30), 2**30} & set(windows) and any(0 <= w <= 40 for w in windows)
