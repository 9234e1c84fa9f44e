"""Names no `input` or parameter may take: the keywords of the Python API's calls (DESIGN.md §3).

An input is passed to a kernel by keyword (`kern(q, k, v, doc=ids)`), next to the calls' own keywords
(`scale`, `return_lse`, `batch`, ...), so an input named like one of them could never be given. So is a
runtime parameter's value for one call (`kern(q, k, v, window=512)`): a runtime parameter may not take
those names either. A `static` parameter is passed to `Pattern.__call__` only, where just `self`
collides. The front end rejects such a declaration with a located error. This module imports nothing
(no torch), so the front end can use it; a test checks that every keyword of the public `Kernel` and
`Pattern` methods is here.
"""

from __future__ import annotations

RESERVED_NAMES: frozenset[str] = frozenset(
    {
        # Kernel.__call__ and Kernel.reference
        "self",
        "q",
        "k",
        "v",
        "scale",
        "return_lse",
        "out_dtype",
        "precision",
        # Kernel.mask, Kernel.plan and Kernel.block_map
        "q_len",
        "kv_len",
        "batch",
        "num_heads",
        "block",
        "device",
        # Kernel.ir
        "after",
        # the catch-all of the calls above (harmless today, reserved so it never means two things)
        "inputs",
        # DESIGN.md §3: plans, offsets, varlen, decode and future options
        "plan",
        "q_offset",
        "cu_seqlens_q",
        "cu_seqlens_k",
        "max_seqlen_q",
        "max_seqlen_k",
        "k_cache",
        "v_cache",
        "cache_seqlens",
        "block_table",
        "kernel_options",
        "return_aux",
        "enable_gqa",
        # Kernel.chunk (context parallelism)
        "kv_offset",
    }
)
"""Names no `input` or runtime parameter may take: every keyword of a `Kernel` method, present or
reserved."""

RESERVED_PARAMETER_NAMES: frozenset[str] = frozenset({"self"})
"""Names no pattern parameter may take, static ones included. Parameters are passed to
`Pattern.__call__(*args, **params)`, whose only named argument is `self`; a `static` parameter is given
nowhere else, so the kernel's keywords (`block`, `scale`, ...) do not collide with it, and examples
use `block` as one (`power_attention(block=64)`)."""

RESERVED_RUNTIME_PARAMETER_NAMES: frozenset[str] = RESERVED_NAMES
"""Names no runtime parameter may take: it may also be given by keyword to a `Kernel` method's call
(`kern(q, k, v, window=512)`), so it shares the inputs' reservation."""
