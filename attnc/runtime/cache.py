"""Kernel sources, cached in memory and on disk by content, loaded once per process and backend.

A kernel's key is the sha256 of attnc's version, the template (its name, and the text of every template,
as they import each other's macros), the pattern's IR after `fuse` (its name and parameter list left
out: two patterns of the same structure share a kernel), the `KernelSpec` and Triton's version. The spec
holds no name of the pattern and the templates render nothing else, so the key determines every byte of
the rendered source. A key found in memory or on disk is never rendered again; lengths, head dims,
dtypes and input values are kernel arguments, so none of them changes the key.

On disk the source lives in `$ATTNC_CACHE_DIR/kernels/<key>.py` (default `$XDG_CACHE_HOME/attnc`, else
`~/.cache/attnc`: `attnc.config.cache_dir`; `attnc cache info|clear` shows and empties it), written
atomically (a temporary file, then `os.replace`), so concurrent processes never read half a file. Its
last line is a seal, `# attnc-sha256 <hex>`: the sha256 of the key and the text above it. A file whose
seal does not match (truncated, edited, garbage, or another key's kernel) is rendered again and
overwritten. The module is compiled from the verified text, not read back from the file, and only after
its structure is checked (`codegen.lower.checked_code`): rendering and looking up never parse the text.

The cache directory and its `kernels/` and `autotune/` directories are created private (0700), and a
directory another user owns, or that others may write, is refused (`CacheError`): a cache's kernels are
run, so nobody else may write them. A cache that cannot be written (not a directory, read-only,
unreachable) is still read; what this process must write goes to a private temporary directory
instead, with a one-time warning.

Per-device data (autotuning results, `runtime/autotune.py`) lives beside the source under the same key
and the device's name, so DESIGN.md's single cache key (version, IR, spec, Triton, device) is split
in two levels: what the source depends on, then what a device adds.

Modules are kept per backend ("cuda" or "interpreter", `runtime/backend.py`): the same source,
compiled for the GPU or run by Triton's interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import hashlib
import itertools
import linecache
import os
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from attnc import config
from attnc.codegen import signature
from attnc.codegen.lower import TEMPLATES, checked_code, render
from attnc.codegen.spec import BackwardSpec, KernelSpec
from attnc.dsl import source as source_file
from attnc.errors import CacheError
from attnc.ir.nodes import PatternIR
from attnc.ir.printer import pattern_body
from attnc.runtime.backend import require_triton, triton_version
from attnc.version import __version__

BACKENDS = ("cuda", "interpreter")


@dataclass
class CacheStats:
    """What the cache did in this process (tests read it: a cache hit must not render)."""

    renders: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    module_loads: int = 0


STATS = CacheStats()


def cache_dir() -> Path:
    """The cache's root directory (`attnc.config.cache_dir`: `ATTNC_CACHE_DIR`, `XDG_CACHE_HOME`)."""
    return config.cache_dir()


def _refuse_foreign(directory: Path) -> None:
    """Raise CacheError if the directory exists and another user owns it or may write to it."""
    getuid = getattr(os, "getuid", None)  # None on Windows, where ownership is not a uid
    if getuid is None:
        return
    try:
        info = directory.stat()
    except OSError:  # missing or unreachable: nothing is read from it, and a write falls back
        return
    if info.st_uid != getuid():
        raise CacheError(
            f"the kernel cache directory {directory} is owned by another user (uid {info.st_uid}), so attnc "
            "will not run kernels from it: set ATTNC_CACHE_DIR to a directory of your own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # The seal is a plain hash, which anyone who can write a kernel can recompute.
        raise CacheError(
            f"the kernel cache directory {directory} can be written by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}), so attnc will not run kernels from it: `chmod go-w` it, or "
            "set ATTNC_CACHE_DIR to a private directory"
        )


def cache_subdir(name: str, create: bool = False) -> Path:
    """`$ATTNC_CACHE_DIR/<name>` ("kernels" or "autotune"), refused if another user owns it or the
    cache directory; created private (0700) when `create` (raising OSError if it cannot be)."""
    root = cache_dir()
    directory = root / name
    _refuse_foreign(root)
    if create:
        try:  # one call where the root is there already (then a file as the root fails it: ENOTDIR)
            directory.mkdir(mode=0o700)
        except FileExistsError:
            if not directory.is_dir():
                raise
        except FileNotFoundError:
            if root.exists() and not root.is_dir():  # mkdir would say "File exists"
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(root)) from None
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.mkdir(mode=0o700, exist_ok=True)
    _refuse_foreign(directory)
    return directory


