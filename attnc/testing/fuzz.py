"""Differential fuzzing: random programs and shapes run by the kernels and judged by the dense oracle.

A `Case` is one program (or a pattern of a user's file), parameter values, a shape and a seed for the
tensors. `run_case` compiles it, runs the forward kernel and, for most cases, the backward, and judges
the output, the lse and the gradients by the tolerance rule of `attnc.testing`, and `block_map` and the
launch plan against the tile classes of the dense mask. A kernel with runtime parameters is run and
judged once more with other values given at call time (`kern(q, k, v, window=9)`, drawn from the
case's seed by `runtime_overrides`), against the oracle of a kernel bound to those values. `fuzz`
drives Hypothesis over cases for a time budget: a failing case is shrunk by Hypothesis to a small
program and written as a `.attn` file whose first line holds the rest of the case (`Case.to_text`),
which `replay` (and the test suite, for `tests/fuzz_corpus/`) runs again.

The front end has its own fuzzer (`frontend_problem`, `sources`): mutated and random source text, odd
names, programs whose trees are exponentially larger than their DAGs, and imports of odd files (FIFOs,
links in a loop, devices, oversized files: `import_fixtures`) must load and compile or raise an
`AttnError` whose location is inside the text, never anything else.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import attnc
from attnc.api import RUNTIME_INT_LIMIT, _dim_value
from attnc.dsl.source import MAX_SOURCE_BYTES
from attnc.errors import AttnError
from attnc.testing import compare, compare_gradients, tile_problems
from attnc.testing.programs import (
    Shape,
    dag_heavy_sources,
    import_sources,
    odd_name_sources,
    programs,
    shapes,
)

HEADER = "# attnc fuzz case: "
BLOCKS = ((16, 16), (32, 32), (16, 32), (8, 24), (64, 16))
# Values a call gives a runtime float parameter: small, of both signs, never 0 (a user's pattern may
# divide by one, as `s / temperature`).
RUNTIME_FLOATS = (0.5, -1.25, 2.0, 1.0, -1.0, 5.0)


class CaseFailure(AssertionError):
    """A case the kernels got wrong (or a well-typed program the compiler rejected)."""


class Rejected(Exception):
    """A case that cannot run, not through attnc's fault: a user's pattern that refuses the drawn
    parameters or sizes with an `AttnError`."""


@dataclass(frozen=True)
class Case:
    """One fuzz case. `source` is the program's text, or None for a pattern of the user's `file`.
    `overrides`: the runtime parameter values of the second call; None draws them from `seed`
    (`runtime_overrides`), and a saved failure holds the drawn ones, so that its replay does not
    depend on how they are drawn."""

    source: str | None
    pattern: str
    params: dict[str, Any]
    shape: Shape
    seed: int
    block: tuple[int, int] = (16, 16)
    grads: bool = True
    file: str | None = None
    kind: str = "kernel"  # or "frontend": `source` is text that must load or fail cleanly
    overrides: dict[str, Any] | None = None

    def to_text(self) -> str:
        """The case as a `.attn` file: a header line with everything but the source, then the source."""
        meta = {k: v for k, v in asdict(self).items() if k != "source"}
        meta["shape"] = self.shape.as_list()
        return HEADER + json.dumps(meta, sort_keys=True) + "\n" + (self.source or "")

    @staticmethod
    def from_text(text: str) -> Case:
        """The case `to_text` wrote; a `ValueError` saying what is wrong for any other text."""
        header, _, source = text.partition("\n")
        if not header.startswith(HEADER):
            raise ValueError(f"not an attnc fuzz case (its first line must start with {HEADER.strip()!r})")
        try:
            meta = json.loads(header[len(HEADER) :])
            meta["shape"] = Shape(*meta["shape"])
            meta["block"] = tuple(meta["block"])
            return Case(source=None if meta.get("file") else source, **meta)
        except (ValueError, TypeError, KeyError) as error:  # a header edited by hand, or of another version
            raise ValueError(f"not an attnc fuzz case: its first line is malformed ({error})") from None

    def describe(self) -> str:
        s = self.shape
        where = f"file {self.file}, " if self.file else ""
        return (
            f"{where}pattern {self.pattern}({', '.join(f'{k}={v!r}' for k, v in self.params.items())}), "
            f"q [{s.batch}, {s.heads}, {s.q_len}, {s.dim}], k/v [{s.batch}, {s.kv_heads}, {s.kv_len}, "
            f"{s.dim}/{s.dim_v}], {s.dtype}, seed {self.seed}, block {self.block}"
            + (", gradients" if self.grads else "")
            + (f", then runtime parameters {self.overrides} at call time" if self.overrides else "")
        )


# ---- running one case ----------------------------------------------------------------------------------


def _pattern(case: Case) -> attnc.Pattern:
    try:
        module = attnc.load(case.file) if case.file else attnc.loads(case.source or "", filename="<fuzz>")
        return module[case.pattern]
    except AttnError as error:
        if case.file:  # a user's file that does not load: not attnc's fault
            raise Rejected(str(error)) from error
        raise CaseFailure(f"the compiler rejected a well-typed program:\n{error}") from error


def _bind(case: Case, pattern: attnc.Pattern, params: dict[str, Any]) -> attnc.Kernel:
    try:
        return pattern(**params)
    except AttnError as error:
        if case.file:  # a user's pattern may refuse parameters: not attnc's fault
            raise Rejected(str(error)) from error
        raise CaseFailure(f"the compiler rejected a well-typed program:\n{error}") from error


def _kernel(case: Case) -> attnc.Kernel:
    return _bind(case, _pattern(case), case.params)


def runtime_overrides(kern: attnc.Kernel, shape: Shape, seed: int) -> dict[str, int | float]:
    """Values for a second call's runtime parameters, drawn from `seed` (empty: the kernel has none).
    An int is most often a small value around the lengths, else next to its bound value or at an end
    of a runtime int's range [-2**30, 2**30]; a float is one of `RUNTIME_FLOATS`."""
    rng = random.Random(seed)
    longest = max(shape.q_len, shape.kv_len)
    values: dict[str, int | float] = {}
    for name in kern.runtime_params:
        bound = kern.params[name]
        if isinstance(bound, float):
            values[name] = rng.choice(RUNTIME_FLOATS)
            continue
        kind = rng.randrange(10)
        if kind < 6:
            value = rng.randint(-3, longest + 3)
        elif kind < 8:
            value = int(bound) + rng.choice((-1, 1))
        else:
            value = rng.choice(
                (-RUNTIME_INT_LIMIT, RUNTIME_INT_LIMIT, 1 - RUNTIME_INT_LIMIT, RUNTIME_INT_LIMIT - 1)
            )
        values[name] = max(-RUNTIME_INT_LIMIT, min(RUNTIME_INT_LIMIT, value))
    return values


