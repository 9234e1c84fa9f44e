"""How many PARTIAL and FULL tiles each query chunk visits in each key chunk: the numbers context
parallelism is balanced by (`docs/distributed.md`).

The census is computed from the pattern's tile predicates (`classify-tiles`), never from a dense mask,
in two levels: the predicates settle whole (query chunk, key chunk) pairs first (a pair they call EMPTY
holds only EMPTY tiles, one they call FULL only FULL ones: the predicates are sound for any box), and
only the pairs left PARTIAL are looked at tile by tile. A causal census over 96 x 8K tokens evaluates
768 x 768 chunk pairs and 768 diagonal pairs' tiles, not the 37.7M tiles of the whole map. Inputs
along the sequence are read through range tables of tile-sized blocks (`BlockRangeTable`), exact for
the census's tile- and chunk-aligned boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnc import oracle
from attnc.analysis.summaries import RangeTable
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
    half_partial, half_full: int64 [num_chunks, 2]: the PARTIAL (FULL) tiles of the first and of the
                   second half of each query chunk's tile rows (`chunk // block[0] // 2` rows, then the
                   rest), over every key chunk: what a chunk half as large would cost, its heaviest
                   part bounding how well such chunks can balance (`ContextParallel.dispatch`).
    """

    seq_len: int
    chunk: int
    block: tuple[int, int]
    partial: torch.Tensor
    full: torch.Tensor
    half_partial: torch.Tensor
    half_full: torch.Tensor

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
    env = census_env(kern, seq_len, batch, num_heads, inputs, block)
    return census_from_env(kern, env, seq_len, chunk, block, batch, num_heads)


def census_env(
    kern: Kernel,
    seq_len: int,
    batch: int | None,
    num_heads: int | None,
    inputs: dict[str, Any],
    block: tuple[int, int] = (128, 128),
) -> oracle.Env:
    """The kernel's environment for a sequence: its own argument checks, the inputs and the runtime
    parameters' values. Reused across chunk sizes (multiples of `block`), it keeps the inputs' range
    tables: along the sequence, `BlockRangeTable`s of `block`-aligned blocks (module docstring)."""
    env = kern._env(seq_len, seq_len, batch, num_heads, *kern._split(inputs), None)
    step = math.gcd(*block)
    for name, tensor in env.inputs.items():
        for axis, extent in enumerate(tensor.shape):
            if extent == seq_len:
                env.tables[name, axis] = BlockRangeTable.build(tensor, axis, step)
    return env


