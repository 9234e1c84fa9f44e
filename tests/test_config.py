"""The process's settings (`attnc.config`): one module reads every `ATTNC_*` variable, the cache follows
`XDG_CACHE_HOME`, docs/install.md's table lists every variable, and `attnc cache info|clear`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import attnc
from attnc import config
from attnc.cli import main
from attnc.runtime import cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("ATTNC_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---- where the cache is -------------------------------------------------------------------------------


def test_the_cache_defaults_to_dot_cache_in_the_home_directory(clean_environment: pytest.MonkeyPatch) -> None:
    assert config.cache_dir() == Path.home() / ".cache" / "attnc"


def test_the_cache_follows_xdg_cache_home(clean_environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_environment.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert config.cache_dir() == tmp_path / "attnc"


def test_a_relative_xdg_cache_home_is_ignored(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("XDG_CACHE_HOME", "relative/cache")
    assert config.cache_dir() == Path.home() / ".cache" / "attnc"


def test_attnc_cache_dir_wins_over_xdg_cache_home(
    clean_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_environment.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    clean_environment.setenv("ATTNC_CACHE_DIR", str(tmp_path / "mine"))
    assert config.cache_dir() == tmp_path / "mine"


def test_kernels_are_stored_under_xdg_cache_home(
    clean_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_environment.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache.clear_memory()
    attnc.loads("pattern xdg_stored { mask = kv <= q + 3 }").xdg_stored()
    assert len(list((tmp_path / "attnc" / "kernels").glob("*.py"))) == 1


# ---- one module reads the environment ----------------------------------------------------------------


def environment_reads(path: Path) -> list[str]:
    """`line: text` of every read of an `ATTNC_*` variable in a module: a string constant naming one
    inside a call of `os.environ.get`, `os.getenv` or a subscript of `os.environ`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call | ast.Subscript):
            text = ast.unparse(node)
            if re.match(r"os\.(environ|getenv)", text) and "ATTNC_" in text:
                found.append(f"{node.lineno}: {text}")
    return found


def test_only_the_config_module_reads_attnc_variables() -> None:
    readers = {
        str(path.relative_to(ROOT)): reads
        for path in sorted((ROOT / "attnc").rglob("*.py"))
        if (reads := environment_reads(path)) and path.name != "config.py"
    }
    assert readers == {}


def test_the_install_guide_table_describes_every_variable() -> None:
    text = (ROOT / "docs" / "install.md").read_text()
    rows = re.findall(r"^\| `[A-Z_]+` \|.*$", text, flags=re.MULTILINE)
    assert rows == [config.table_row(v) for v in config.VARIABLES]


def test_every_attnc_variable_the_package_names_is_described() -> None:
    named = set()
    for path in (ROOT / "attnc").rglob("*.py"):
        named |= set(re.findall(r"\bATTNC_[A-Z_]+\b", path.read_text(encoding="utf-8")))
    assert named == {v.name for v in config.VARIABLES if v.name.startswith("ATTNC_")}


def test_the_dump_directory_comes_from_the_config_module(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from attnc.passes.manager import PassManager

    monkeypatch.setenv("ATTNC_DUMP_DIR", str(tmp_path))
    assert PassManager().dump_dir == tmp_path == config.dump_dir()


def test_a_forced_configuration_of_the_wrong_length_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "64,64,4,2,1")
    with pytest.raises(attnc.ConfigError, match=r"ATTNC_CONFIG must be BLOCK_M,BLOCK_N\[,WARPS\[,STAGES\]\]"):
        config.forced_config()


@pytest.mark.parametrize(
    ("value", "expected"), [("", False), ("0", False), ("off", False), ("1", True), ("ON", True)]
)
def test_attnc_debug_turns_the_checks_that_wait_for_the_gpu_on(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("ATTNC_DEBUG", value)
    assert config.debug() is expected


def test_a_bad_attnc_debug_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_DEBUG", "maybe")
    with pytest.raises(attnc.ConfigError, match="ATTNC_DEBUG must be one of"):
        config.debug()


# ---- attnc cache info | clear -------------------------------------------------------------------------


@pytest.fixture
def filled_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A cache directory holding one kernel source (and a file of the user's beside attnc's
    directories)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root))
    cache.clear_memory()
    attnc.loads("pattern cache_filled { mask = kv <= q + 5 }").cache_filled()
    (root / "notes.txt").write_text("the user's own file")
    return root


def test_cache_info_shows_the_directory_files_and_bytes(
    filled_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (kernel,) = (filled_cache / "kernels").iterdir()
    assert main(["cache", "info"]) == 0
    size = f"{kernel.stat().st_size:,}"
    assert capsys.readouterr().out == (
        f"cache directory: {filled_cache} (set by ATTNC_CACHE_DIR)\n"
        f"  kernels/        1 files {size:>12} bytes\n"
        f"  autotune/       0 files {0:>12} bytes\n"
        f"  total           1 files {size:>12} bytes\n"
    )


def test_cache_clear_empties_the_kernel_and_autotune_directories_only(
    filled_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (filled_cache / "autotune").mkdir(mode=0o700)
    (filled_cache / "autotune" / "key.device.json").write_text("{}")
    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out.startswith(f"cleared {filled_cache}: removed 2 files, ")
    assert list((filled_cache / "kernels").iterdir()) == list((filled_cache / "autotune").iterdir()) == []
    assert (filled_cache / "notes.txt").read_text() == "the user's own file"


def test_a_kernel_runs_after_the_cache_is_cleared(filled_cache: Path) -> None:
    kern = attnc.loads("pattern cache_filled { mask = kv <= q + 5 }").cache_filled()
    cache.clear_disk()
    q = torch.randn(1, 1, 24, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kern(q, q, q), kern.reference(q, q, q), atol=1e-5, rtol=1e-5)
