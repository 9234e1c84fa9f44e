"""Reading `.attn` files: regular files only, at most `MAX_SOURCE_BYTES`, UTF-8 text.

`import` reads files named by a program, which may come from someone else, so reading must never hang
(a FIFO, a terminal), never exhaust memory (`/dev/zero`), never follow a loop of links forever, and never
show text that is not attnc source in a diagnostic's excerpt (`import "/proc/self/environ"`). So an
import must name a `.attn` file, and the file it leads to, links followed, must be named `.attn` too; a
path with a control character (a newline) is refused, as no diagnostic could show it on one line. The
front end's time grows linearly with the size of the text (about 20 µs a byte), so the caps also keep
`attnc check` of any file to seconds.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_SOURCE_BYTES = 1 << 20
"""The largest `.attn` file or text attnc reads: 1 MiB (the standard library is about 4 KB)."""

MAX_PROGRAM_BYTES = 4 << 20
"""The largest total size of a file and everything it imports: 4 MiB."""

SUFFIX = ".attn"

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
)


class SourceReadError(Exception):
    """A file that cannot be read as `.attn` source; `reason` completes "cannot read 'PATH': ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def size_error(limit: int, what: str) -> str:
    return f"{what} is larger than the limit of {limit >> 20} MiB"


def has_control_character(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def shown_path(written: str) -> str:
    """The path as a diagnostic's one line shows it: control characters escaped (`\\x1b`), so that
    a message cannot move the cursor or recolour the terminal."""
    if not has_control_character(written):
        return written
    return "".join(
        c.encode("unicode_escape").decode("ascii") if ord(c) < 32 or ord(c) == 127 else c for c in written
    )


def resolve_import(base: Path, written: str) -> Path:
    """The file that `import "written"` in a file of directory `base` names, links followed."""
    if has_control_character(written):
        raise SourceReadError("the path contains a control character")
    if not written.endswith(SUFFIX):
        raise SourceReadError(f"only {SUFFIX} files can be imported")
    try:
        target = (base / written).resolve()
    except RuntimeError:  # Python before 3.13 reports a loop of symbolic links this way
        raise SourceReadError("it is a loop of symbolic links") from None
    except OSError as err:
        raise SourceReadError(err.strerror or type(err).__name__) from None
    if has_control_character(str(target)):
        raise SourceReadError("it leads to a path that contains a control character")
    if not target.name.endswith(SUFFIX):
        raise SourceReadError(f"it is a link to a file whose name does not end in {SUFFIX}")
    return target


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file `path` (at most `limit` of them, else `SourceReadError`), or
    `SourceReadError` saying why not.

    `stat` comes first so that nothing but a regular file is opened; the open is non-blocking and the
    opened file is checked again, so a file swapped for a FIFO in between cannot hang the read; and at
    most one byte more than the limit is read, whatever size the file claims (`/proc` files claim 0).
    The kernel cache reads its files this way too.
    """
    try:
        _require_regular(os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as file:
            _require_regular(os.fstat(file.fileno()).st_mode)
            data = file.read(-1 if limit is None else limit + 1)
    except OSError as err:
        raise SourceReadError(err.strerror or type(err).__name__) from None
    if limit is not None and len(data) > limit:
        raise SourceReadError(size_error(limit, "it"))
    return data


def read_source(path: Path) -> str:
    """The text of the regular file `path`, at most `MAX_SOURCE_BYTES`, or `SourceReadError` saying why
    not (see `read_regular`)."""
    data = read_regular(path, MAX_SOURCE_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceReadError("it is not UTF-8 text") from None


def _require_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    raise SourceReadError(f"it is {kind}, not a regular file")