class BlockRangeTable:
    """Range bounds of an input along `axis` from its blocks of `step` positions: the bound of a box is
    that of the blocks it touches. Exact for a box from a multiple of `step` to one before a multiple
    (every box of the census: tiles and chunks are multiples of `step` from position 0); for another
    box, a bound of a wider box, which is sound (a tile it cannot settle stays PARTIAL). Built in O(input
    size) with tables `step` times smaller than a `RangeTable` of every position (the one a plan needs:
    at 786K tokens that one costs tens of ms per dispatch, this one well under one). Answers
    `RangeTable.bound` calls, with its conventions (0 outside the input, an empty box 0)."""

    def __init__(self, blocks: tuple[torch.Tensor, torch.Tensor], axis: int, extent: int, step: int) -> None:
        # Each block's min and max (int64, the input's shape with `axis` counting blocks), and their
        # range tables for boxes over several blocks.
        self.blocks, self.axis, self.extent, self.step = blocks, axis, extent, step
        self.tables = tuple(RangeTable.build(b, axis) for b in blocks)

    @staticmethod
    def build(tensor: torch.Tensor, axis: int, step: int) -> BlockRangeTable:
        values = tensor.movedim(axis, -1)
        if values.dtype is torch.bool:
            values = values.to(torch.uint8)
        elif values.is_floating_point():  # summaries bound ints and bools; floats as RangeTable stores them
            values = values.to(torch.int64)
        extent = values.shape[-1]
        pad = -extent % step
        if pad:  # repeating the last position changes no block's bounds
            values = torch.cat([values, values[..., -1:].expand(*values.shape[:-1], pad)], dim=-1)
        blocks = values.reshape(*values.shape[:-1], -1, step)
        low, high = (b.to(torch.int64).movedim(-1, axis) for b in (blocks.amin(-1), blocks.amax(-1)))
        return BlockRangeTable((low, high), axis, extent, step)

    def bound(
        self, points: Sequence[torch.Tensor | None], lo: torch.Tensor, hi: torch.Tensor, maximum: bool
    ) -> torch.Tensor:
        """As `RangeTable.bound`, over the blocks that [lo, hi] touches."""
        first, final = lo.div(self.step, rounding_mode="floor"), hi.div(self.step, rounding_mode="floor")
        if bool((first == final).all()):  # one block each (the census's tiles): read it
            blocks = self._read(points, first, maximum)
        else:
            blocks = self.tables[maximum].bound(points, first, final, maximum)
        last = self.extent - 1
        # A box reaching past the last position (inside the last block) also reads 0; one wholly
        # outside the input, or empty, reads only 0.
        pick = torch.maximum if maximum else torch.minimum
        blocks = torch.where(hi > last, pick(blocks, torch.zeros_like(blocks)), blocks)
        return torch.where((hi < 0) | (lo > last) | (lo > hi), torch.zeros_like(blocks), blocks)

    def query(
        self, points: Sequence[torch.Tensor | None], lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) over positions [lo, hi] of `axis`, as `bound`."""
        return self.bound(points, lo, hi, False), self.bound(points, lo, hi, True)

    def _read(
        self, points: Sequence[torch.Tensor | None], block: torch.Tensor, maximum: bool
    ) -> torch.Tensor:
        """The bound of one block per box (`block` along `axis`, `points` elsewhere); 0 outside."""
        values = self.blocks[maximum]
        index, valid = [], torch.ones((), dtype=torch.bool, device=block.device)
        for axis, point in enumerate(points):
            position = block if axis == self.axis else point
            assert position is not None
            valid = valid & (position >= 0) & (position < values.shape[axis])
            index.append(position.clamp(0, max(values.shape[axis] - 1, 0)))
        return torch.where(valid, values[tuple(index)], 0)


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
        t, u = chunk // block[0], chunk // block[1]
        full = torch.full((n, n), total_b * total_h * t * u)
        half = torch.tensor([t // 2, t - t // 2]) * (total_b * total_h * u * n)
        zeros = torch.zeros((n, 2), dtype=torch.int64)
        return Census(
            seq_len, chunk, block, torch.zeros((n, n), dtype=torch.int64), full, zeros, half.expand(n, 2)
        )
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
    # Batch rows and heads the pattern ignores have the same tiles as row 0 / head 0.
    scale = (total_b // batches) * (total_h // heads)
    # Summed over batch rows and heads at once, [n, n]: at 96 x 8K tokens and half-size chunks these
    # are 2.4M pairs, where every extra full-size pass costs milliseconds.
    full = (coarse == FULL).sum((0, 1)).mul_(scale)
    t, u = chunk // block[0], chunk // block[1]
    # A FULL pair's tiles: `t // 2` of its `t` tile rows in the first half of the query chunk.
    half_full = full.sum(1, keepdim=True) * (torch.tensor([t // 2, t - t // 2], device=device) * u)
    full.mul_(tiles_per_pair)
    partial = torch.zeros_like(full)
    half_partial = torch.zeros((n, 2), dtype=torch.int64, device=device)
    unsettled = (coarse == PARTIAL).nonzero()
    if len(unsettled):
        fine_partial, fine_full = _refine(pattern, env, unsettled, chunk, block)
        index = (unsettled[:, 2], unsettled[:, 3])
        partial.index_put_(index, fine_partial.sum(1) * scale, accumulate=True)
        full.index_put_(index, fine_full.sum(1) * scale, accumulate=True)
        half_partial.index_add_(0, unsettled[:, 2], fine_partial * scale)
        half_full.index_add_(0, unsettled[:, 2], fine_full * scale)
    # On the host: the census is small, and the assignment that reads it runs there.
    return Census(seq_len, chunk, block, partial.cpu(), full.cpu(), half_partial.cpu(), half_full.cpu())


def _refine(
    pattern: PatternIR, env: oracle.Env, pairs: torch.Tensor, chunk: int, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """PARTIAL and FULL tile counts of each chunk pair in `pairs` (int64 [P, 4]: b, h, query chunk,
    key chunk), by the tile predicates, a bounded number of tiles at a time: int64 [P, 2] each, the
    first half of the query chunk's tile rows (`t // 2` of them) and the rest."""
    bm, bn = block
    t, u = chunk // bm, chunk // bn
    device = pairs.device
    q_tile = torch.arange(t, device=device).reshape(1, -1, 1) * bm
    kv_tile = torch.arange(u, device=device).reshape(1, 1, -1) * bn
    partial = torch.empty((len(pairs), 2), dtype=torch.int64, device=device)
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
        for value, counts in ((PARTIAL, partial), (FULL, full)):
            per_row = (classes == value).sum(2)
            counts[start : start + step, 0] = per_row[:, : t // 2].sum(1)
            counts[start : start + step, 1] = per_row[:, t // 2 :].sum(1)
    return partial, full
