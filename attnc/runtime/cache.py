"""Kernel sources, cached in memory and on disk by content, loaded once per process and backend.

A kernel's key is the sha256 of attnc's version, the template (its name, and the text of every template,
as they import each other's macros), the pattern's IR
after `fuse` (its name and parameter list left out: two patterns of the same structure share a
kernel), the `KernelSpec` (without its title) and Triton's version. The rendered source lives in
`$ATTNC_CACHE_DIR/kernels/<key>.py` (default `~/.cache/attnc`), written atomically (a temporary file,
then `os.replace`), so concurrent processes never read half a file. A key found in memory or on disk
is never rendered again; lengths, head dims, dtypes and input values are kernel arguments, so none of
them changes the key.

Per-device data (autotuning results, `runtime/autotune.py`) lives beside the source under the same key
and the device's name, so DESIGN.md's single cache key (version, IR, spec, Triton, device) is split
in two levels: what the source depends on, then what a device adds.

Modules are kept per backend ("cuda" or "interpreter", `runtime/backend.py`): the same source,
compiled for the GPU or run by Triton's interpreter.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import triton

from attnc.codegen.lower import TEMPLATES, render
from attnc.codegen.spec import BackwardSpec, KernelSpec
from attnc.ir.nodes import PatternIR
from attnc.ir.printer import print_pattern

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
    configured = os.environ.get("ATTNC_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "attnc"


@dataclass(frozen=True)
class KernelSource:
    key: str
    text: str
    path: Path


_SOURCES: dict[str, KernelSource] = {}
_MODULES: dict[tuple[str, str], ModuleType] = {}


def structure_text(pattern: PatternIR) -> str:
    """The pattern's IR without its name and parameter list: what its kernel depends on."""
    text = print_pattern(replace(pattern, name="_", bindings=()))
    return text.split("\n", 1)[1]


def kernel_key(pattern: PatternIR, spec: KernelSpec | BackwardSpec, template: str) -> str:
    from attnc import __version__

    parts = [
        f"attnc {__version__}",
        f"triton {triton.__version__}",
        f"template {template}",
        *(f"{t.name}\n{t.read_text(encoding='utf-8')}" for t in sorted(TEMPLATES.glob("*.jinja"))),
        structure_text(pattern),
        repr(replace(spec, pattern="")),
    ]
    return hashlib.sha256("\n\0".join(parts).encode()).hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def source(
    pattern: PatternIR, spec: KernelSpec | BackwardSpec, template: str = "attention_fwd.py.jinja"
) -> KernelSource:
    """The kernel source of a spec: from memory, else from disk, else rendered and stored."""
    key = kernel_key(pattern, spec, template)
    found = _SOURCES.get(key)
    if found is not None:
        STATS.memory_hits += 1
        return found
    path = cache_dir() / "kernels" / f"{key}.py"
    try:
        text = path.read_text(encoding="utf-8")
        STATS.disk_hits += 1
    except (FileNotFoundError, UnicodeDecodeError):
        text = render(spec, template)
        STATS.renders += 1
        write_atomic(path, text)
    result = KernelSource(key, text, path)
    _SOURCES[key] = result
    return result


def module(kernel: KernelSource, backend: str) -> ModuleType:
    """The kernel's Python module for a backend, loaded once per process. Triton reads a jitted
    function's source from its file, so the module is loaded from the cached file itself (rewritten if
    it went missing)."""
    assert backend in BACKENDS, backend
    loaded = _MODULES.get((kernel.key, backend))
    if loaded is not None:
        return loaded
    if not kernel.path.exists() or kernel.path.read_text(encoding="utf-8") != kernel.text:
        write_atomic(kernel.path, kernel.text)
    name = f"attnc_kernel_{kernel.key[:16]}_{backend}"
    spec = importlib.util.spec_from_file_location(name, kernel.path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    STATS.module_loads += 1
    _MODULES[kernel.key, backend] = loaded
    return loaded


def clear_memory() -> None:
    """Forget the sources and modules loaded in this process (the disk cache stays)."""
    _SOURCES.clear()
    _MODULES.clear()
