"""How many PARTIAL and FULL tiles each query chunk visits in each key chunk: the numbers context
parallelism is balanced by (`docs/distributed.md`).

The census is computed from the pattern's tile predicates (`classify-tiles`), never from a dense mask,
in two levels: the predicates settle whole (query chunk, key chunk) pairs first (a pair they call EMPTY
holds only EMPTY tiles, one they call FULL only FULL ones: the predicates are sound for any box), and
only the pairs left PARTIAL are looked at tile by tile. A causal census over 96 x 8K tokens evaluates
768 x 768 chunk pairs and 768 diagonal pairs' tiles, not the 37.7M tiles of the whole map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnc import oracle
from attnc.api import Kernel
from attnc.errors import InputError
from attnc.ir.nodes import PatternIR
from attnc.runtime.plan import FULL, PARTIAL, predicate_classes, q_shift, uses

# Tiles classified at once in the second level: bounds the temporary memory, never the result.
_CHUNK_TILES = 1 << 20


@dataclass(frozen=True)
class Census:
    """Visited tiles of one kernel over one sequence cut into `num_chunks` chunks of `chunk` tokens
    (query chunk `i` and key chunk `j` both cover tokens `[i * chunk, (i + 1) * chunk)`).

    partial, full: int64 [num_chunks, num_chunks] on the CPU; `[i, j]` counts the PARTIAL (FULL) tiles
                   of query chunk `i` against key chunk `j`, summed over every batch row and head.
    block:         the (query, key) tile size the tiles have.
    """

    seq_len: int
    chunk: int
    block: tuple[int, int]
    partial: torch.Tensor
    full: torch.Tensor

    @property
    def num_chunks(self) -> int:
        return self.seq_len // self.chunk

    def visits(self) -> torch.Tensor:
        """bool [num_chunks, num_chunks]: whether query chunk `i` visits any tile of key chunk `j`."""
        return (self.partial + self.full) > 0


def check_chunking(seq_len: int, chunk: int, block: tuple[int, int]) -> None:
    """An `InputError` unless `chunk` is a positive multiple of both tile sizes and divides `seq_len`
    (the documented rule: no padding, the caller picks a length that chunks evenly)."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        raise InputError(f"chunk must be a positive int, got {chunk!r}", None)
    if chunk % block[0] or chunk % block[1]:
        raise InputError(f"chunk={chunk} must be a multiple of the tile sizes {block}", None)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise InputError(f"seq_len must be a positive int, got {seq_len!r}", None)
    if seq_len % chunk:
        raise InputError(
            f"seq_len={seq_len} is not a multiple of chunk={chunk}: pad the sequence to a multiple of it "
            f"(padding keys that no query may see) or pass another chunk=",
            None,
        )


def tile_census(
    kern: Kernel,
    seq_len: int,
    *,
    chunk: int,
    batch: int | None = None,
    num_heads: int | None = None,
    block: tuple[int, int] = (128, 128),
    **inputs: Any,
) -> Census:
    """The census of `kern` over a self-attention sequence of `seq_len` tokens (module docstring)."""
    check_chunking(seq_len, chunk, block)
    env = census_env(kern, seq_len, batch, num_heads, inputs)
    return census_from_env(kern, env, seq_len, chunk, block, batch, num_heads)


def census_env(
    kern: Kernel, seq_len: int, batch: int | None, num_heads: int | None, inputs: dict[str, Any]
) -> oracle.Env:
    """The kernel's environment for a sequence: its own argument checks, the inputs and the runtime
    parameters' values. Reused across chunk sizes, it keeps the inputs' range tables (built once)."""
    return kern._env(seq_len, seq_len, batch, num_heads, *kern._split(inputs), None)


