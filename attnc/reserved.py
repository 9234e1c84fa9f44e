"""Names no `input` or parameter may take: the keywords of the Python API's calls (DESIGN.md §3).

An input is passed to a kernel by keyword (`kern(q, k, v, doc=ids)`), next to the calls' own keywords
(`scale`, `return_lse`, `batch`, ...), so an input named like one of them could never be given; a pattern
parameter is passed to `Pattern.__call__`, where only `self` collides. The front end rejects such a
declaration with a located error. This module imports nothing (no torch), so the
front end can use it; a test checks that every keyword of the public `Kernel` and `Pattern` methods is here.
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
    }
)
"""Names no `input` may take: every keyword of a `Kernel` method, present or reserved."""

RESERVED_PARAMETER_NAMES: frozenset[str] = frozenset({"self"})
"""Names no pattern parameter may take. Parameters are passed to `Pattern.__call__(*args, **params)`,
whose only named argument is `self`; the kernel's keywords (`block`, `scale`, ...) do not collide with
them, and examples use `block` as a parameter (`power_attention(block=64)`)."""