def _with_overrides(case: Case) -> Case:
    """The case with its drawn runtime overrides written out (as it stands if it cannot compile)."""
    if case.kind != "kernel" or case.overrides is not None:
        return case
    try:
        return replace(case, overrides=runtime_overrides(_kernel(case), case.shape, case.seed))
    except (CaseFailure, Rejected):
        return case


def make_inputs(kern: attnc.Kernel, shape: Shape, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for a kernel's inputs at these sizes: ints are sorted document ids or small values
    that are often out of range as indices, bools are true with a drawn probability, floats uniform in
    [-1.5, 1.5] in their dtype."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"BATCH": shape.batch, "NUM_HEADS": shape.heads, "Q_LEN": shape.q_len, "KV_LEN": shape.kv_len}
    tensors = {}
    for decl in kern.pattern.inputs:
        dims = [_dim_value(d, sizes) for d in decl.dims]
        if any(n is None or n < 0 for n in dims) or math.prod(dims) > 1 << 22:
            raise Rejected(f"input '{decl.name}' has no valid shape at these sizes: {dims}")
        dtype = getattr(torch, decl.dtype)
        if dtype.is_floating_point:
            tensor = (torch.rand(dims, generator=g) * 3 - 1.5).to(dtype)
        elif dtype == torch.bool:
            tensor = torch.rand(dims, generator=g) < torch.rand((), generator=g)
        elif torch.rand((), generator=g) < 0.5:  # document ids: sorted along the last axis
            starts = torch.rand(dims, generator=g) < 0.15
            tensor = starts.cumsum(dim=-1).to(dtype) if dims else starts.to(dtype)
        else:
            high = max(shape.q_len, shape.kv_len) + 4
            tensor = torch.randint(-3, high, dims, generator=g).to(dtype)
        tensors[decl.name] = tensor
    return tensors


def run_case(case: Case) -> None:
    """Run one case; raise `CaseFailure` on any mismatch with the oracle, `Rejected` if it cannot run.
    A kernel with runtime parameters runs again with the case's `overrides` given at call time, judged
    by the oracle, mask and tiles of a kernel bound to them."""
    if case.kind == "frontend":
        problem = frontend_problem(case.source or "")
        if problem:
            raise CaseFailure(problem)
        return
    pattern = _pattern(case)
    kern = _bind(case, pattern, case.params)
    s = case.shape
    inputs = make_inputs(kern, s, case.seed)
    dtype = getattr(torch, s.dtype)
    g = torch.Generator().manual_seed(case.seed)
    q = torch.randn(s.batch, s.heads, s.q_len, s.dim, generator=g).to(dtype)
    k = torch.randn(s.batch, s.kv_heads, s.kv_len, s.dim, generator=g).to(dtype)
    v = torch.randn(s.batch, s.kv_heads, s.kv_len, s.dim_v, generator=g).to(dtype)
    _check_call(case, kern, kern, q, k, v, inputs, {})
    overrides = runtime_overrides(kern, s, case.seed) if case.overrides is None else case.overrides
    if overrides:
        judge = _bind(case, pattern, {**case.params, **overrides})
        try:
            _check_call(case, kern, judge, q, k, v, inputs, overrides)
        except CaseFailure as failure:
            raise CaseFailure(f"with runtime parameters {overrides} given at call time: {failure}") from None


def _check_call(
    case: Case,
    kern: attnc.Kernel,
    judge: attnc.Kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    values: dict[str, Any],
) -> None:
    """Call `kern` with these inputs and runtime parameter `values`, and judge its output, lse, tiles
    and (with `case.grads`) gradients by `judge`'s oracle and mask."""
    s = case.shape
    try:
        out, lse = kern(q, k, v, return_lse=True, **inputs, **values)
    except AttnError as error:
        if case.file:
            raise Rejected(str(error)) from error
        raise CaseFailure(f"the kernel refused a valid call:\n{error}") from error
    comparison = compare(judge, out, lse, q, k, v, **inputs)
    if not comparison.ok:
        raise CaseFailure(f"forward: {comparison.describe()}")
    sizes = {"batch": s.batch, "num_heads": s.heads}
    problems = tile_problems(kern, s.q_len, s.kv_len, case.block, judge=judge, **sizes, **inputs, **values)
    if problems:
        raise CaseFailure("tiles: " + "; ".join(problems))
    if case.grads:
        tensors = {
            name: t.detach().clone().requires_grad_(name in kern._differentiable)
            for name, t in inputs.items()
        }
        gradients = compare_gradients(kern, q, k, v, seed=case.seed, judge=judge, **tensors, **values)
        if not gradients.ok:
            raise CaseFailure(f"backward: {gradients.describe()}")


# ---- strategies of cases --------------------------------------------------------------------------------


@st.composite
def cases(draw: st.DrawFn, grads: bool = True, max_len: int = 80) -> Case:
    """A random program with a shape, a seed and a block (see `attnc.testing.programs`)."""
    program = draw(programs())
    return Case(
        source=program.source,
        pattern=program.pattern,
        params=program.params,
        shape=draw(shapes(max_len)),
        seed=draw(st.integers(0, 2**16)),
        block=draw(st.sampled_from(BLOCKS)),
        grads=grads and draw(st.integers(0, 2)) != 0,
    )


@st.composite
def file_cases(
    draw: st.DrawFn, path: str, names: list[str] | None = None, grads: bool = True, max_len: int = 80
) -> Case:
    """Cases of a user's file: one of its patterns (or of `names`) with random parameter values
    (around the defaults and the drawn lengths; a runtime int sometimes at an end of its range
    [-2**30, 2**30], never beyond), shapes and inputs."""
    module = attnc.load(path)
    name = draw(st.sampled_from(names or module.own_patterns))
    shape = draw(shapes(max_len))
    params: dict[str, Any] = {}
    for decl in module[name].params:
        if decl.default is not None and draw(st.booleans()):
            continue
        type_ = str(decl.type)
        if type_ == "bool":
            params[decl.name] = draw(st.booleans())
        elif type_ == "int" and not decl.static and draw(st.integers(0, 9)) == 9:
            params[decl.name] = draw(st.sampled_from((RUNTIME_INT_LIMIT, -RUNTIME_INT_LIMIT)))
        elif type_ == "int":
            params[decl.name] = draw(st.integers(0, 2 * max_len))
        else:
            params[decl.name] = draw(st.sampled_from((0.5, 1.0, 2.0, 5.0, 50.0, -1.0)))
    return Case(
        source=None,
        pattern=name,
        params=params,
        shape=shape,
        seed=draw(st.integers(0, 2**16)),
        block=draw(st.sampled_from(BLOCKS)),
        grads=grads and draw(st.integers(0, 2)) != 0,
        file=str(Path(path).resolve()),
    )


# ---- the front end ----------------------------------------------------------------------------------------

_LOCATION = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): error: \S")
TOKENS = (
    "pattern", "fn", "input", "let", "mask", "score", "import", "and", "or", "not", "true", "false",
    "(", ")", "[", "]", "{", "}", ",", ":", "=", "==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/",
    "//", "%", "#", "q", "kv", "s", "h", "b", "Q_LEN", "KV_LEN", "causal", "sliding_window", "where",
    "clamp", "min", "tanh", "x", "main", "0", "1", "-1", "7", "99999999999999999999", "1e999", "1.5e-400",
    "0.0", ".5", "int", "float", "bool", "int32", "float16", "bfloat16", '"x.attn"', '""', " ", "\n",
    "\t", "\\\n", "\r\n", "é", "λ", "\x00", "mask = kv <= q", "score = s * 2.0", "input d: int32[KV_LEN]",
)  # fmt: skip