def census_from_env(
    kern: Kernel,
    env: oracle.Env,
    seq_len: int,
    chunk: int,
    block: tuple[int, int],
    batch: int | None,
    num_heads: int | None,
) -> Census:
    """`tile_census` with the environment made (`census_env`) and the chunking checked."""
    pattern = kern.pattern
    n = seq_len // chunk
    # Sizes not given are those the inputs' shapes name (as `kern.plan` infers them), else 1.
    total_b, total_h = batch or env.batch or 1, num_heads or env.num_heads or 1
    if pattern.tiles is None:  # no mask: every tile FULL
        full = torch.full((n, n), total_b * total_h * (chunk // block[0]) * (chunk // block[1]))
        return Census(seq_len, chunk, block, torch.zeros((n, n), dtype=torch.int64), full)
    roots = list(pattern.tiles.roots())
    batches = total_b if uses(roots, "b") else 1
    heads = total_h if uses(roots, "h") else 1
    device = env.device
    points = {
        "b": torch.arange(batches, device=device).reshape(-1, 1, 1, 1),
        "h": torch.arange(heads, device=device).reshape(1, -1, 1, 1),
    }
    first = torch.arange(n, device=device, dtype=torch.int64) * chunk
    shift = q_shift(env, points["b"])
    boxes = {
        "q_first": first.reshape(1, 1, -1, 1) + shift,
        "q_last": first.reshape(1, 1, -1, 1) + (chunk - 1) + shift,
        "kv_first": first.reshape(1, 1, 1, -1) + env.kv_offset,
        "kv_last": first.reshape(1, 1, 1, -1) + (chunk - 1) + env.kv_offset,
    }
    coarse = predicate_classes(pattern, env, points, boxes, (batches, heads, n, n))
    tiles_per_pair = (chunk // block[0]) * (chunk // block[1])
    full = (coarse == FULL).to(torch.int64) * tiles_per_pair
    partial = torch.zeros_like(full)
    unsettled = (coarse == PARTIAL).nonzero()
    if len(unsettled):
        fine_partial, fine_full = _refine(pattern, env, unsettled, chunk, block)
        index = tuple(unsettled[:, i] for i in range(4))
        partial.index_put_(index, fine_partial)
        full.index_put_(index, fine_full)
    # Batch rows and heads the pattern ignores have the same tiles as row 0 / head 0.
    scale = (total_b // batches) * (total_h // heads)
    # On the host: the census is small, and the assignment that reads it runs there.
    return Census(
        seq_len, chunk, block, (partial.sum((0, 1)) * scale).cpu(), (full.sum((0, 1)) * scale).cpu()
    )


def _refine(
    pattern: PatternIR, env: oracle.Env, pairs: torch.Tensor, chunk: int, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """PARTIAL and FULL tile counts of each chunk pair in `pairs` (int64 [P, 4]: b, h, query chunk,
    key chunk), by the tile predicates, a bounded number of tiles at a time."""
    bm, bn = block
    t, u = chunk // bm, chunk // bn
    device = pairs.device
    q_tile = torch.arange(t, device=device).reshape(1, -1, 1) * bm
    kv_tile = torch.arange(u, device=device).reshape(1, 1, -1) * bn
    partial = torch.empty(len(pairs), dtype=torch.int64, device=device)
    full = torch.empty_like(partial)
    step = max(1, _CHUNK_TILES // (t * u))
    for start in range(0, len(pairs), step):
        p = pairs[start : start + step]
        b, h, qc, kc = (p[:, i].reshape(-1, 1, 1) for i in range(4))
        q_first = qc * chunk + q_tile + q_shift(env, b)
        kv_first = kc * chunk + kv_tile + env.kv_offset
        tiles = {
            "q_first": q_first,
            "q_last": q_first + (bm - 1),
            "kv_first": kv_first,
            "kv_last": kv_first + (bn - 1),
        }
        classes = predicate_classes(pattern, env, {"b": b, "h": h}, tiles, (len(p), t, u))
        partial[start : start + step] = (classes == PARTIAL).sum((1, 2))
        full[start : start + step] = (classes == FULL).sum((1, 2))
    return partial, full
