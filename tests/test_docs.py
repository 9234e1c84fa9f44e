"""The documentation in docs/ runs: every `.attn` block compiles, every error block reports exactly the
diagnostic shown under it, every `pycon` session replays (Python's doctest), every `console` session of
`attnc` prints what is shown (a line `...` stands for any lines, `...` inside a line for any text), the
CLI reference names every option, and the gallery matches the examples."""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import itertools
import os
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

import attnc
from attnc.cli import build_parser, main

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```(\S*)\n(.*?)^```\n", re.S | re.M)


def blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """The fenced blocks of a page in `language`, with the line each starts on."""
    text = page.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == language
    ]


def every(language: str) -> list[tuple[Path, int, str]]:
    return [(page, line, block) for page in PAGES for line, block in blocks(page, language)]


def block_id(case: tuple[Path, int, str]) -> str:
    return f"{case[0].name}:{case[1]}"


def test_the_pages_exist() -> None:
    assert {p.name for p in PAGES} >= {"language.md", "api.md", "cli.md", "gallery.md"}


@pytest.mark.parametrize("case", every("attn"), ids=block_id)
def test_attn_blocks_compile(case: tuple[Path, int, str]) -> None:
    page, line, source = case
    module = attnc.loads(source, filename=f"{page.name}:{line}")
    for name in module.own_patterns:
        pattern = module[name]
        if all(p.default is not None for p in pattern.params):
            pattern()  # every pass, down to the Triton source


def error_cases() -> list[tuple[Path, int, str, str]]:
    """`attn-error` blocks, each followed by a `text` block holding its diagnostic."""
    cases = []
    for page in PAGES:
        text = page.read_text()
        found = list(FENCE.finditer(text))
        for this, following in itertools.pairwise(found):
            if this.group(1) == "attn-error":
                assert following.group(1) == "text", (
                    f"{page.name}: an attn-error block needs a text block after it"
                )
                cases.append((page, text[: this.start()].count("\n") + 1, this.group(2), following.group(2)))
    return cases


@pytest.mark.parametrize("case", error_cases(), ids=lambda c: f"{c[0].name}:{c[1]}")
def test_error_blocks_show_the_real_diagnostic(case: tuple[Path, int, str, str]) -> None:
    _, _, source, diagnostic = case
    with pytest.raises(attnc.AttnError) as caught:
        module = attnc.loads(source, filename="bad.attn")
        for name in module.own_patterns:
            module[name]()
    assert str(caught.value) + "\n" == diagnostic


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "pycon")], ids=lambda p: p.name)
def test_python_sessions_replay(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the sessions name files as examples/...
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs: dict[str, object] = {}  # one namespace per page: a session may use what an earlier one defined
    for line, block in blocks(page, "pycon"):
        test = parser.get_doctest(block, globs, f"{page.name}:{line}", str(page), line)
        output = io.StringIO()
        result = runner.run(test, out=output.write, clear_globs=False)
        assert result.failed == 0, output.getvalue()
        globs = test.globs  # a DocTest runs in a copy of the namespace it is given


def console_cases() -> list[tuple[Path, int, str, str]]:
    """`$ attnc ...` commands of `console` blocks, each with the output shown under it."""
    cases = []
    for page, line, block in every("console"):
        for chunk in re.split(r"^(?=\$ )", block, flags=re.M):
            if chunk.startswith("$ attnc "):
                command, _, expected = chunk.partition("\n")
                cases.append((page, line, command[2:], expected))
    return cases


def expected_pattern(expected: str) -> re.Pattern[str]:
    parts = []
    for line in expected.splitlines():
        if line == "...":
            parts.append(r"(?:.*\n)*?")
        else:
            parts.append(".*".join(map(re.escape, line.split("..."))) + r"\n")
    return re.compile("".join(parts))


@pytest.mark.parametrize("case", console_cases(), ids=lambda c: c[2][:60])
def test_console_sessions_print_what_they_show(case: tuple[Path, int, str, str]) -> None:
    _, _, command, expected = case
    args = shlex.split(command)[1:]
    output = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            main(args)
    finally:
        os.chdir(cwd)
    assert expected_pattern(expected).fullmatch(output.getvalue()), output.getvalue()


def test_cli_reference_names_every_option() -> None:
    text = (DOCS / "cli.md").read_text()
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"attnc {name}" in text
        for action in commands[name]._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, f"attnc {name} {option} is not documented"


def test_api_reference_names_every_public_name() -> None:
    text = (DOCS / "api.md").read_text()
    for name in attnc.__all__:
        assert name in text, f"attnc.{name} is not documented"
    for cls in (attnc.Kernel, attnc.Module, attnc.Pattern):
        for member in vars(cls):
            if not member.startswith("_"):
                assert f".{member}" in text, f"{cls.__name__}.{member} is not documented"


# ---- the gallery --------------------------------------------------------------------------------------


def gallery_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gallery", ROOT / "scripts" / "gallery.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gallery_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert gallery_script().main(["--check"]) == 0, capsys.readouterr().err


def test_gallery_shows_every_example_pattern() -> None:
    shown = {(e.stem, e.pattern) for e in gallery_script().ENTRIES}
    examples = {(p.stem, n) for p in (ROOT / "examples").glob("*.attn") for n in attnc.load(p).own_patterns}
    assert shown == examples


def test_gallery_pictures_are_small_pngs() -> None:
    pictures = sorted((DOCS / "gallery").glob("*.png"))
    assert pictures
    for png in pictures:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 60_000, png.name