def frontend_problem(text: str) -> str | None:
    """What is wrong with how attnc takes this source text (None: nothing). It must load and compile
    every pattern it declares with their defaults, or raise an `AttnError` whose message starts
    `FILE:LINE:COL: error: REASON` with LINE and COL inside the text. Any other exception escaping is a
    bug: users must never see a Python traceback for their program. A text that imports is loaded as
    `main.attn` of the directory `import_fixtures` makes, so that its imports reach odd files."""
    filename = "<fuzz>"
    try:
        if "import" in text:
            path = import_fixtures() / "main.attn"
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
            filename = str(path)
            module = attnc.load(path)
        else:
            module = attnc.loads(text, filename=filename)
        for name in module.own_patterns:
            module[name]()
    except AttnError as error:
        first = str(error).splitlines()[0]
        found = _LOCATION.match(first)
        if found is None:
            return f"a diagnostic without a location: {first!r}"
        if found["file"] != filename:
            return None  # in an imported file (the stdlib): its own text
        lines = text.splitlines() or [""]
        line, col = int(found["line"]), int(found["col"])
        if not 1 <= line <= len(lines) + 1:
            return f"a diagnostic at line {line} of a {len(lines)}-line text: {first!r}"
        width = len(lines[line - 1]) if line <= len(lines) else 0
        if not 1 <= col <= width + 1:
            return f"a diagnostic at column {col} of a {width}-character line: {first!r}"
    except RecursionError:
        return "RecursionError (deeply nested input must be an AttnError)"
    except Exception as error:  # the bug this fuzzer looks for
        return f"{type(error).__name__} escaped: {error}"
    return None


