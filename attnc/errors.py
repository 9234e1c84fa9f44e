"""Diagnostics: every error in a user's program is an `AttnError` that points at the source.

The message reads `FILE:LINE:COL: error: REASON`, then the source line and a caret under the offending
span, so that a user sees the line and column of their `.attn` file, never a Python traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SourceFile:
    """The text of one `.attn` file (or `<string>` for `attnc.loads`), kept for diagnostics."""

    name: str
    text: str

    def line(self, number: int) -> str:
        lines = self.text.splitlines()
        return lines[number - 1] if 1 <= number <= len(lines) else ""


@dataclass(frozen=True)
class Loc:
    """A span in a source file: 1-based line and column of its start, and its end column on that line."""

    file: SourceFile = field(repr=False)
    line: int
    col: int
    end_col: int | None = None

    def __str__(self) -> str:
        return f"{self.file.name}:{self.line}:{self.col}"

    def excerpt(self) -> str:
        """The source line and a caret (`^~~~`) under the span."""
        # Control characters (an escape sequence) would reach the user's terminal: each is shown as
        # one '?', so the caret keeps its column.
        text = "".join(
            "?" if ord(c) < 32 or ord(c) == 127 else c for c in self.file.line(self.line).expandtabs(1)
        )
        width = 1
        if self.end_col is not None and self.end_col > self.col:
            width = min(self.end_col, len(text) + 1) - self.col
        return f"  {text}\n  {' ' * (self.col - 1)}^{'~' * max(width - 1, 0)}"

    def pack(self) -> str:
        """The span as one string that a custom op can take as an argument, so that the op's errors point
        where its caller's do: `unpack` gives back a span that prints the same, also in another process
        (a program `torch.export` saved). Its line, columns, source line and file name, one a line (the
        name last: only it may hold a line break); an f-string, which dynamo traces (it cannot trace
        `json`)."""
        return f"{self.line}\n{self.col}\n{self.end_col}\n{self.file.line(self.line)}\n{self.file.name}"

    @staticmethod
    def unpack(text: str) -> Loc:
        line, col, end_col, source_line, name = text.split("\n", 4)
        end = None if end_col == "None" else int(end_col)
        return Loc(SourceFile(name, "\n" * (int(line) - 1) + source_line), int(line), int(col), end)


class AttnError(Exception):
    """An error in a user's attention program, located in its source.

    Its message is built when it is read (`__str__`, and `__repr__` shows it as before), and `__init__`
    calls no base class's: dynamo cannot trace `Exception.__init__` through `super()`, and a `Kernel`
    call that `torch.compile` traces catches its argument errors to raise them when the graph runs
    (`api._raised_when_run`). `args` is `(reason, loc)`, as the class is called, so that a pickled
    error unpickles."""

    def __init__(self, reason: str, loc: Loc | None) -> None:
        self.reason = reason
        self.loc = loc

    def __str__(self) -> str:
        return self._format()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._format()!r})"

    def _format(self) -> str:
        if self.loc is None:
            return f"<unknown>: error: {self.reason}"
        return f"{self.loc}: error: {self.reason}\n{self.loc.excerpt()}"


class AttnSyntaxError(AttnError):
    """The text does not follow the grammar."""


class UnknownNameError(AttnError):
    """A name that is not in scope."""


class AttnTypeError(AttnError):
    """An expression of the wrong type (int, float, bool), or a wrong use of a name's kind."""


class ArityError(AttnError):
    """A call with the wrong number or names of arguments, or an index with the wrong rank."""


class DuplicateError(AttnError):
    """A statement, parameter or name given twice where once is allowed."""


class AttnImportError(AttnError):
    """An `import` that cannot be read, or that forms a cycle."""


class CycleError(AttnError):
    """A definition that refers to itself (recursive `fn`, pattern or `let`)."""


class ParameterError(AttnError):
    """A pattern parameter missing, unknown or of the wrong type when a kernel is made."""


class ProgramTooLargeError(AttnError):
    """A program whose compilation would build more IR than the budget allows (an expression whose
    normal form is exponential in its source), reported instead of a compile that never ends."""


class InputError(AttnError, ValueError):
    """A tensor passed at call time that does not match its `input` declaration, or a bad call. A
    `ValueError` too, as torch's own functions raise for bad arguments."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong Python type at call time (a list for a tensor, a string for `scale`): a
    `TypeError` too, as torch raises for one."""


class _SettingError(AttnError):
    """An error in a setting of the process (an environment variable, the cache directory): one line, no
    source location."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, None)

    def _format(self) -> str:
        return f"attnc: error: {self.reason}"


class CacheError(_SettingError):
    """The kernel cache directory (`ATTNC_CACHE_DIR`) is refused, e.g. owned by another user."""


class ConfigError(_SettingError, ValueError):
    """An `ATTNC_*` environment variable with a value attnc does not accept."""


class TritonMissingError(_SettingError, ImportError):
    """A kernel is to run, but Triton cannot be imported (it is a Linux-only dependency): everything
    else — parsing, the oracle, plans, `attnc check/ir/show` — works without it."""


LOCATED_ERRORS: dict[str, type[AttnError]] = {
    cls.__name__: cls
    for cls in (
        AttnSyntaxError,
        UnknownNameError,
        AttnTypeError,
        ArityError,
        DuplicateError,
        AttnImportError,
        CycleError,
        ParameterError,
        ProgramTooLargeError,
        InputError,
        InputTypeError,
    )
}
"""This module's errors that are built from a reason and a `Loc`, by name: how a custom op that raises
the error of a call `torch.compile` traced (`autograd.raise_error`) finds the class again."""


class InternalError(AssertionError):
    """An invariant of the compiler itself broke: a bug in attnc, never the user's fault."""
