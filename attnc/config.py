"""The process's settings: the one module that reads attnc's environment variables (`ATTNC_*`, and
`XDG_CACHE_HOME` for the cache's default place).

Each variable has one reader here, which parses it and raises a one-line `ConfigError` naming the
variable for a value attnc does not accept. A reader looks at the environment when it is called (it is
cheap), so a variable changed in a running process (a test's `monkeypatch.setenv`) takes effect at the
next compile or launch. `VARIABLES` describes every variable; docs/install.md's table is checked
against it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from attnc.errors import ConfigError


@dataclass(frozen=True)
class Variable:
    """One environment variable attnc reads: its name, its value when unset, and what it does."""

    name: str
    default: str
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "ATTNC_CACHE_DIR",
        "`$XDG_CACHE_HOME/attnc`, else `~/.cache/attnc`",
        "where kernel sources (`kernels/`) and autotuning results (`autotune/`) are kept; private (0700), "
        "refused if another user owns it or may write to it",
    ),
    Variable(
        "XDG_CACHE_HOME",
        "`~/.cache`",
        "the user's cache directory (freedesktop.org); attnc's cache is `attnc/` in it unless "
        "`ATTNC_CACHE_DIR` is set; a relative path is ignored, as the specification says",
    ),
    Variable(
        "ATTNC_AUTOTUNE",
        "`1`",
        "`0`/`false`/`no`/`off` (any case) picks launch configurations by heuristics on a GPU instead of "
        "timing candidates; `1`/`true`/`yes`/`on` keeps autotuning: the first call in a shape bucket times "
        "at most 8 forward configurations and 4 for each backward kernel (dQ and dK/dV are tuned apart; "
        "those that fit the shared memory and the register estimate, nearest the heuristic's first "
        "choice), their kernels compiled in parallel (a thread each, up to one per CPU) before the first "
        "is timed",
    ),
    Variable(
        "ATTNC_CONFIG",
        "unset",
        "`BLOCK_M,BLOCK_N[,WARPS[,STAGES]]` forces one launch configuration on every kernel (debugging, "
        "tests): blocks powers of two from 16 to 1024, warps a power of two up to 32, stages 1 to 16",
    ),
    Variable(
        "ATTNC_DEBUG",
        "`0`",
        "`1`/`true`/`yes`/`on` (any case) checks on the host what is otherwise the caller's contract because "
        "checking it would wait for the GPU: the values of a `q_offset` tensor on a GPU",
    ),
    Variable(
        "ATTNC_DUMP_DIR",
        "unset",
        "a directory that receives the text of every compilation stage (a Triton source as `.py`)",
    ),
    Variable(
        "ATTNC_STATIC_DUMP",
        "unset",
        "a directory that receives the TTGIR, PTX and SASS of every kernel `python -m attnc.testing.static` "
        "compiles ahead of time",
    ),
)
"""Every environment variable attnc reads (the test suite's golden-file switch aside), in the order of
docs/install.md's table."""


def table_row(variable: Variable) -> str:
    """The variable's row of docs/install.md's table (a test holds the table to these rows)."""
    return f"| `{variable.name}` | {variable.default} | {variable.meaning} |"


_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def _text(name: str) -> str:
    return os.environ.get(name, "").strip()


def cache_dir() -> Path:
    """The cache's root: `ATTNC_CACHE_DIR`, else `attnc/` under `XDG_CACHE_HOME` when that is an
    absolute path, else `~/.cache/attnc`."""
    configured = os.environ.get("ATTNC_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG Base Directory specification: "If an implementation encounters a relative path in any of
    # these variables it should consider the path invalid and ignore it."
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "attnc"
    return Path.home() / ".cache" / "attnc"


def cache_variable() -> str | None:
    """The variable that chose `cache_dir()` (None: neither is set, the default holds), for messages."""
    if os.environ.get("ATTNC_CACHE_DIR"):
        return "ATTNC_CACHE_DIR"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return "XDG_CACHE_HOME" if xdg and Path(xdg).is_absolute() else None


def dump_dir() -> Path | None:
    """`ATTNC_DUMP_DIR`, where every compilation stage is written, if set."""
    configured = os.environ.get("ATTNC_DUMP_DIR")
    return Path(configured) if configured else None


def static_dump_dir() -> Path | None:
    """`ATTNC_STATIC_DUMP`, where the static checks (`attnc.testing.static`) write compiled stages, if
    set."""
    configured = os.environ.get("ATTNC_STATIC_DUMP")
    return Path(configured) if configured else None


def path_variables() -> dict[str, str]:
    """The variables naming directories attnc writes to, with their values where set: an OS error on a
    path under one of them says which variable chose it."""
    names = ("ATTNC_CACHE_DIR", "ATTNC_DUMP_DIR", "ATTNC_STATIC_DUMP", "XDG_CACHE_HOME")
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def autotune() -> bool:
    """Whether `ATTNC_AUTOTUNE` leaves autotuning on (its default), read in any case."""
    text = _text("ATTNC_AUTOTUNE")
    if text.lower() in _OFF:
        return False
    if not text or text.lower() in _ON:
        return True
    raise ConfigError(f"ATTNC_AUTOTUNE must be one of {', '.join(_ON + _OFF)} (in any case), got {text!r}")


def debug() -> bool:
    """Whether `ATTNC_DEBUG` asks for the checks that wait for the GPU (off by default)."""
    text = _text("ATTNC_DEBUG")
    if not text or text.lower() in _OFF:
        return False
    if text.lower() in _ON:
        return True
    raise ConfigError(f"ATTNC_DEBUG must be one of {', '.join(_ON + _OFF)} (in any case), got {text!r}")


def forced_config() -> tuple[str, tuple[int, ...]] | None:
    """The launch configuration `ATTNC_CONFIG` forces, as its text and its ints (`runtime/autotune.py`
    checks that they make a launchable one), or None when it is unset or blank."""
    text = _text("ATTNC_CONFIG")
    if not text:
        return None
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not 2 <= len(values) <= 4:
        raise ConfigError(f"ATTNC_CONFIG must be BLOCK_M,BLOCK_N[,WARPS[,STAGES]] (ints), got {text!r}")
    return text, values
