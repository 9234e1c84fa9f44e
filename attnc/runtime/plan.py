"""Launch plans: which key tiles each query tile visits, and which of them are FULL.

A `Plan` is what a kernel launch consumes (`Kernel.plan`). Tiles are `block = (BLOCK_M, BLOCK_N)`
rows; query tile `m` covers rows `[m * BLOCK_M, min((m + 1) * BLOCK_M, q_len))` of q and key tile `n`
rows `[n * BLOCK_N, min((n + 1) * BLOCK_N, kv_len))` of k/v. Under offsets (`kern(q, k, v,
q_offset=...)`) a row's position in the pattern is its offset plus its index (`oracle.Env`): the
classes are those of the positions the rows hold, so a per-row `q_offset` tensor gives a plan per
batch row. Tile classes: 0 EMPTY (no allowed pair),
1 PARTIAL (the kernel evaluates the mask), 2 FULL (every pair inside the lengths allowed; the kernel
skips the mask). A plan may call a tile PARTIAL that is EMPTY or FULL, never the reverse.

Plan = kernel: the kernels visit exactly the plan's PARTIAL and FULL tiles, each once, and skip the
mask on exactly the FULL ones, but for a FULL tile cut by a length (bounds-checked, so masked: the
last key tile, and in the dK/dV kernel the last query tile too). `runtime/launch.py`'s
`counting_visits` makes the kernels count their visits, for the tests that check it.

Two kinds, chosen by the `block-sparsify` pass:

- **analytic** (`plan.kv_ranges`, `plan.q_ranges`; `plan.tensors()` is empty): per conjunct `j`, four
  int expressions of the tile bounds (`derive-ranges`): a hull `[lo, hi]` and a core `[full_lo,
  full_hi]` of element positions. A kernel computes them for its own tile and turns them into tile
  indices with `tile_span`: it visits the key tiles that meet some hull, and skips the mask on those
  inside the union of the cores (each core cut to its hull and widened to its component of the union:
  `merge_cores`, for up to `codegen.spec.CORE_MERGE_LIMIT`
  conjuncts). No metadata at all, and any block size works.
- **metadata** (`plan.kv_tiles`, `plan.q_tiles`): `BlockSparse` fixed-capacity rows (FlexAttention's
  `BlockMask` layout), built here from the `classify-tiles` predicates in O(number of tiles), on the
  inputs' device without a host synchronisation, per batch row / head only where the pattern depends
  on them.

Plans are reused: `Plan.check_call` says whether a plan serves a call, `Plan.at_block` gives it for
another tile size, and `runtime/launch.py`'s `PlanCache` shares one among the launches of the same
lengths and inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch

from attnc import oracle
from attnc.analysis.normal_form import split_comparison
from attnc.analysis.summaries import TileSpan
from attnc.analysis.value_ranges import ValueRanges
from attnc.codegen.spec import core_merge_rounds
from attnc.errors import InputError, InternalError, Loc
from attnc.ir.nodes import Node, PatternIR
from attnc.ir.results import AxisRange
from attnc.ir.rewrite import rewrite

# Tiles evaluated at once while building metadata: bounds the temporary memory (a few int64 tensors
# of this many elements), never the result.
_CHUNK_TILES = 1 << 21
# Tiles compacted at once into metadata rows (`_compact`): its int64 temporaries stay in the caches.
_COMPACT_TILES = 1 << 18
# Positions evaluated at once while refining PARTIAL tiles in `exact_block_map`.
_CHUNK_POSITIONS = 1 << 22

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class BlockSparse:
    """Non-empty tiles of each row of tiles, PARTIAL and FULL apart, in fixed-capacity rows: the layout
    of FlexAttention's `BlockMask` (`kv_num_blocks`, `kv_indices`, `full_kv_num_blocks`, ...).

    Rows are the tiles along one axis (query tiles for `kv_tiles`, key tiles for `q_tiles`) of each
    (batch row, head); `batches` and `heads` are 1 when the pattern does not depend on `b` / `h` (use
    b = 0 / h = 0 then). Row `[b, h, i]` has `partial_counts[b, h, i]` PARTIAL tiles, the first entries
    of `partial_indices[b, h, i]`, ascending (the entries after them are unspecified and never read);
    FULL ones likewise. Every size depends on the lengths and the block only, never on the inputs'
    values: a plan is built on the device without a host synchronisation (`build_block_sparse`).

    partial_counts, full_counts:   int32 [batches, heads, rows]
    partial_indices, full_indices: int32 [batches, heads, rows, cols], tile indices along the other axis
    """

    batches: int
    heads: int
    rows: int
    cols: int
    partial_counts: torch.Tensor
    partial_indices: torch.Tensor
    full_counts: torch.Tensor
    full_indices: torch.Tensor

    def classes(self) -> torch.Tensor:
        """The tile classes, int8 [batches, heads, rows, cols] (dense over tiles: for tests and show)."""
        shape = (self.batches, self.heads, self.rows, self.cols)
        device = self.partial_indices.device
        # Column `cols` takes the entries past each row's count, and is dropped.
        out = torch.zeros((*shape[:3], self.cols + 1), dtype=torch.int8, device=device)
        slot = torch.arange(self.cols, device=device)
        for counts, indices, value in (
            (self.partial_counts, self.partial_indices, PARTIAL),
            (self.full_counts, self.full_indices, FULL),
        ):
            used = slot < counts.unsqueeze(-1)
            out.scatter_(-1, torch.where(used, indices.long(), self.cols), value)
        return out[..., : self.cols]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}_partial_counts": self.partial_counts,
            f"{prefix}_partial_indices": self.partial_indices,
            f"{prefix}_full_counts": self.full_counts,
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
    # The inputs' version counters when the plan was made, by name (None: an inference tensor, which
    # has none); and the plans of this one for other blocks (`at_block`), made once each.
    versions: tuple[tuple[str, int | None], ...] = ()
    derived: dict[tuple[int, int], Plan] = field(default_factory=dict, compare=False, repr=False)
    q_offset_version: int | None = None  # a per-row q_offset tensor's version counter
    # The pattern's identity as an int: torch.compile guards an int attribute it reads, but not the
    # identity of an object compared with `is`, so a graph traced with one plan would take any other.
    pattern_id: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern_id", id(self.pattern))

    @property
    def analytic(self) -> bool:
        return self.kv_ranges is not None

    def at_block(self, block: tuple[int, int]) -> Plan:
        """This plan for another tile size: itself for analytic plans (they serve any block) and for
        its own block; else metadata built once for `block` and kept on this plan (a backward that
        runs with other tiles than its forward builds it once, for every layer sharing the plan)."""
        if self.analytic or tuple(block) == self.block:
            return self
        plan = self.derived.get(block)
        if plan is None:
            plan = self.derived[block] = make_plan(self.pattern, self.env, block)
        return plan

    def check_call(self, pattern: PatternIR, env: oracle.Env, compiling: bool = False) -> None:
        """An `InputError` unless this plan serves a call of `pattern` with `env` (`kern(q, k, v,
        plan=plan)`). Checked, cheaply: the pattern, the lengths, the batch size and head count where
        the plan depends on them, the runtime parameters' values, the device, and each input's identity
        (the very tensor the plan was made from) and version counter (not modified in place since).
        Not checked: inputs' values changed without their version counter (through `.data`, or in an
        inference tensor, which has none); and under `torch.compile` (`compiling`: tensors are traced
        there) anything but the pattern, the lengths, batch size, head count and parameter values
        (host data, each read as an attribute torch.compile guards: a graph traced with one plan is
        traced again, and checked, for another) other than those given as tensors (graph inputs, their
        values unknown while tracing; the op plans for the values it gets: `Kernel._use_plan`)."""
        loc = pattern.loc

        def refuse(reason: str) -> InputError:
            return InputError(
                f"this plan was made for {reason}: make one with kern.plan(...) for this call", loc
            )

        if self.pattern_id != id(pattern) and self.pattern != pattern:
            raise refuse("another pattern (or other static parameters)")
        if (self.q_len, self.kv_len) != (env.q_len, env.kv_len):
            raise refuse(
                f"q_len={self.q_len}, kv_len={self.kv_len}, but this call has q_len={env.q_len}, "
                f"kv_len={env.kv_len}"
            )
        mine_offset, their_offset = self.env.q_offset, env.q_offset
        if isinstance(mine_offset, torch.Tensor) or isinstance(their_offset, torch.Tensor):
            if compiling:
                if isinstance(mine_offset, torch.Tensor) != isinstance(their_offset, torch.Tensor):
                    raise refuse("another kind of q_offset (an int or a tensor)")
            elif mine_offset is not their_offset:
                raise refuse("another q_offset (a plan is tied to its q_offset tensor's identity)")
            elif self.q_offset_version is not None and _version(their_offset) != self.q_offset_version:
                raise refuse("q_offset as it was before an in-place change (its version counter moved)")
        elif mine_offset != their_offset:
            raise refuse(f"q_offset={mine_offset}, but this call has q_offset={their_offset}")
        geometry = (self.env.kv_offset, self.env.q_size, self.env.kv_size)
        if geometry != (env.kv_offset, env.q_size, env.kv_size):
            raise refuse(
                f"(kv_offset, q_size, kv_size)={geometry}, but this call has "
                f"{(env.kv_offset, env.q_size, env.kv_size)}"
            )
        axes = self._axes()
        for axis, what, mine, theirs in (
            ("b", "batch", self.batch, env.batch),
            ("h", "num_heads", self.num_heads, env.num_heads),
        ):
            if axis in axes and mine != theirs:
                raise refuse(f"{what}={mine}, but this call has {what}={theirs}")
        for name, value in env.params.items():
            if compiling and isinstance(value, torch.Tensor):
                continue  # a float given as a tensor: a graph input, whose value the trace does not know
            if self.env.params.get(name) != value:
                raise refuse(f"{name}={self.env.params.get(name)!r}, but this call has {name}={value!r}")
        if compiling:
            return
        if not self.analytic and self.env.device != env.device:
            raise refuse(f"tensors on {self.env.device}, but this call's are on {env.device}")
        versions = dict(self.versions)
        for name, tensor in env.inputs.items():
            if self.env.inputs.get(name) is not tensor:
                raise refuse(f"another tensor as input '{name}' (a plan is tied to its inputs' identity)")
            if versions.get(name) is not None and _version(tensor) != versions[name]:
                raise refuse(
                    f"input '{name}' as it was before an in-place change (its version counter moved)"
                )

    def mask_mod(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The pattern's mask as a FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool tensor`, with
        this plan's inputs and runtime parameter values (evaluated by the oracle; traceable by
        FlexAttention's `vmap` and `torch.compile`)."""
        pattern, env = self.pattern, self.env
        mask = pattern.mask

        def mask_mod(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            if mask is None:
                return q_idx >= 0
            # FlexAttention's indices count rows: the pattern sees positions.
            positions = {"q": q_idx + q_shift(env, b), "kv": kv_idx + env.kv_offset}
            local = tile_env(env, {"b": b, "h": h, **positions}, {})
            return oracle.evaluate(mask, pattern, local)

        return mask_mod

    def to_block_mask(self, mask_mod: Callable | None = None) -> Any:
        """This plan as a FlexAttention `BlockMask` (`torch.nn.attention.flex_attention`) with the same
        PARTIAL and FULL tiles (a FULL tile reaching past a length is FULL there too: FlexAttention
        bounds-checks it), BLOCK_SIZE = `block`, for users who mix attnc and FlexAttention. Metadata
        plans export their tensors as they are (the layouts are the same); analytic plans materialise
        theirs from the closed-form ranges in O(tiles). `mask_mod` defaults to the pattern's mask
        (`mask_mod()`); a pattern's score function is not part of a block mask (give FlexAttention
        a `score_mod` for it)."""
        from torch.nn.attention.flex_attention import BlockMask  # only for those who ask for one

        tiles = self.kv_tiles if self.kv_tiles is not None else _compact(self.block_map())
        return BlockMask.from_kv_blocks(
            tiles.partial_counts,
            tiles.partial_indices,
            tiles.full_counts,
            tiles.full_indices,
            BLOCK_SIZE=self.block,
            mask_mod=self.mask_mod() if mask_mod is None else mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )

    def _axes(self) -> set[str]:
        """The index variables `b`, `h` the plan depends on."""
        if self.kv_ranges is not None and self.q_ranges is not None:
            roots = [x for r in self.kv_ranges + self.q_ranges for x in (r.lo, r.hi, r.full_lo, r.full_hi)]
            return {a for a in ("b", "h") if uses(roots, a)}
        sparsity = self.pattern.sparsity
        axes = set(sparsity.axes) if sparsity is not None else {"b", "h"}
        return axes | {"b"} if per_row_plan(self.env) else axes

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


def uses(nodes: list[Node], name: str) -> bool:
    """Whether any of the expressions uses the index variable `name`."""
    return any(name in root.free for root in nodes)


def tile_bounds(
    count: int, block: int, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position (inclusive) of each of `count` tiles, int64 [count]."""
    first = torch.arange(count, device=device, dtype=torch.int64) * block
    return first, torch.clamp(first + block, max=length) - 1


def tile_env(
    base: oracle.Env,
    points: dict[str, torch.Tensor],
    tiles: dict[str, torch.Tensor],
    spans: Mapping[str, TileSpan] | None = None,
) -> oracle.Env:
    """`base` with index variables and tile bounds bound to the given (broadcasting) position tensors;
    `spans` bounds the tile boxes statically (`summaries.TileSpan`, by axis), so that range summaries
    over several axes need not read the boxes' widths."""
    return replace(base.with_tiles(points, tiles), tile_spans=dict(spans or {}))


def tile_spans(env: oracle.Env, block: tuple[int, int]) -> dict[str, TileSpan]:
    """The static extents of the tiles of `block` (`TileSpan`): a tile spans at most its block, and
    starts at a multiple of it plus the axis's offset (unknown on the host for a per-row offset)."""
    q_shift = env.q_offset if isinstance(env.q_offset, int) else None
    return {
        "q": TileSpan(block[0] - 1, block[0] if q_shift is not None else 1, (q_shift or 0) % block[0]),
        "kv": TileSpan(block[1] - 1, block[1], env.kv_offset % block[1]),
    }


def q_shift(env: oracle.Env, b: torch.Tensor | None = None) -> int | torch.Tensor:
    """The position of query row 0: `env.q_offset`, or for per-row offsets the offsets of the batch
    rows `b` (a broadcasting index tensor; None: all rows, [B, 1, 1, 1])."""
    shift = env.q_shift()
    if isinstance(shift, torch.Tensor) and b is not None:
        return shift.reshape(-1)[b]
    return shift


def per_row_plan(env: oracle.Env) -> bool:
    """Whether the plan has a batch axis whatever the pattern reads: q_offset is a tensor (one per batch
    row), or the valid rows differ per batch row (decoding, packed sequences)."""
    return isinstance(env.q_offset, torch.Tensor) or env.kv_rows is not None or env.q_rows is not None


def cut_to_rows(
    classes: torch.Tensor, env: oracle.Env, block_n: int, block_m: int | None = None
) -> torch.Tensor:
    """Classes [B, H', query tiles, key tiles] with each batch row's key tiles past its valid key rows
    (`env.kv_rows`: decoding, packed sequences) EMPTY and the one they cut PARTIAL at most (the kernel
    checks its rows); with `block_m`, query tiles past `env.q_rows` EMPTY too (packed sequences)."""
    if env.kv_rows is not None:
        rows = env.kv_rows.to(device=classes.device, dtype=torch.int64).reshape(-1, 1, 1, 1)
        first = torch.arange(classes.shape[-1], device=classes.device, dtype=torch.int64) * block_n
        beyond = first.reshape(1, 1, 1, -1) >= rows
        cut = (first + block_n).reshape(1, 1, 1, -1) > rows
        capped = torch.where(cut & (classes == FULL), torch.full_like(classes, PARTIAL), classes)
        classes = torch.where(beyond, torch.full_like(classes, EMPTY), capped)
    if env.q_rows is not None and block_m is not None:
        rows = env.q_rows.to(device=classes.device, dtype=torch.int64).reshape(-1, 1, 1, 1)
        first = torch.arange(classes.shape[-2], device=classes.device, dtype=torch.int64) * block_m
        classes = torch.where(first.reshape(1, 1, -1, 1) >= rows, torch.full_like(classes, EMPTY), classes)
    return classes


def _ranges_map(ranges: tuple[AxisRange, ...], plan: Plan, rows: str, cols: str) -> torch.Tensor:
    """Classes of the tiles from closed-form ranges: [B', H', row tiles, col tiles]."""
    oracle.check_sizes(plan.pattern, plan.env)  # an analytic plan is made for any lengths, used for fewer
    lengths = {"q": plan.q_len, "kv": plan.kv_len}
    blocks = {"q": plan.block[0], "kv": plan.block[1]}
    device = plan.env.device
    n_rows, n_cols = _cdiv(lengths[rows], blocks[rows]), _cdiv(lengths[cols], blocks[cols])
    roots = [x for r in ranges for x in (r.lo, r.hi, r.full_lo, r.full_hi)]
    batches = plan.batch if uses(roots, "b") or per_row_plan(plan.env) else 1
    heads = plan.num_heads if uses(roots, "h") else 1
    first, last = tile_bounds(n_rows, blocks[rows], lengths[rows], device)
    b = torch.arange(batches, device=device).reshape(-1, 1, 1, 1)
    points = {"b": b, "h": torch.arange(heads, device=device).reshape(1, -1, 1, 1)}
    # Ranges are positions; tiles count rows. Row 0 of each axis is at its shift.
    shifts = {"q": q_shift(plan.env, b), "kv": plan.env.kv_offset}
    env = tile_env(
        plan.env,
        points,
        {
            f"{rows}_first": first.reshape(1, 1, -1, 1) + shifts[rows],
            f"{rows}_last": last.reshape(1, 1, -1, 1) + shifts[rows],
        },
    )
    shape = (batches, heads, n_rows, 1)
    col = torch.arange(n_cols, device=device).reshape(1, 1, 1, n_cols)
    spans = []
    for r in ranges:
        lo, hi, full_lo, full_hi = (
            oracle.evaluate(x, plan.pattern, env).expand(shape) for x in (r.lo, r.hi, r.full_lo, r.full_hi)
        )
        shift = shifts[cols]
        core_lo, core_hi = torch.maximum(full_lo, lo) - shift, torch.minimum(full_hi, hi) - shift
        spans.append((lo - shift, hi - shift, core_lo, core_hi))
    cores = merge_cores([(c_lo, c_hi) for _, _, c_lo, c_hi in spans])
    classes = torch.zeros((batches, heads, n_rows, n_cols), dtype=torch.int8, device=device)
    for (lo, hi, _, _), (core_lo, core_hi) in zip(spans, cores, strict=True):
        t_first, t_last, f_first, f_last = tile_span(lo, hi, core_lo, core_hi, blocks[cols], lengths[cols])
        visited = (col >= t_first) & (col <= t_last)
        full = (col >= f_first) & (col <= f_last)
        here = torch.where(full, FULL, torch.where(visited, PARTIAL, EMPTY)).to(torch.int8)
        classes = torch.maximum(classes, here)
    if cols == "kv":
        classes = cut_to_rows(classes, plan.env, blocks["kv"], blocks["q"])
    elif plan.env.kv_rows is not None or plan.env.q_rows is not None:
        raise InternalError("the transposed plan of a decoding call (decoding has no backward pass)")
    return classes


def merge_cores(cores: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each conjunct's core `[lo, hi]` (positions, empty when lo > hi) widened to the component of the
    union of all cores it lies in (cores that overlap or touch merge), by `core_merge_rounds` rounds
    of pairwise merging: the kernels' `analytic_loops` do the same, in the same order. A tile inside
    the union of the cores lies inside one component: FULL by the union of the cores, not only by one."""
    lo, hi = [c[0] for c in cores], [c[1] for c in cores]
    n = len(cores)
    for _ in range(core_merge_rounds(n)):
        for j in range(n):
            for i in range(n):
                if i == j:
                    continue
                touch = (lo[i] <= hi[i]) & (lo[j] <= hi[j]) & (lo[i] <= hi[j] + 1) & (lo[j] <= hi[i] + 1)
                lo[j] = torch.where(touch, torch.minimum(lo[j], lo[i]), lo[j])
                hi[j] = torch.where(touch, torch.maximum(hi[j], hi[i]), hi[j])
    return list(zip(lo, hi, strict=True))


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
    spans: Mapping[str, TileSpan] | None = None,
) -> torch.Tensor:
    """Tile classes by the `classify-tiles` predicates, int8 of `shape`, for tiles given as broadcasting
    tensors of their bounds (and of `b`, `h`); `spans` as for `tile_env`."""
    if pattern.tiles is None:
        raise InternalError("the pattern was not compiled through classify-tiles")
    local = tile_env(env, points, tiles, spans)
    may = oracle.evaluate(separate_axes(pattern.tiles.any, pattern), pattern, local)
    must = oracle.evaluate(separate_axes(pattern.tiles.all, pattern), pattern, local)
    # EMPTY + [may or must] + [must]: 0, 1 or 2, in int8 all along (the grid is the large part).
    classes = (may | must).to(torch.int8) + must.to(torch.int8)
    return classes.expand(shape)


def build_block_sparse(
    pattern: PatternIR, env: oracle.Env, block: tuple[int, int], batches: int, heads: int
) -> tuple[BlockSparse, BlockSparse]:
    """Metadata for both directions from the tile predicates, one chunk of query-tile rows at a time:
    O(number of tiles) time, temporary memory bounded by `_CHUNK_TILES`, result O(number of tiles).
    Only tensor operations whose result sizes follow from the lengths run (no `nonzero`, no `.item()`,
    no loop over tensor values): on a GPU the build never waits for it, and a CUDA graph can capture it."""
    device = env.device
    n_q, n_kv = _cdiv(env.q_len, block[0]), _cdiv(env.kv_len, block[1])
    _check_entries(batches, heads, n_q, n_kv, pattern.loc)
    q_first, q_last = tile_bounds(n_q, block[0], env.q_len, device)
    kv_first, kv_last = tile_bounds(n_kv, block[1], env.kv_len, device)
    kv_first, kv_last = kv_first + env.kv_offset, kv_last + env.kv_offset  # positions
    cols = {"kv_first": kv_first.reshape(1, 1, -1), "kv_last": kv_last.reshape(1, 1, -1)}
    pairs = batches * heads
    spans = tile_spans(env, block)
    classes = torch.empty((pairs, n_q, n_kv), dtype=torch.int8, device=device)
    # Blocks of rows in row order: several (b, h) pairs with all their query tiles, or one pair's
    # query tiles a chunk at a time. b and h vary along the first axis, query tiles along the second
    # and key tiles along the third, so what depends on fewer of them is computed at that size.
    per_pair = n_q * max(n_kv, 1)
    step_pairs = max(1, _CHUNK_TILES // max(per_pair, 1))
    step_m = n_q if per_pair <= _CHUNK_TILES else max(1, _CHUNK_TILES // max(n_kv, 1))
    for p0 in range(0, pairs, step_pairs):
        bh = torch.arange(p0, min(p0 + step_pairs, pairs), device=device).reshape(-1, 1, 1)
        points = {"b": bh // heads, "h": bh % heads}
        shift = q_shift(env, points["b"])
        for m0 in range(0, n_q, step_m):
            m = torch.arange(m0, min(m0 + step_m, n_q), device=device)
            tiles = {
                "q_first": q_first[m].reshape(1, -1, 1) + shift,
                "q_last": q_last[m].reshape(1, -1, 1) + shift,
                **cols,
            }
            classes[p0 : p0 + len(bh), m0 : m0 + len(m)] = predicate_classes(
                pattern, env, points, tiles, (len(bh), len(m), n_kv), spans
            )
    classes = cut_to_rows(classes.reshape(batches, heads, n_q, n_kv), env, block[1], block[0])
    return _compact(classes), _compact(classes.transpose(-1, -2))


def _compact(classes: torch.Tensor) -> BlockSparse:
    """The fixed-capacity rows of int8 tile classes [batches, heads, rows, cols] (any strides: the
    transpose is taken a chunk of rows at a time): per row, the count of each class and its tile
    indices, ascending, first. Each hit's slot is the running count of hits before it (a cumulative
    sum); the other tiles all write the row's last slot, which holds a hit only in a row of hits
    alone. O(tiles), `_COMPACT_TILES` at a time, no buffer filled but the result."""
    batches, heads, rows, cols = classes.shape
    device = classes.device
    total = batches * heads * rows
    # Rows in groups that are views: all of them, or of a transpose each (batch row, head)'s.
    groups = [classes.reshape(total, cols)] if classes.is_contiguous() else list(classes.flatten(0, 1))
    counts = torch.zeros((2, total), dtype=torch.int32, device=device)
    indices = torch.empty((2, total, cols), dtype=torch.int32, device=device)
    column = torch.arange(cols, dtype=torch.int32, device=device).reshape(1, -1)
    step = max(1, _COMPACT_TILES // max(cols, 1))
    start = 0
    for group in groups if cols else []:
        for r0 in range(0, len(group), step):
            chunk = group[r0 : r0 + step].contiguous()
            rows_here = slice(start + r0, start + r0 + len(chunk))
            for k, value in enumerate((PARTIAL, FULL)):
                hit = chunk == value
                slot = torch.cumsum(hit, 1)
                counts[k, rows_here] = slot[:, -1]
                slot.sub_(1).masked_fill_(hit.logical_not_(), cols - 1)
                indices[k, rows_here].scatter_(1, slot, column.expand(len(chunk), cols))
        start += len(group)
    shape = (batches, heads, rows)
    return BlockSparse(
        batches,
        heads,
        rows,
        cols,
        counts[0].reshape(shape),
        indices[0].reshape(*shape, cols),
        counts[1].reshape(shape),
        indices[1].reshape(*shape, cols),
    )


OFFSET_LIMIT = (1 << 31) - 1
"""The most tile entries one list of a metadata plan may hold (batches * heads * rows * cols): the
kernels address them in int64, but a larger plan is a mistake (gigabytes of metadata), refused early."""


def _check_entries(batches: int, heads: int, rows: int, cols: int, loc: Loc | None = None) -> None:
    """An `InputError` for a metadata plan too large to index in int32 (from the sizes alone)."""
    total = batches * heads * rows * cols
    if total > OFFSET_LIMIT:
        raise InputError(
            f"this launch's metadata plan has {total} tiles ({batches} x {heads} x {rows} x {cols}), more "
            f"than the {OFFSET_LIMIT} it indexes in int32: use larger blocks or fewer batch rows and heads "
            f"per call",
            loc,
        )


_BUILDS = 0


def metadata_builds() -> int:
    """How many metadata plans this process has built (`make_plan`, `Plan.at_block`): what reusing
    plans saves (`benchmarks/plan_reuse.py` counts it over a model's layers)."""
    return _BUILDS


def _version(tensor: torch.Tensor) -> int | None:
    """A tensor's version counter (bumped by every in-place change), None for an inference tensor."""
    return None if tensor.is_inference() else tensor._version


def _versions(env: oracle.Env) -> tuple[tuple[str, int | None], ...]:
    return tuple((name, _version(t)) for name, t in env.inputs.items())


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
            versions=_versions(env),
        )  # type: ignore[arg-type]
    oracle.check_sizes(pattern, env)
    batches = env.batch if "b" in sparsity.axes or per_row_plan(env) else 1
    heads = env.num_heads if "h" in sparsity.axes else 1
    kv_tiles, q_tiles = build_block_sparse(pattern, env, block, batches, heads)
    global _BUILDS
    _BUILDS += 1
    return Plan(
        str(sparsity),
        **common,
        kv_ranges=None,
        q_ranges=None,
        kv_tiles=kv_tiles,
        q_tiles=q_tiles,
        pattern=pattern,
        env=env,
        versions=_versions(env),
        q_offset_version=_version(env.q_offset) if isinstance(env.q_offset, torch.Tensor) else None,
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
    shift = q_shift(env, points["b"])
    tiles = {  # positions
        "q_first": q_first.reshape(1, 1, -1, 1) + shift,
        "q_last": q_last.reshape(1, 1, -1, 1) + shift,
        "kv_first": kv_first.reshape(1, 1, 1, -1) + env.kv_offset,
        "kv_last": kv_last.reshape(1, 1, 1, -1) + env.kv_offset,
    }
    shape = (batches, heads, n_q, n_kv)
    classes = predicate_classes(final, env, points, tiles, shape, tile_spans(env, block))
    classes = cut_to_rows(classes, env, block[1], block[0]).clone()
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
        kv_end = env.kv_len if env.kv_rows is None else env.kv_rows.to(device).reshape(-1)[b]
        q_end = env.q_len if env.q_rows is None else env.q_rows.to(device).reshape(-1)[b]
        inside = (q < q_end) & (kv < kv_end)
        # The mask is evaluated inside the lengths only (where `value_ranges` bounds it): positions past
        # them, in the last tiles, repeat the last one and are discarded.
        q, kv = q.clamp(max=max(env.q_len - 1, 0)), kv.clamp(max=max(env.kv_len - 1, 0))
        q, kv = q + q_shift(env, b), kv + env.kv_offset  # rows to positions
        local = tile_env(env, {"b": b, "h": h, "q": q, "kv": kv}, {})
        allowed = oracle.evaluate(bound.mask, bound, local).expand(inside.shape)
        anywhere = (allowed & inside).flatten(1).any(dim=1)
        everywhere = (allowed | ~inside).flatten(1).all(dim=1)
        value = torch.where(everywhere, FULL, torch.where(anywhere, PARTIAL, EMPTY)).to(torch.int8)
        classes[t[:, 0], t[:, 1], t[:, 2], t[:, 3]] = value
    return classes