_FALLBACK: list[Path] = []  # this process's private directory, once one was needed
_WARNED: set[Path] = set()


def _fallback_subdir(name: str, error: OSError) -> Path:
    """A private temporary `<name>` directory for what the configured cache cannot take (removed at
    exit); warns once per cache directory."""
    if not _FALLBACK:
        root = Path(tempfile.mkdtemp(prefix="attnc-cache-"))  # mode 0700
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _FALLBACK.append(root)
    configured = cache_dir()
    if configured not in _WARNED:
        _WARNED.add(configured)
        reason = error.strerror or str(error)
        variable = config.cache_variable() or "ATTNC_CACHE_DIR"
        warnings.warn(
            f"attnc: cannot write to the cache {configured} ({variable}): {reason}; "
            f"this process keeps what it caches in {_FALLBACK[0]} instead",
            RuntimeWarning,
            stacklevel=3,
        )
    directory = _FALLBACK[0] / name
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def store(name: str, filename: str, text: str) -> Path:
    """Write `text` to `filename` in the cache's `name` directory, atomically, and return its path: in
    `$ATTNC_CACHE_DIR`, or in this process's private directory where that cannot be written."""
    try:
        path = cache_subdir(name, create=True) / filename
        write_atomic(path, text)
    except OSError as error:
        path = _fallback_subdir(name, error) / filename
        write_atomic(path, text)
    return path


def read_regular(path: Path) -> bytes | None:
    """The bytes of a regular file, or None if there is none at the path (or it cannot be read): a
    FIFO or a device is never opened (`attnc.dsl.source.read_regular`)."""
    try:
        return source_file.read_regular(path)
    except source_file.SourceReadError:
        return None


_SEAL = "# attnc-sha256 "


def _digest(key: str, body: str) -> str:
    return hashlib.sha256(f"{key}\n{body}".encode()).hexdigest()


def seal(key: str, body: str) -> str:
    """A rendered source with its seal line: the sha256 of the key and the source."""
    return f"{body}{_SEAL}{_digest(key, body)}\n"


