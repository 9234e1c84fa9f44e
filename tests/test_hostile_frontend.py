"""Hostile input to the front end (issue 15, rows 9, 10, 11, 13, 24, 28 and 30 of the reliability probe):
imports reach only regular `.attn` files of bounded size, names the Python API takes are refused as
input names, impossible shapes are reported, and long or large sources are compiled or refused with a
located error, never a hang, a `MemoryError`, a `RecursionError` or a leak of another file's text.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import hypothesis
import pytest
import torch

import attnc
from attnc import AttnError
from attnc.dsl import lower, source
from attnc.errors import AttnImportError, AttnSyntaxError, AttnTypeError, DuplicateError
from attnc.reserved import RESERVED_NAMES
from attnc.testing import fuzz

CAUSAL_4 = torch.tril(torch.ones(4, 4, dtype=torch.bool))


def raised(action: Callable[[], object]) -> AttnError:
    with pytest.raises(AttnError) as info:
        action()
    return info.value


def importing(tmp_path: Path, target: str) -> Path:
    main = tmp_path / "main.attn"
    main.write_text(f'pattern p {{ mask = true }}\nimport "{target}"\n')
    return main


def check_import_error(err: AttnError, main: Path, reason: str) -> None:
    """A located AttnImportError at the import statement (line 2) of `main`."""
    assert type(err) is AttnImportError, err
    assert err.loc is not None and err.loc.file.name == str(main)
    assert (err.loc.line, err.loc.col) == (2, 1)
    assert reason in err.reason, err.reason


# ---- row 9: only regular files, of bounded size --------------------------------------------------------


def test_import_of_a_named_pipe_is_a_located_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.attn"
    os.mkfifo(fifo)
    main = importing(tmp_path, "fifo.attn")
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            attnc.load(main)
            outcome.append(None)
        except BaseException as err:  # handed to the test's thread
            outcome.append(err)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # unblock the reader before failing, so the thread ends
        with open(fifo, "w"):
            pass
        thread.join(timeout=30)
        pytest.fail("importing a FIFO blocked")
    assert isinstance(outcome[0], AttnError), outcome
    check_import_error(outcome[0], main, "cannot read 'fifo.attn': it is a named pipe, not a regular file")


def test_import_of_a_directory_named_attn_is_a_located_error(tmp_path: Path) -> None:
    (tmp_path / "lib.attn").mkdir()
    main = importing(tmp_path, "lib.attn")
    check_import_error(raised(lambda: attnc.load(main)), main, "it is a directory, not a regular file")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_import_of_a_link_to_an_endless_device_is_a_located_error(tmp_path: Path, device: str) -> None:
    os.symlink(device, tmp_path / "dev.attn")
    main = importing(tmp_path, "dev.attn")
    check_import_error(raised(lambda: attnc.load(main)), main, "whose name does not end in .attn")


def test_a_device_named_attn_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    # /dev/null is a character device; read_source must refuse it by its mode, whatever its name.
    with pytest.raises(source.SourceReadError, match="it is a device, not a regular file"):
        source.read_source(Path("/dev/null"))


def test_import_larger_than_the_size_cap_is_a_located_error(tmp_path: Path) -> None:
    (tmp_path / "big.attn").write_text("#" * source.MAX_SOURCE_BYTES + "\n")
    main = importing(tmp_path, "big.attn")
    check_import_error(raised(lambda: attnc.load(main)), main, "it is larger than the limit of 1 MiB")


def test_a_program_whose_imports_together_exceed_the_cap_is_a_located_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lower, "MAX_PROGRAM_BYTES", 1500)
    for name in ("a", "b"):
        (tmp_path / f"{name}.attn").write_text(f"pattern p{name} {{ mask = true }}\n" + "#" * 900 + "\n")
    main = tmp_path / "main.attn"
    main.write_text('import "a.attn"\nimport "b.attn"\n')
    err = raised(lambda: attnc.load(main))
    assert type(err) is AttnImportError and (err.loc.line, err.loc.col) == (2, 1), err
    assert "the program with its imports is larger than the limit" in err.reason


def test_source_text_larger_than_the_size_cap_is_a_located_error() -> None:
    started = time.perf_counter()
    err = raised(lambda: attnc.loads("#" * (source.MAX_SOURCE_BYTES + 1)))
    assert type(err) is AttnSyntaxError and (err.loc.line, err.loc.col) == (1, 1)
    assert err.reason == "the source is larger than the limit of 1 MiB"
    assert time.perf_counter() - started < 5  # refused before parsing


# ---- row 10: loops of links ----------------------------------------------------------------------------


def test_import_of_a_loop_of_symbolic_links_is_a_located_error(tmp_path: Path) -> None:
    os.symlink("loop2.attn", tmp_path / "loop1.attn")
    os.symlink("loop1.attn", tmp_path / "loop2.attn")
    main = importing(tmp_path, "loop1.attn")
    check_import_error(raised(lambda: attnc.load(main)), main, "it is a loop of symbolic links")


# ---- row 11: no other file's text in a diagnostic ------------------------------------------------------


SECRET = "pattern SECRET_TOKEN_1234 is not attnc source"


@pytest.mark.parametrize("target", ["notes.txt", "/proc/self/environ", "/etc/passwd"])
def test_import_of_a_file_not_named_attn_is_refused_without_reading_it(tmp_path: Path, target: str) -> None:
    (tmp_path / "notes.txt").write_text(SECRET + "\n")
    main = importing(tmp_path, target)
    err = raised(lambda: attnc.load(main))
    check_import_error(err, main, f"cannot read '{target}': only .attn files can be imported")
    assert "SECRET" not in str(err) and err.loc.file.name == str(main)


def test_import_of_a_link_named_attn_to_another_file_shows_none_of_its_text(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text(SECRET + "\n")
    os.symlink("notes.txt", tmp_path / "lib.attn")
    main = importing(tmp_path, "lib.attn")
    err = raised(lambda: attnc.load(main))
    check_import_error(err, main, "it is a link to a file whose name does not end in .attn")
    assert "SECRET" not in str(err)


def test_import_leading_to_a_name_with_a_newline_is_refused(tmp_path: Path) -> None:
    # The name would become part of the pattern's symbol and break a diagnostic's one line.
    odd = 'x\nimport os; os.system("touch PWNED")\n#.attn'
    (tmp_path / odd).write_text("pattern p2 { mask = kv <= q + 12345 }\n")
    os.symlink(odd, tmp_path / "lib.attn")
    main = importing(tmp_path, "lib.attn")
    check_import_error(raised(lambda: attnc.load(main)), main, "a path that contains a control character")


def test_an_import_path_with_an_escape_sequence_is_shown_escaped(tmp_path: Path) -> None:
    main = importing(tmp_path, "x\x1b[2J.attn")
    err = raised(lambda: attnc.load(main))
    check_import_error(err, main, "cannot read 'x\\x1b[2J.attn': the path contains a control character")
    assert "\x1b" not in str(err).splitlines()[0]


# ---- imported files' symbols stay apart ----------------------------------------------------------------


def test_two_imported_files_of_one_stem_keep_their_own_fns(tmp_path: Path) -> None:
    # Both are qualified by their stem `lib`: `lib.f` must not stand for both files' `f`.
    for folder, body in (("x", "a + 1"), ("y", "a - 5")):
        (tmp_path / folder).mkdir()
        offset = "- 1" if folder == "x" else "+ 5"
        (tmp_path / folder / "lib.attn").write_text(
            f"fn f(a: int) = {body}\npattern p{folder} {{ mask = kv <= f(q) {offset} }}\n"
        )
    main = tmp_path / "main.attn"
    main.write_text('import "x/lib.attn"\nimport "y/lib.attn"\npattern both { mask = px and py }\n')
    module = attnc.load(main)
    for name in ("px", "py", "both"):
        assert torch.equal(module[name]().mask(4, 4)[0, 0], CAUSAL_4), name


def test_an_imported_file_named_stdlib_does_not_replace_the_standard_library(tmp_path: Path) -> None:
    # The user's `stdlib.neighborhood_start` and the standard library's must stay two fns.
    (tmp_path / "stdlib.attn").write_text(
        "fn neighborhood_start(i: int, n: int, kernel: int) = 0\n"
        "pattern mine { mask = kv >= neighborhood_start(q, KV_LEN, 3) }\n"
    )
    main = tmp_path / "main.attn"
    main.write_text(
        'import "stdlib.attn"\npattern p { mask = mine }\npattern w { mask = neighborhood_1d(3) }\n'
    )
    module = attnc.load(main)
    assert torch.equal(module.p().mask(6, 6), torch.ones(1, 1, 6, 6, dtype=torch.bool))
    assert torch.equal(module.w().mask(6, 6), attnc.stdlib().neighborhood_1d(3).mask(6, 6))


# ---- row 13: names the Python API takes ----------------------------------------------------------------

KEYWORD_INPUTS = sorted(RESERVED_NAMES - lower.RESERVED)


@pytest.mark.parametrize("name", KEYWORD_INPUTS)
def test_an_input_named_like_a_keyword_of_the_kernel_calls_is_a_located_error(name: str) -> None:
    text = f"pattern p {{\n    input {name}: float32[KV_LEN]\n    score = s + {name}[kv]\n}}\n"
    err = raised(lambda: attnc.loads(text))
    assert type(err) is DuplicateError and (err.loc.line, err.loc.col) == (2, 11), err
    assert err.reason.startswith(f"'{name}' is reserved: it is a keyword of kern(...)")


def test_self_is_the_only_reserved_static_parameter_name() -> None:
    err = raised(lambda: attnc.loads("pattern p(static self: int = 1) { mask = kv <= q + self }"))
    assert type(err) is DuplicateError and (err.loc.line, err.loc.col) == (1, 18), err
    assert err.reason.startswith("'self' is reserved")
    # Static parameters are passed to `Pattern.__call__` only, fn parameters and lets not at all: the
    # kernel's keywords are fine there (runtime parameters: tests/test_runtime_params_api.py).
    text = (
        "fn near(scale: int, batch: int) = scale - batch < 3\n"
        "pattern p(static block: int = 2) {\n"
        "    let device = q - kv\n    mask = device >= 0 and near(q, kv)\n}\n"
    )
    i = torch.arange(6)
    expected = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 3)
    assert torch.equal(attnc.loads(text).p().mask(6, 6)[0, 0], expected)


# ---- row 28: impossible shapes -------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "shown"), [("-5", "-5"), ("3 - 7 * 2", "-11"), ("-Q_LEN - 1", "at most -1")])
def test_a_dimension_negative_for_every_launch_is_a_located_error(dim: str, shown: str) -> None:
    text = f"pattern p {{\n    input x: bool[KV_LEN, {dim}]\n    mask = x[kv, 0]\n}}\n"
    err = raised(lambda: attnc.loads(text))
    assert type(err) is AttnTypeError and (err.loc.line, err.loc.col) == (2, 27), err
    assert err.reason == f"a dimension cannot be negative, and this one is {shown}"
    attnc.loads(text.replace(dim, "Q_LEN - 100")).p()  # negative for short queries only: fine


def test_a_fn_called_in_an_input_shape_is_a_located_error() -> None:
    text = "fn f(a: int) = a - 5\npattern p {\n    input x: bool[f(KV_LEN)]\n    mask = x[kv]\n}\n"
    err = raised(lambda: attnc.loads(text).p())
    assert type(err) is AttnTypeError and (err.loc.line, err.loc.col) == (3, 19), err
    assert err.reason == "fn 'f' cannot be called in an input's shape"


# ---- row 24: long flat expressions ---------------------------------------------------------------------


def test_nesting_counts_parentheses_not_the_terms_of_a_flat_sum() -> None:
    text = "pattern p { mask = kv <= q" + " + 0" * 500 + " }"
    assert torch.equal(attnc.loads(text).p().mask(4, 4)[0, 0], CAUSAL_4)
    depth = 401
    err = raised(lambda: attnc.loads(f"pattern p {{ mask = kv <= {'-(' * depth}q{')' * depth} }}"))
    assert type(err) is AttnSyntaxError and err.reason == "expression nested more than 400 levels deep"


def test_a_flat_sum_of_10000_terms_compiles() -> None:
    terms = "".join(" + 1 - 1" if i % 2 else " * 1" for i in range(10_000))
    text = f"pattern p {{ mask = kv <= q{terms} }}"
    assert torch.equal(attnc.loads(text).p().mask(4, 4)[0, 0], CAUSAL_4)


def test_a_default_value_of_10000_terms_is_evaluated() -> None:
    text = "pattern p(w: int = 0" + " + 1 - 1" * 5_000 + ") { mask = kv <= q + w }"
    assert torch.equal(attnc.loads(text).p().mask(4, 4)[0, 0], CAUSAL_4)


def test_a_chain_of_5000_lets_loads_without_recursion() -> None:
    lets = "".join(f"    let a{i + 1} = a{i} + 1\n" for i in reversed(range(5000)))
    text = f"pattern p {{\n    mask = a5000 - 5000 >= kv\n{lets}    let a0 = q\n}}\n"
    assert torch.equal(attnc.loads(text).p().mask(4, 4)[0, 0], CAUSAL_4)


def test_a_chain_of_3000_fns_declared_last_first_loads_without_recursion() -> None:
    fns = "".join(f"fn f{i + 1}(x: int) = f{i}(x) + 1\n" for i in reversed(range(3000)))
    attnc.loads(f"pattern p {{ mask = f3000(q) - 3000 >= kv }}\n{fns}fn f0(x: int) = x\n")


def test_a_chain_of_3000_patterns_declared_last_first_loads_without_recursion() -> None:
    patterns = "".join(f"pattern p{i + 1} {{ mask = p{i} and kv >= 0 }}\n" for i in reversed(range(3000)))
    attnc.loads(f"pattern p {{ mask = p3000 }}\n{patterns}pattern p0 {{ mask = kv <= q }}\n")


def test_a_long_cycle_of_lets_is_a_cycle_error() -> None:
    lets = "".join(f"    let a{i + 1} = a{i} + 1\n" for i in range(5000))
    err = raised(lambda: attnc.loads(f"pattern p {{\n    let a0 = a5000\n{lets}    mask = a0 >= kv\n}}\n"))
    assert err.reason.startswith("let 'a0' depends on itself: a0 -> a5000 -> a4999"), err.reason[:100]


def test_a_long_cycle_of_fns_is_a_cycle_error() -> None:
    fns = "".join(f"fn f{i + 1}(x: int) = f{i}(x) + 1\n" for i in range(3000))
    err = raised(lambda: attnc.loads(f"fn f0(x: int) = f3000(x)\n{fns}"))
    assert err.reason == "fn 'f0' refers to itself (recursion is not allowed)"
    assert (err.loc.line, err.loc.col) == (2, 17)


# ---- the front-end fuzzer reaches these cases ----------------------------------------------------------


MANY = hypothesis.settings(max_examples=5_000, database=None, derandomize=True)


@pytest.mark.parametrize(
    "wanted",
    [
        ("let a2 = a1",),  # lets, each using the previous twice
        ("fn f2(x: int) = f1(x)",),  # fns, each calling the previous twice
        tuple(  # odd names, in any role
            form.format(name)
            for name in ("scale", "self", "LOG2E", "q_idx", "tl", "lambda", "None", "__import__", "batch")
            for form in ("input {}:", "let {} =", "pattern {} ", "fn {}(", "({}: int")
        ),
        ('import "fifo.attn"', 'import "loop1.attn"', 'import "zero.attn"', 'import "odd.attn"'),
    ],
    ids=["lets", "fns", "names", "imports"],
)
def test_the_frontend_fuzzer_draws_dag_heavy_odd_name_and_import_programs(wanted: tuple[str, ...]) -> None:
    hypothesis.find(fuzz.sources(), lambda text: any(w in text for w in wanted), settings=MANY)


@pytest.mark.parametrize(
    "target", ["fifo.attn", "loop1.attn", "zero.attn", "environ.attn", "odd.attn", "big.attn", "dir.attn"]
)
def test_the_frontend_fuzzer_imports_its_odd_files_cleanly(target: str) -> None:
    assert (fuzz.import_fixtures() / target).exists() or (fuzz.import_fixtures() / target).is_symlink()
    assert fuzz.frontend_problem(f'import "{target}"\npattern main {{ mask = causal }}\n') is None


def test_the_frontend_fuzzer_reports_an_import_that_escapes_as_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(path: Path) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(lower, "read_source", broken)
    problem = fuzz.frontend_problem('import "lib.attn"\npattern main { mask = lib_p }\n')
    assert problem == "RuntimeError escaped: boom"


# ---- the top-level file, terminals, parameters that make a shape negative ------------------------------


def test_loading_a_named_pipe_directly_is_an_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "direct.attn"
    os.mkfifo(fifo)
    err = raised(lambda: attnc.load(fifo))
    assert type(err) is AttnImportError
    assert "it is a named pipe, not a regular file" in err.reason


def test_loading_a_device_directly_reads_nothing() -> None:
    err = raised(lambda: attnc.load("/dev/zero"))
    assert type(err) is AttnImportError
    assert "it is a device, not a regular file" in err.reason


def test_an_escape_sequence_in_the_source_never_reaches_the_terminal() -> None:
    err = raised(lambda: attnc.loads("pattern p { mask = kv <= q + \x1b[2J 1 }"))
    assert type(err) is AttnSyntaxError
    assert "\x1b" not in str(err)
    assert "unexpected character '\\x1b'" in err.reason
    # one '?' per control character: the caret stays under the column it names
    line, caret = str(err).splitlines()[1:3]
    assert line[caret.index("^")] == "?"


def test_a_parameter_value_that_makes_a_dimension_negative_is_a_located_error() -> None:
    module = attnc.loads("pattern p(w: int = -3) {\n    input x: bool[w]\n    mask = x[kv]\n}\n")
    err = raised(lambda: module.p())
    assert type(err) is AttnTypeError
    assert (err.loc.line, err.loc.col) == (2, 11)
    assert "with w=-3 it is -3" in err.reason
    assert module.p(w=4).inputs == {"x": ("bool", 1)}
