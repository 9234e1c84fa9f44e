"""Which Triton backend runs attnc's kernels in this process: the GPU, or Triton's interpreter.

Triton decides when `triton.language` is first imported whether `@triton.jit` functions (its own
library's among them) are compiled for a GPU or run by its interpreter (`TRITON_INTERPRET=1`), so the
choice holds for the whole process. `import attnc` makes it when nobody has: without a CUDA device, and
with neither `TRITON_INTERPRET` set nor Triton imported yet, it sets `TRITON_INTERPRET=1`, so that the
kernels run on the CPU. Set `TRITON_INTERPRET` yourself to choose (`1` runs GPU tensors through the
interpreter too: slowly, copying them to the host and back).
"""

from __future__ import annotations

import os
import sys

import torch

INTERPRETER = "interpreter"
CUDA = "cuda"


def choose() -> None:
    """Set `TRITON_INTERPRET=1` when there is no GPU and neither the user nor an import has chosen."""
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
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
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return INTERPRETER if knobs.runtime.interpret else CUDA
    return (
        INTERPRETER if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes") else CUDA
    )
