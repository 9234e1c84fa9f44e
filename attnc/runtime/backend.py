"""Which Triton backend runs attnc's kernels in this process: the GPU, or Triton's interpreter.

Triton decides when `triton.language` is first imported whether `@triton.jit` functions (its own
library's among them) are compiled for a GPU or run by its interpreter (`TRITON_INTERPRET=1`), so the
choice holds for the whole process. `import attnc` makes it when nobody has: without a CUDA device, and
with neither `TRITON_INTERPRET` set nor Triton imported yet, it sets `TRITON_INTERPRET=1`, so that the
kernels run on the CPU. Set `TRITON_INTERPRET` yourself to choose (`1` runs GPU tensors through the
interpreter too: slowly, copying them to the host and back).

Triton is imported only where a kernel is loaded or launched (`require_triton`): it is a Linux-only
dependency, and the front end, the oracle, plans and `attnc check/ir/show` work without it.
"""

from __future__ import annotations

import functools
import os
import sys
from types import ModuleType

import torch

from attnc.errors import TritonMissingError

INTERPRETER = "interpreter"
CUDA = "cuda"


def choose() -> None:
    """Set `TRITON_INTERPRET=1` when there is no GPU and neither the user nor an import has chosen."""
    if "TRITON_INTERPRET" in os.environ or sys.modules.get("triton") is not None:
        return
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_ACTIVE: list[str] = []


def active() -> str:
    """The backend of this process: "interpreter" or "cuda" (decided once; remembered, so that code
    `torch.compile` traces reads a constant rather than calling into Triton)."""
    if not _ACTIVE:
        _ACTIVE.append(_decide())
    return _ACTIVE[0]


def _decide() -> str:
    try:
        import triton
    except ImportError:  # no kernel can run (`require_triton` says so); the choice `choose` made stands
        triton = None
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return INTERPRETER if knobs.runtime.interpret else CUDA
    return (
        INTERPRETER if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes") else CUDA
    )


def require_triton() -> ModuleType:
    """The `triton` module, or a `TritonMissingError` saying how to install it: called before a kernel
    is loaded or launched."""
    try:
        import triton
    except ImportError as err:
        raise TritonMissingError(
            f"running a kernel needs Triton, which cannot be imported ({err}): `pip install "
            "'triton>=3.6,<3.10'` (Linux; torch's Linux wheels bring it); parsing, `check`, `ir`, `show`, "
            "kern.reference, kern.mask and kern.plan work without it"
        ) from None
    return triton


@functools.cache  # every kernel key asks; a failed import is not remembered by Python itself
def triton_version() -> str:
    """Triton's version (a kernel's cache key holds it), or "none" where it cannot be imported."""
    try:
        import triton
    except ImportError:
        return "none"
    return str(triton.__version__)