@cache
def import_fixtures() -> Path:
    """A directory (one per process) of files an import may reach: good and bad `.attn` files, two
    files of one stem, a FIFO, links in a loop, a dangling link, a directory and links to devices and
    `/proc` named `.attn`, a file over the size cap, and odd names (a newline, an escape sequence)."""
    root = Path(tempfile.mkdtemp(prefix="attnc-fuzz-imports-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    (root / "sub").mkdir()
    (root / "dir.attn").mkdir()
    files = {
        "lib.attn": "fn helper(x: int) = x + 1\npattern lib_p { mask = kv <= q }\n",
        "sub/lib.attn": "fn helper(x: int) = x - 5\npattern sub_p { mask = helper(kv) <= q }\n",
        "stdlib.attn": "pattern causal { mask = true }\n",
        "bad.attn": "pattern p { mask = q < }\n",
        "odd\nimport os\n#.attn": "pattern odd_p { mask = true }\n",
        "sp ace.attn": "pattern space_p { mask = true }\n",
        "é.attn": "pattern accent_p { mask = true }\n",
        "big.attn": "#" * MAX_SOURCE_BYTES + "\n",
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.attn").write_bytes(b"pattern caf\xe9 { mask = true }\n")
    links = {
        "loop1.attn": "loop2.attn",
        "loop2.attn": "loop1.attn",
        "dangling.attn": "nowhere.attn",
        "zero.attn": "/dev/zero",
        "environ.attn": "/proc/self/environ",
        "odd.attn": "odd\nimport os\n#.attn",
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo.attn")
    return root


def _stdlib_text() -> str:
    return (Path(attnc.__file__).parent / "stdlib.attn").read_text()


@st.composite
def sources(draw: st.DrawFn) -> str:
    """Source text: a random program (or the stdlib) mutated a few times, tokens at random, or a program
    with odd names, with an exponentially large tree, or with imports of odd files."""
    kind = draw(st.integers(0, 6))
    if kind == 3:
        return "".join(draw(st.lists(st.sampled_from(TOKENS), max_size=40)))
    if kind >= 4:
        return draw((odd_name_sources(), dag_heavy_sources(), import_sources())[kind - 4])
    text = draw(programs()).source if kind != 2 else _stdlib_text()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(0, 12)))
        how = draw(st.sampled_from(("insert", "delete", "replace", "duplicate")))
        if how == "insert":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif how == "delete":
            text = text[:i] + text[j:]
        elif how == "replace":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[j:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


@st.composite
def frontend_cases(draw: st.DrawFn) -> Case:
    shape = Shape(1, 1, 1, 1, 1, 16, 16, "float32")
    return Case(draw(sources()), "", {}, shape, 0, kind="frontend", grads=False)


# ---- the driver ------------------------------------------------------------------------------------------


@dataclass
class Report:
    """What a fuzzing run did: cases run (passed or failed, shrinking included), rejected, and the
    minimal failing case with its error (None: no failure)."""

    cases: int = 0
    rejected: int = 0
    seconds: float = 0.0
    failure: Case | None = None
    error: str = ""
    saved: Path | None = None


def fuzz(
    strategy: st.SearchStrategy[Case],
    seconds: float,
    seed: int,
    save: Path | None = None,
    batch: int = 40,
    max_cases: int | None = None,
    progress: Callable[[Report], None] | None = None,
    shrink_seconds: float = 120.0,
) -> Report:
    """Run cases drawn from `strategy` for `seconds` (or `max_cases`), from `seed`. Stops at the first
    failure, which Hypothesis shrinks for at most `shrink_seconds`; the smallest failing case is
    saved under `save` as a `.attn` file."""
    report = Report()
    start = time.monotonic()
    deadline = start + seconds
    failing: list[tuple[Case, BaseException]] = []
    shrink_deadline = math.inf

    def done() -> bool:
        over = max_cases is not None and report.cases >= max_cases
        return over or time.monotonic() >= deadline

    def check(data: st.DataObject) -> None:
        nonlocal shrink_deadline
        case = data.draw(strategy)  # always drawn: Hypothesis wants the same draws on a replay
        if done() and not failing:
            return  # the budget is spent: the rest of the round passes without running
        if time.monotonic() > shrink_deadline:
            return  # shrinking is over: the smallest failure so far is failing[-1]
        try:
            run_case(case)
        except Rejected:
            report.rejected += 1
            reject()
        except Exception as error:
            failing.append((case, error))  # each one smaller than the last
            shrink_deadline = min(shrink_deadline, time.monotonic() + shrink_seconds)
            report.cases += 1
            raise
        report.cases += 1
        if progress is not None:
            progress(report)

    round_ = 0
    while not done():
        run = given(st.data())(check)
        run = settings(
            max_examples=batch,
            deadline=None,
            database=None,
            derandomize=False,
            phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
            print_blob=False,
        )(run)
        run = hypothesis_seed(seed * 1_000_003 + round_)(run)
        round_ += 1
        try:
            run()
        except BaseException as error:
            if not failing or isinstance(error, KeyboardInterrupt):
                raise
            case, cause = failing[-1]  # the smallest: Hypothesis runs it last (or shrinking was cut short)
            case = _with_overrides(case)
            report.failure, report.error = case, f"{type(cause).__name__}: {cause}"
            if save is not None:
                report.saved = save_case(case, save)
            break
    report.seconds = time.monotonic() - start
    return report


def save_case(case: Case, directory: Path) -> Path:
    text = case.to_text()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{case.kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.attn"
    path.write_text(text)
    return path


def replay(path: str | Path) -> None:
    """Run a saved case again: raises `CaseFailure` if it still fails."""
    run_case(Case.from_text(Path(path).read_text()))


# ---- `attnc fuzz` -----------------------------------------------------------------------------------------


def command(
    seconds: float,
    seed: int,
    target: str = "all",
    file: str | None = None,
    patterns: list[str] | None = None,
    grads: bool = True,
    max_len: int = 80,
    save: Path | None = None,
    shrink_seconds: float = 120.0,
    out: Callable[[str], None] = print,
    progress_seconds: float = 60.0,
) -> int:
    """`attnc fuzz`: fuzz the kernels (of random programs, or of the patterns of `file`) and the front
    end for `seconds` in all; print what ran and the minimal reproducer of a failure. Exit status 1 on
    a failure."""
    from attnc.runtime.backend import active

    if file and target == "frontend":
        raise ValueError("--pattern FILE fuzzes the kernels of its patterns: not with --target frontend")
    jobs: list[tuple[str, st.SearchStrategy[Case], float]] = []
    if target in ("all", "kernels"):
        strategy = file_cases(file, patterns, grads, max_len) if file else cases(grads=grads, max_len=max_len)
        share = 1.0 if target == "kernels" or file else 0.85
        jobs.append(("kernels", strategy, seconds * share))
    if target in ("all", "frontend") and not file:
        jobs.append(("front end", frontend_cases(), seconds if target == "frontend" else seconds * 0.15))
    what = f"the patterns of {file}" if file else "random programs"
    out(f"attnc fuzz: seed {seed}, {seconds:g} s, {what}, backend {active()}")
    for label, strategy, budget in jobs:
        last = [time.monotonic()]

        def progress(report: Report, label: str = label, last: list[float] = last) -> None:
            if time.monotonic() - last[0] >= progress_seconds:  # a sign of life on long runs
                last[0] = time.monotonic()
                print(f"attnc fuzz: {label}: {report.cases} cases so far", file=sys.stderr, flush=True)

        report = fuzz(strategy, budget, seed, save=save, shrink_seconds=shrink_seconds, progress=progress)
        unit = "sources" if label == "front end" else "cases"
        out(f"{label}: {report.cases} {unit} run, {report.rejected} rejected, {report.seconds:.0f} s")
        if report.failure is not None:
            case = report.failure
            out(f"FAILURE: {case.describe() if case.kind == 'kernel' else 'source text'}")
            out(report.error)
            if case.source is not None:
                out("minimal reproducer:\n" + (case.source or "").rstrip())
            if report.saved is not None:
                out(f"saved as {report.saved}; run it again with: attnc fuzz --replay {report.saved}")
            return 1
    out("no failure")
    return 0


def read_case(path: str | Path) -> Case:
    """The case saved in the file at `path`; a `ValueError` naming the file if it is not one (an
    `OSError` if it cannot be read)."""
    try:
        return Case.from_text(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:  # UnicodeDecodeError included
        raise ValueError(f"{path}: {error}") from None


def replay_command(paths: list[str], out: Callable[[str], None] = print) -> int:
    """`attnc fuzz --replay FILE...`: run saved cases again; exit status 1 if any still fails. Every
    file is read first: one that is not a saved case stops the command before anything runs."""
    cases = [(path, read_case(path)) for path in paths]
    failed = 0
    for path, case in cases:
        try:
            run_case(case)
            out(f"{path}: ok")
        except (CaseFailure, Rejected) as error:
            failed += 1
            out(f"{path}: FAILURE: {error}")
    return 1 if failed else 0