def unseal(key: str, data: bytes) -> str | None:
    """The sealed text if `data` is the text of a kernel of `key` with its seal intact, else None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    cut = text.rfind("\n", 0, len(text) - 1) + 1
    body, last = text[:cut], text[cut:]
    return text if body and last == f"{_SEAL}{_digest(key, body)}\n" else None


@dataclass(frozen=True)
class KernelSource:
    """A kernel's sealed source text (its seal verified), the file that holds it, and the spec and
    template it was rendered from: what its structure is checked against when it is loaded."""

    key: str
    text: str
    path: Path
    spec: KernelSpec | BackwardSpec
    template: str
    structure: str = ""  # `structure_text` of the pattern(s) it was rendered for (the key hashes it)


_SOURCES: dict[str, KernelSource] = {}
_MODULES: dict[tuple[str, str], ModuleType] = {}


def structure_text(pattern: PatternIR) -> str:
    """The pattern's IR without its name and parameter list: what its kernel depends on. Its runtime
    parameters' names stay (`!window`): a launcher registered under the key reads their values by name
    (`oracle.Env.params`), so two patterns share a kernel only where those names agree."""
    return pattern_body(pattern)


def _template_files() -> tuple[tuple[str, int, int], ...]:
    """The path, modification time and size of every template, by name, and of the kernels' argument
    descriptions, which they render (`codegen/signature.py`): a listing and a `stat` each, what each key
    pays to notice an edited template."""
    with os.scandir(TEMPLATES) as entries:
        paths = sorted((e.name, e.path) for e in entries if e.name.endswith(".jinja"))
    paths.append(("signature.py", signature.__file__))
    return tuple((path, (info := os.stat(path)).st_mtime_ns, info.st_size) for _, path in paths)


def _templates_text() -> str:
    """The name and text of every template (they import each other's macros), read from disk again only
    when a file's size or modification time changed."""
    return _read_templates(_template_files())


@functools.lru_cache(maxsize=4)
def _read_templates(files: tuple[tuple[str, int, int], ...]) -> str:
    return "\n\0".join(f"{Path(t).name}\n{Path(t).read_text(encoding='utf-8')}" for t, _, _ in files)


@functools.lru_cache(maxsize=16)
def _key_prefix(triton: str, template: str, templates: str) -> hashlib._Hash:
    """The key's hash fed with what every kernel of a template shares (the templates' text is most of
    what a key hashes): each key continues a copy of it."""
    parts = [f"attnc {__version__}", f"triton {triton}", f"template {template}", templates, ""]
    return hashlib.sha256("\n\0".join(parts).encode())


def kernel_key(
    pattern: PatternIR, spec: KernelSpec | BackwardSpec, template: str, structure: str | None = None
) -> str:
    """The cache key of a kernel: the sha256 of its parts (attnc's version, Triton's, the template's name,
    every template's text, the pattern's `structure_text` and the spec), each after the last and a
    `\\n\\0`. `structure`, the pattern's `structure_text` if the caller has it."""
    key = _key_prefix(triton_version(), template, _templates_text()).copy()
    rest = [structure_text(pattern) if structure is None else structure, repr(spec)]
    key.update("\n\0".join(rest).encode())
    return key.hexdigest()


_TEMPORARY_NUMBERS = itertools.count()
# `tempfile.mkstemp`'s flags: a new file, never through a link, not inherited, no newline translation.
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL
_CREATE_NEW |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a part. The text is written
    as its UTF-8 bytes, in one write (no newline translation: the file is what the seal hashes), to a
    new private (0600) file beside it, then renamed over it. That file's name is this process's id
    and a count (`tempfile.mkstemp`'s random name costs a kernel build as much as the write itself):
    `O_EXCL` refuses a name that some file has, and the next number is tried."""
    data = text.encode("utf-8")
    directory = str(path.parent)
    for _ in range(100):
        tmp = os.path.join(directory, f".{path.name}.{os.getpid()}.{next(_TEMPORARY_NUMBERS)}.tmp")
        try:
            fd = os.open(tmp, _CREATE_NEW, 0o600)
        except FileExistsError:  # left by a process of the same id that ended without removing it
            continue
        except FileNotFoundError:  # the directory first (most writes go to one that exists)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, _CREATE_NEW, 0o600)
        break
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary file name", directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def source(
    pattern: PatternIR,
    spec: KernelSpec | BackwardSpec,
    template: str = "attention_fwd.py.jinja",
    structure: str | None = None,
) -> KernelSource:
    """The kernel source of a spec: from memory, else from disk (if its seal holds), else rendered and
    stored. `structure`: the pattern's `structure_text`, where the caller has it."""
    structure = structure_text(pattern) if structure is None else structure
    key = kernel_key(pattern, spec, template, structure)
    found = _SOURCES.get(key)
    if found is not None:
        STATS.memory_hits += 1
        return found
    filename = f"{key}.py"
    path = cache_subdir("kernels") / filename
    data = read_regular(path)
    text = unseal(key, data) if data is not None else None
    if text is not None:
        STATS.disk_hits += 1
    else:
        text = seal(key, render(spec, template))
        STATS.renders += 1
        path = store("kernels", filename, text)
    result = KernelSource(key, text, path, spec, template, structure)
    _SOURCES[key] = result
    return result


def module(kernel: KernelSource, backend: str) -> ModuleType:
    """The kernel's Python module for a backend, loaded once per process. It is compiled from the
    verified text, parsed once and its structure checked before any of it runs (`checked_code`: an
    InternalError if the render is not the module its spec and template describe), and Triton, which
    reads a jitted function's source through `linecache`, is given the same text. (Should something
    clear `linecache` before a kernel's first call, Triton reads the file again: the cache directory
    being private is what keeps that file the verified text.) The file is rewritten if it went missing
    or changed (in a directory that is still there), so that tools reading it see what runs."""
    assert backend in BACKENDS, backend
    loaded = _MODULES.get((kernel.key, backend))
    if loaded is not None:
        return loaded
    filename = str(kernel.path)
    code = checked_code(kernel.text, kernel.spec, kernel.template, filename)
    if kernel.path.parent.is_dir() and read_regular(kernel.path) != kernel.text.encode("utf-8"):
        with contextlib.suppress(OSError):  # a read-only cache: the verified text below is what runs
            write_atomic(kernel.path, kernel.text)
    # An mtime of None: `linecache.checkcache` keeps the entry, whatever happens to the file.
    linecache.cache[filename] = (len(kernel.text), None, kernel.text.splitlines(keepends=True), filename)
    require_triton()  # the module imports Triton: without it, say how to install it
    loaded = ModuleType(f"attnc_kernel_{kernel.key[:16]}_{backend}")
    loaded.__file__ = filename
    exec(code, loaded.__dict__)
    STATS.module_loads += 1
    _MODULES[kernel.key, backend] = loaded
    return loaded


def clear_memory() -> None:
    """Forget the sources and modules loaded in this process (the disk cache stays)."""
    _SOURCES.clear()
    _MODULES.clear()


SUBDIRS = ("kernels", "autotune")
"""The cache's directories: kernel sources and autotuning results (`runtime/autotune.py`)."""


@dataclass(frozen=True)
class DiskUsage:
    """What the cache directory holds: its path, and the files and bytes of each of `SUBDIRS`."""

    directory: Path
    files: dict[str, int]
    bytes: dict[str, int]

    def describe(self) -> str:
        """`attnc cache info`'s text: the directory, then one line per subdirectory and the total."""
        origin = config.cache_variable()
        lines = [f"cache directory: {self.directory} ({f'set by {origin}' if origin else 'the default'})"]
        for name in SUBDIRS:
            lines.append(f"  {name + '/':10} {self.files[name]:6} files {self.bytes[name]:12,} bytes")
        total_files, total_bytes = sum(self.files.values()), sum(self.bytes.values())
        lines.append(f"  {'total':10} {total_files:6} files {total_bytes:12,} bytes")
        return "\n".join(lines) + "\n"


def _entries(directory: Path) -> list[Path]:
    """The regular files directly in one of the cache's directories (none where it is missing)."""
    try:
        return [p for p in directory.iterdir() if p.is_file() and not p.is_symlink()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def disk_usage() -> DiskUsage:
    """The files and bytes the cache directory holds (`attnc cache info`); a directory another user
    owns or may write to is refused, as everywhere else."""
    files: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name in SUBDIRS:
        entries = _entries(cache_subdir(name))
        files[name] = len(entries)
        sizes[name] = sum(p.stat().st_size for p in entries)
    return DiskUsage(cache_dir(), files, sizes)


def clear_disk() -> DiskUsage:
    """Delete every file of the cache's directories (`attnc cache clear`) and return what was there.
    Only `kernels/` and `autotune/` are emptied, never the directory around them (`ATTNC_CACHE_DIR`
    may name one that holds other things). What this process loaded stays in its memory; a later
    process renders and tunes again."""
    usage = disk_usage()
    for name in SUBDIRS:
        for path in _entries(cache_subdir(name)):
            path.unlink(missing_ok=True)
    return usage
