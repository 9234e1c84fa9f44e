"""Launch plans: which key tiles each query tile visits, and which of them are FULL.

A `Plan` is what a kernel launch consumes (`Kernel.plan`). Tiles are `block = (BLOCK_M, BLOCK_N)`
positions; query tile `m` covers queries `[m * BLOCK_M, min((m + 1) * BLOCK_M, Q_LEN))` and key tile
`n` keys `[n * BLOCK_N, min((n + 1) * BLOCK_N, KV_LEN))`. Tile classes: 0 EMPTY (no allowed pair),
1 PARTIAL (the kernel evaluates the mask), 2 FULL (every pair inside the lengths allowed; the kernel
skips the mask). A plan may call a tile PARTIAL that is EMPTY or FULL, never the reverse.

Two kinds, chosen by the `block-sparsify` pass:

- **analytic** (`plan.kv_ranges`, `plan.q_ranges`; `plan.tensors()` is empty): per conjunct `j`, four
  int expressions of the tile bounds (`derive-ranges`): a hull `[lo, hi]` and a core `[full_lo,
  full_hi]` of element positions. A kernel computes them for its own tile and turns them into tile
  indices with `tile_span` (visit key tiles `lo // BLOCK_N ..= hi // BLOCK_N`; FULL the ones inside the
  core). No metadata at all, and any block size works.
- **metadata** (`plan.kv_tiles`, `plan.q_tiles`): `BlockSparse` compressed rows, built here from the
  `classify-tiles` predicates in O(number of tiles), on the inputs' device, per batch row / head only
  where the pattern depends on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from attnc import oracle
from attnc.analysis.normal_form import split_comparison
from attnc.analysis.value_ranges import ValueRanges
from attnc.errors import InputError, InternalError, Loc
from attnc.ir.nodes import Node, PatternIR
from attnc.ir.results import AxisRange
from attnc.ir.rewrite import rewrite

# Tiles evaluated at once while building metadata: bounds the temporary memory (a few int64 tensors
# of this many elements), never the result.
_CHUNK_TILES = 1 << 21
# Positions evaluated at once while refining PARTIAL tiles in `exact_block_map`.
_CHUNK_POSITIONS = 1 << 22

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class BlockSparse:
    """Non-empty tiles of each row of tiles, in compressed rows (CSR), PARTIAL and FULL apart.

    Rows are the tiles along one axis (query tiles for `kv_tiles`, key tiles for `q_tiles`) of each
    (batch row, head): row `r = (b * heads + h) * rows + i`, where `batches` and `heads` are 1 when the
    pattern does not depend on `b` / `h` (use b = 0 / h = 0 then). For row r, the PARTIAL columns are
    `partial_indices[partial_offsets[r]:partial_offsets[r + 1]]`, ascending; FULL ones likewise.

    partial_offsets, full_offsets: int32 [batches * heads * rows + 1], starting at 0 (so at most
                                    `OFFSET_LIMIT` tiles of each class: more is an `InputError`).
    partial_indices, full_indices:  int32 [number of PARTIAL / FULL tiles], tile indices along the
                                    other axis.
    """

    batches: int
    heads: int
    rows: int
    cols: int
    partial_offsets: torch.Tensor
    partial_indices: torch.Tensor
    full_offsets: torch.Tensor
    full_indices: torch.Tensor

    def classes(self) -> torch.Tensor:
        """The tile classes, int8 [batches, heads, rows, cols] (dense over tiles: for tests and show)."""
        out = torch.zeros(
            self.batches * self.heads * self.rows * self.cols,
            dtype=torch.int8,
            device=self.partial_indices.device,
        )
        for offsets, indices, value in (
            (self.partial_offsets, self.partial_indices, PARTIAL),
            (self.full_offsets, self.full_indices, FULL),
        ):
            counts = (offsets[1:] - offsets[:-1]).long()
            rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
            out[rows * self.cols + indices.long()] = value
        return out.reshape(self.batches, self.heads, self.rows, self.cols)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}_partial_offsets": self.partial_offsets,
            f"{prefix}_partial_indices": self.partial_indices,
            f"{prefix}_full_offsets": self.full_offsets,
            f"{prefix}_full_indices": self.full_indices,
        }


@dataclass(frozen=True)
class Plan:
    """What a launch needs to know about the pattern's tiles (see the module docstring).

    sparsity:  "analytic" or "metadata[...]": the text of the `block-sparsify` decision (`Sparsity`).
    block:     (BLOCK_M, BLOCK_N) the metadata was built for (analytic plans serve any block).
    kv_ranges: analytic: per conjunct, the key `AxisRange` over a query tile; None for metadata plans.
    q_ranges:  analytic: per conjunct, the query `AxisRange` over a key tile (the backward pass's loops).
    kv_tiles:  metadata: key tiles per query tile; None for analytic plans.
    q_tiles:   metadata: query tiles per key tile (the transpose).
    """

    sparsity: str
    q_len: int
    kv_len: int
    batch: int
    num_heads: int
    block: tuple[int, int]
    kv_ranges: tuple[AxisRange, ...] | None
    q_ranges: tuple[AxisRange, ...] | None
    kv_tiles: BlockSparse | None
    q_tiles: BlockSparse | None
    pattern: PatternIR
    env: oracle.Env

    @property
    def analytic(self) -> bool:
        return self.kv_ranges is not None

    @property
    def num_tiles(self) -> tuple[int, int]:
        return _cdiv(self.q_len, self.block[0]), _cdiv(self.kv_len, self.block[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every metadata tensor the plan holds, by name (none for analytic plans)."""
        if self.kv_tiles is None or self.q_tiles is None:
            return {}
        return {**self.kv_tiles.tensors("kv"), **self.q_tiles.tensors("q")}

    def block_map(self, transposed: bool = False) -> torch.Tensor:
        """The classes the kernel will see, int8 [B or 1, H or 1, query tiles, key tiles]; with
        `transposed`, as the backward pass sees them, [B or 1, H or 1, key tiles, query tiles]."""
        if self.kv_tiles is not None and self.q_tiles is not None:
            return (self.q_tiles if transposed else self.kv_tiles).classes()
        assert self.kv_ranges is not None and self.q_ranges is not None
        if transposed:
            return _ranges_map(self.q_ranges, self, "kv", "q")
        return _ranges_map(self.kv_ranges, self, "q", "kv")

    def counts(self) -> dict[str, int]:
        """How many tiles are EMPTY, PARTIAL and FULL (over every batch row and head the plan has)."""
        classes = self.block_map()
        return {
            "empty": int((classes == EMPTY).sum()),
            "partial": int((classes == PARTIAL).sum()),
            "full": int((classes == FULL).sum()),
        }


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_span(
    lo: torch.Tensor, hi: torch.Tensor, full_lo: torch.Tensor, full_hi: torch.Tensor, block: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Element ranges to tile indices: (first, last, full_first, full_last), inclusive; a span is empty
    when first > last. A tile is visited if it meets [lo, hi], FULL if it lies in [full_lo, full_hi]
    (the last tile, cut by the length, counts as inside when full_hi reaches length - 1)."""
    empty = lo > hi
    first = torch.where(empty, torch.ones_like(lo), torch.div(lo, block, rounding_mode="floor"))
    last = torch.where(empty, torch.zeros_like(hi), torch.div(hi, block, rounding_mode="floor"))
    no_core = full_lo > full_hi
    full_first = -torch.div(-full_lo, block, rounding_mode="floor")
    full_last = torch.where(
        full_hi >= length - 1,
        torch.full_like(full_hi, _cdiv(length, block) - 1),
        torch.div(full_hi + 1, block, rounding_mode="floor") - 1,
    )
    full_first = torch.where(no_core, torch.ones_like(full_first), full_first)
    full_last = torch.where(no_core, torch.zeros_like(full_last), full_last)
    return first, last, full_first, full_last


def schedule(spans: list[tuple[int, int, int, int]]) -> list[tuple[int, bool]]:
    """The key tiles one query tile visits, in order, each once, and whether each is FULL: the loop a
    kernel runs over an analytic plan. `spans` are the conjuncts' `tile_span`s for that query tile
    (first, last, full_first, full_last). Spans are taken in order of their first tile, each starting
    after the tiles already visited; a tile is FULL when it lies in the core of any span (a few scalar
    comparisons per tile), which is what `Plan.block_map` reports."""
    visited: list[tuple[int, bool]] = []
    done = -1
    for first, last, _, _ in sorted(spans):
        for tile in range(max(first, done + 1), last + 1):
            visited.append((tile, any(f <= tile <= g for _, _, f, g in spans)))
        done = max(done, last)
    return visited


def uses(nodes: list[Node], name: str) -> bool:
    """Whether any of the expressions uses the index variable `name`."""
    return any(name in root.free for root in nodes)


def tile_bounds(
    count: int, block: int, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position (inclusive) of each of `count` tiles, int64 [count]."""
    first = torch.arange(count, device=device, dtype=torch.int64) * block
    return first, torch.clamp(first + block, max=length) - 1


def tile_env(base: oracle.Env, points: dict[str, torch.Tensor], tiles: dict[str, torch.Tensor]) -> oracle.Env:
    """`base` with index variables and tile bounds bound to the given (broadcasting) tensors."""
    return oracle.Env(
        base.batch,
        base.num_heads,
        base.q_len,
        base.kv_len,
        base.device,
        base.inputs,
        points=points,
        tiles=tiles,
        tables=base.tables,
        params=base.params,
    )


def _ranges_map(ranges: tuple[AxisRange, ...], plan: Plan, rows: str, cols: str) -> torch.Tensor:
    """Classes of the tiles from closed-form ranges: [B', H', row tiles, col tiles]."""
    oracle.check_sizes(plan.pattern, plan.env)  # an analytic plan is made for any lengths, used for fewer
    lengths = {"q": plan.q_len, "kv": plan.kv_len}
    blocks = {"q": plan.block[0], "kv": plan.block[1]}
    device = plan.env.device
    n_rows, n_cols = _cdiv(lengths[rows], blocks[rows]), _cdiv(lengths[cols], blocks[cols])
    roots = [x for r in ranges for x in (r.lo, r.hi, r.full_lo, r.full_hi)]
    batches = plan.batch if uses(roots, "b") else 1
    heads = plan.num_heads if uses(roots, "h") else 1
    first, last = tile_bounds(n_rows, blocks[rows], lengths[rows], device)
    points = {
        "b": torch.arange(batches, device=device).reshape(-1, 1, 1, 1),
        "h": torch.arange(heads, device=device).reshape(1, -1, 1, 1),
    }
    env = tile_env(
        plan.env,
        points,
        {f"{rows}_first": first.reshape(1, 1, -1, 1), f"{rows}_last": last.reshape(1, 1, -1, 1)},
    )
    shape = (batches, heads, n_rows, 1)
    col = torch.arange(n_cols, device=device).reshape(1, 1, 1, n_cols)
    classes = torch.zeros((batches, heads, n_rows, n_cols), dtype=torch.int8, device=device)
    for r in ranges:
        values = [
            oracle.evaluate(x, plan.pattern, env).expand(shape) for x in (r.lo, r.hi, r.full_lo, r.full_hi)
        ]
        t_first, t_last, f_first, f_last = tile_span(*values, blocks[cols], lengths[cols])
        visited = (col >= t_first) & (col <= t_last)
        full = (col >= f_first) & (col <= f_last)
        here = torch.where(full, FULL, torch.where(visited, PARTIAL, EMPTY)).to(torch.int8)
        classes = torch.maximum(classes, here)
    return classes


def _uses_kv_tile(node: Node) -> bool:
    return not node.free.isdisjoint(("kv_first", "kv_last"))


@lru_cache(maxsize=256)
def separate_axes(predicate: Node, pattern: PatternIR | None = None) -> Node:
    """The predicate with each int comparison `R(q tile) + C(kv tile) op c` rewritten as
    `R op c - C` (`split_comparison`), so that evaluated over all tiles at once the int arithmetic runs
    at the size of one axis and only the bool comparison at the size of the tile grid. Not where
    `c - C` could leave int64 and the comparison could not (`value_ranges`; `pattern` gives the
    inputs' dtypes)."""
    ranges = ValueRanges(pattern)

    def split(node: Node) -> Node | None:
        result = split_comparison(node, _uses_kv_tile)
        if result is not None and (ranges.fits(result) or not ranges.fits(node)):
            return result
        return None

    return rewrite(predicate, split)


def predicate_classes(
    pattern: PatternIR,
    env: oracle.Env,
    points: dict[str, torch.Tensor],
    tiles: dict[str, torch.Tensor],
    shape: tuple[int, ...],
) -> torch.Tensor:
    """Tile classes by the `classify-tiles` predicates, int8 of `shape`, for tiles given as broadcasting
    tensors of their bounds (and of `b`, `h`)."""
    if pattern.tiles is None:
        raise InternalError("the pattern was not compiled through classify-tiles")
    local = tile_env(env, points, tiles)
    may = oracle.evaluate(separate_axes(pattern.tiles.any, pattern), pattern, local)
    must = oracle.evaluate(separate_axes(pattern.tiles.all, pattern), pattern, local)
    # EMPTY + [may or must] + [must]: 0, 1 or 2, in int8 all along (the grid is the large part).
    classes = (may | must).to(torch.int8) + must.to(torch.int8)
    return classes.expand(shape)


def build_block_sparse(
    pattern: PatternIR, env: oracle.Env, block: tuple[int, int], batches: int, heads: int
) -> tuple[BlockSparse, BlockSparse]:
    """Metadata for both directions from the tile predicates, one chunk of query-tile rows at a time:
    O(number of tiles) time, temporary memory bounded by `_CHUNK_TILES`, result O(non-empty tiles)."""
    device = env.device
    n_q, n_kv = _cdiv(env.q_len, block[0]), _cdiv(env.kv_len, block[1])
    n_rows = batches * heads * n_q
    q_first, q_last = tile_bounds(n_q, block[0], env.q_len, device)
    kv_first, kv_last = tile_bounds(n_kv, block[1], env.kv_len, device)
    cols = {"kv_first": kv_first.reshape(1, 1, -1), "kv_last": kv_last.reshape(1, 1, -1)}
    parts: dict[int, list[torch.Tensor]] = {PARTIAL: [], FULL: []}
    counts: dict[int, list[torch.Tensor]] = {PARTIAL: [], FULL: []}
    # Blocks of rows in row order: several (b, h) pairs with all their query tiles, or one pair's
    # query tiles a chunk at a time. b and h vary along the first axis, query tiles along the second
    # and key tiles along the third, so what depends on fewer of them is computed at that size.
    pairs = batches * heads
    per_pair = n_q * max(n_kv, 1)
    step_pairs = max(1, _CHUNK_TILES // max(per_pair, 1))
    step_m = n_q if per_pair <= _CHUNK_TILES else max(1, _CHUNK_TILES // max(n_kv, 1))
    for p0 in range(0, pairs, step_pairs):
        bh = torch.arange(p0, min(p0 + step_pairs, pairs), device=device).reshape(-1, 1, 1)
        points = {"b": bh // heads, "h": bh % heads}
        for m0 in range(0, n_q, step_m):
            m = torch.arange(m0, min(m0 + step_m, n_q), device=device)
            tiles = {"q_first": q_first[m].reshape(1, -1, 1), "q_last": q_last[m].reshape(1, -1, 1), **cols}
            classes = predicate_classes(pattern, env, points, tiles, (len(bh), len(m), n_kv))
            rows_here = len(bh) * len(m)
            for value in (PARTIAL, FULL):
                hit = (classes == value).nonzero()  # (pair, query tile, key tile), row by row
                row = hit[:, 0] * len(m) + hit[:, 1]
                counts[value].append(torch.bincount(row, minlength=rows_here))
                parts[value].append(hit[:, 2])
    forward, flat = {}, {}
    for value in (PARTIAL, FULL):
        row_counts = (
            torch.cat(counts[value]) if counts[value] else torch.zeros(0, dtype=torch.int64, device=device)
        )
        indices = (
            torch.cat(parts[value]) if parts[value] else torch.zeros(0, dtype=torch.int64, device=device)
        )
        forward[value] = (_offsets(row_counts, pattern.loc), indices)
        flat[value] = torch.repeat_interleave(torch.arange(n_rows, device=device), row_counts)
    (p_offsets, p_indices), (f_offsets, f_indices) = forward[PARTIAL], forward[FULL]
    kv_tiles = BlockSparse(
        batches, heads, n_q, n_kv, p_offsets, p_indices.to(torch.int32), f_offsets, f_indices.to(torch.int32)
    )
    # The transpose: row (bh, n) lists the query tiles m of every entry (bh, m) -> n, in ascending m.
    transposed = {}
    for value in (PARTIAL, FULL):
        rows, cols_ = flat[value], forward[value][1]
        key = rows // n_q * n_kv + cols_
        order = torch.sort(key, stable=True).indices
        row_counts = torch.bincount(key, minlength=batches * heads * n_kv)
        transposed[value] = (_offsets(row_counts, pattern.loc), (rows % n_q)[order].to(torch.int32))
    q_tiles = BlockSparse(
        batches, heads, n_kv, n_q,
        transposed[PARTIAL][0], transposed[PARTIAL][1], transposed[FULL][0], transposed[FULL][1],
    )  # fmt: skip
    return kv_tiles, q_tiles


OFFSET_LIMIT = (1 << 31) - 1
"""The most non-empty tiles of one class a metadata plan may hold: its offsets are int32."""


def _offsets(counts: torch.Tensor, loc: Loc | None = None) -> torch.Tensor:
    """CSR offsets of per-row counts, int32; an `InputError` where the total does not fit int32 (the
    offsets would wrap)."""
    zero = torch.zeros(1, dtype=torch.int64, device=counts.device)
    offsets = torch.cat([zero, torch.cumsum(counts, 0)])
    total = int(offsets[-1])
    if total > OFFSET_LIMIT:
        raise InputError(
            f"this launch has {total} non-empty tiles of one class, more than the {OFFSET_LIMIT} a "
            f"metadata plan indexes in int32: use larger blocks or fewer batch rows and heads per call",
            loc,
        )
    return offsets.to(torch.int32)


def make_plan(pattern: PatternIR, env: oracle.Env, block: tuple[int, int]) -> Plan:
    """The launch plan of a compiled pattern for these lengths and inputs (see the module docstring)."""
    sparsity = pattern.sparsity
    if sparsity is None:
        raise InternalError("the pattern was not compiled through block-sparsify")
    common = dict(q_len=env.q_len, kv_len=env.kv_len, batch=env.batch, num_heads=env.num_heads, block=block)
    if sparsity.analytic:
        if pattern.ranges is None:
            raise InternalError("an analytic pattern without ranges")
        return Plan(
            str(sparsity),
            **common,
            kv_ranges=pattern.ranges.kv,
            q_ranges=pattern.ranges.q,
            kv_tiles=None,
            q_tiles=None,
            pattern=pattern,
            env=env,
        )  # type: ignore[arg-type]
    oracle.check_sizes(pattern, env)
    batches = env.batch if "b" in sparsity.axes else 1
    heads = env.num_heads if "h" in sparsity.axes else 1
    kv_tiles, q_tiles = build_block_sparse(pattern, env, block, batches, heads)
    return Plan(
        str(sparsity),
        **common,
        kv_ranges=None,
        q_ranges=None,
        kv_tiles=kv_tiles,
        q_tiles=q_tiles,
        pattern=pattern,
        env=env,
    )  # type: ignore[arg-type]


def exact_block_map(
    bound: PatternIR, final: PatternIR, env: oracle.Env, block: tuple[int, int], batches: int, heads: int
) -> torch.Tensor:
    """Exact tile classes, int8 [batches, heads, query tiles, key tiles]: the tile predicates settle
    most tiles; the mask of the bound pattern (the oracle's) is evaluated on the positions of the
    tiles they leave PARTIAL, and only there."""
    oracle.check_sizes(bound, env)
    device = env.device
    n_q, n_kv = _cdiv(env.q_len, block[0]), _cdiv(env.kv_len, block[1])
    q_first, q_last = tile_bounds(n_q, block[0], env.q_len, device)
    kv_first, kv_last = tile_bounds(n_kv, block[1], env.kv_len, device)
    points = {
        "b": torch.arange(batches, device=device).reshape(-1, 1, 1, 1),
        "h": torch.arange(heads, device=device).reshape(1, -1, 1, 1),
    }
    tiles = {
        "q_first": q_first.reshape(1, 1, -1, 1),
        "q_last": q_last.reshape(1, 1, -1, 1),
        "kv_first": kv_first.reshape(1, 1, 1, -1),
        "kv_last": kv_last.reshape(1, 1, 1, -1),
    }
    classes = predicate_classes(final, env, points, tiles, (batches, heads, n_q, n_kv)).clone()
    unknown = (classes == PARTIAL).nonzero()
    if bound.mask is None or len(unknown) == 0:
        return classes
    bm, bn = block
    per_chunk = max(1, _CHUNK_POSITIONS // (bm * bn))
    q_off = torch.arange(bm, device=device).reshape(1, -1, 1)
    kv_off = torch.arange(bn, device=device).reshape(1, 1, -1)
    for start in range(0, len(unknown), per_chunk):
        t = unknown[start : start + per_chunk]
        b, h, m, n = (t[:, i].reshape(-1, 1, 1) for i in range(4))
        q = m * bm + q_off
        kv = n * bn + kv_off
        inside = (q < env.q_len) & (kv < env.kv_len)
        # The mask is evaluated inside the lengths only (where `value_ranges` bounds it): positions past
        # them, in the last tiles, repeat the last one and are discarded.
        q, kv = q.clamp(max=max(env.q_len - 1, 0)), kv.clamp(max=max(env.kv_len - 1, 0))
        local = tile_env(env, {"b": b, "h": h, "q": q, "kv": kv}, {})
        allowed = oracle.evaluate(bound.mask, bound, local).expand(inside.shape)
        anywhere = (allowed & inside).flatten(1).any(dim=1)
        everywhere = (allowed | ~inside).flatten(1).all(dim=1)
        value = torch.where(everywhere, FULL, torch.where(anywhere, PARTIAL, EMPTY)).to(torch.int8)
        classes[t[:, 0], t[:, 1], t[:, 2], t[:, 3]] = value
    return classes
