"""Range summaries of `input` tensors: exact bounds of an input over an index box without reading the box.

The tile analyses bound a load like `doc[b, q]` or `blocks[b, h, q // 64, kv // 64]` over a tile by
`range_min` / `range_max` of the input over the box of its indices. A `RangeTable` answers those queries
for one input along one axis (the other indices being single points) exactly, in O(1) per query, from
O(n) memory beyond the input (n its number of elements):

- windows shorter than `CHUNK` from a sparse table over elements with levels of 1, 2, 4 and 8 elements
  (two overlapping windows of one level cover any such box);
- longer windows from the bounds within a chunk of `CHUNK` elements from each end of the box (prefix
  and suffix bounds per chunk) and, between them, a sparse table over whole chunks
  (O(n / CHUNK * log(n / CHUNK))).

Tables keep the input's own dtype (bool as uint8): about 13 of its elements per input element for
both bounds. `box_bound` answers a box over several axes: a box of at most `DIRECT_READS` positions
is read position by position; otherwise the table runs along the box's widest axis and the narrower
ones are enumerated (a tile's box in a block map spans a few blocks per axis) while that stays within
`MAX_ENUMERATED` positions per query or O(input size) in all; beyond that it answers the bound of the
whole input, which is sound but loose. Positions outside the input read 0 (false), as loads do, so a
box reaching outside the input includes 0 in its bounds; an empty box (lo > hi along an axis) gives 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CHUNK = 16
# Element levels of the short-window table: windows of 1, 2, 4 and 8 elements cover any box shorter
# than CHUNK with two of them.
_SHORT_LEVELS = 4
# `box_bound` enumerates the positions of a box off its tabled axis (their widths multiplied) when
# there are at most MAX_ENUMERATED of them (a tile of 128 rows over a block map of 16-row blocks spans 8
# blocks), or when all queries together read at most ENUMERATED_PER_ELEMENT positions per element of the
# input (a table as fine as the positions: O(input size)).
MAX_ENUMERATED = 64
ENUMERATED_PER_ELEMENT = 4
# Boxes of at most this many positions are read position by position, without building a table (a tile
# over a block map of blocks as large as the tile, or half as large along one axis).
DIRECT_READS = 4
# While a CUDA graph captures (no host synchronisation may read the widths of the boxes), `box_bound`
# enumerates this many positions along each axis off the tabled one.
CAPTURED_STEPS = 4


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """The input as the tables store it: bools as uint8 (min / max need numbers), floats as int64
    (loads bounded by summaries are ints and bools), ints as they are."""
    if tensor.dtype is torch.bool:
        return tensor.to(torch.uint8)
    if tensor.is_floating_point() or tensor.is_complex():
        return tensor.to(torch.int64)
    return tensor


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) of positive int64 values, exactly (the float log2 is corrected by one step)."""
    level = torch.floor(torch.log2(x.to(torch.float64))).to(torch.int64).clamp(min=0)
    level = torch.where(torch.bitwise_left_shift(torch.ones_like(level), level) > x, level - 1, level)
    return torch.where(torch.bitwise_left_shift(torch.full_like(level, 2), level) <= x, level + 1, level)


def _sections(values: torch.Tensor, maximum: bool) -> torch.Tensor:
    """One bound's tables side by side, [rows + 1, 6 * padded + levels * chunks + 1] (see `RangeTable`),
    each written in place (no concatenation: the tables are the large part of a plan's memory)."""
    rows, padded = values.shape
    chunks = padded // CHUNK
    levels = chunks.bit_length()  # chunk windows of 1, 2, 4, ... <= chunks
    pick = torch.maximum if maximum else torch.minimum
    out = torch.zeros((rows + 1, 6 * padded + levels * chunks + 1), dtype=values.dtype, device=values.device)
    body = out[:rows, :-1]

    def double(at: int, previous: int, size: int, width: int) -> None:
        # Level k from level k - 1: the bound of [i, i + 2 * width) from [i, i + width) and
        # [i + width, i + 2 * width); near the end a window keeps level k - 1's (never queried there).
        below, here = body[:, previous : previous + size], body[:, at : at + size]
        here.copy_(below)
        pick(below[:, : size - width], below[:, width:], out=here[:, : size - width])

    body[:, :padded] = values
    for k in range(1, _SHORT_LEVELS):
        double(k * padded, (k - 1) * padded, padded, 1 << (k - 1))
    blocks = values.reshape(rows, chunks, CHUNK)
    scan = torch.cummax if maximum else torch.cummin
    body[:, 4 * padded : 5 * padded] = scan(blocks.flip(-1), dim=-1).values.flip(-1).reshape(rows, padded)
    body[:, 5 * padded : 6 * padded] = scan(blocks, dim=-1).values.reshape(rows, padded)
    base = 6 * padded
    body[:, base : base + chunks] = blocks.amax(dim=-1) if maximum else blocks.amin(dim=-1)
    for k in range(1, levels):
        double(base + k * chunks, base + (k - 1) * chunks, chunks, 1 << (k - 1))
    return out


@dataclass(frozen=True)
class RangeTable:
    """Exact range-minimum / -maximum tables of an input along `axis`. The axis is moved last and padded
    to whole chunks (`padded` positions) by repeating its last element, which changes no bound; `rows`
    runs over the other axes in row-major order. `mins` and `maxs` ([rows, columns], the input's dtype,
    bool as uint8) hold side by side, for one bound each:

        columns [k * padded, (k + 1) * padded), k < 4: the bound of positions [i, i + 2^k)
        [4 * padded, 5 * padded): the suffix of i's chunk, [i, end of the chunk]
        [5 * padded, 6 * padded): the prefix of i's chunk, [start of the chunk, i]
        6 * padded + [k * chunks, (k + 1) * chunks): the bound of chunks [c, c + 2^k)
    """

    axis: int
    extent: int
    shape: tuple[int, ...]  # the input's shape
    padded: int
    mins: torch.Tensor
    maxs: torch.Tensor

    @staticmethod
    def build(tensor: torch.Tensor, axis: int) -> RangeTable:
        values = _stored(tensor).movedim(axis, -1)
        extent = values.shape[-1]
        values = values.reshape(math.prod(values.shape[:-1]), extent)
        if extent == 0:
            values = torch.zeros((values.shape[0], 1), dtype=values.dtype, device=tensor.device)
        pad = -values.shape[-1] % CHUNK
        if pad:
            values = torch.cat([values, values[:, -1:].expand(values.shape[0], pad)], dim=-1)
        mins, maxs = _sections(values, False), _sections(values, True)
        return RangeTable(axis, extent, tuple(tensor.shape), values.shape[-1], mins, maxs)

    def _columns(
        self, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """For boxes [lo, hi] of `axis` (at the size of lo and hi, not of the other indices): four columns
        whose bounds together are the box's, whether the box lies (partly) inside the input, and
        whether it reaches outside."""
        padded, chunks, last = self.padded, self.padded // CHUNK, self.extent - 1
        inside = (hi >= 0) & (lo <= last) & (lo <= hi) & (self.extent > 0)
        reaches_out = (lo < 0) | (hi > last)
        first = lo.clamp(0, max(last, 0))
        final = torch.maximum(hi.clamp(0, max(last, 0)), first)
        width = final - first + 1
        one = torch.ones_like(width)
        # Short boxes: two overlapping windows of one level of the element table.
        level = _floor_log2(width).clamp(max=_SHORT_LEVELS - 1)
        short = (level * padded + first, level * padded + final - torch.bitwise_left_shift(one, level) + 1)
        # Long boxes: the rest of the first chunk, the start of the last, the whole chunks between.
        ends = (4 * padded + first, 5 * padded + final)
        c0, c1 = first // CHUNK + 1, final // CHUNK - 1
        between = c1 >= c0
        c_level = _floor_log2(torch.where(between, c1 - c0 + 1, one))
        base = 6 * padded + c_level * chunks
        middle = (base + c0, base + c1 - torch.bitwise_left_shift(one, c_level) + 1)
        middle = tuple(torch.where(between, m, e) for m, e in zip(middle, ends, strict=True))
        is_short = width < CHUNK
        columns = [torch.where(is_short, s, x) for s, x in zip(short * 2, ends + middle, strict=True)]
        return columns, inside, reaches_out

    def bound(
        self, points: Sequence[torch.Tensor | None], lo: torch.Tensor, hi: torch.Tensor, maximum: bool
    ) -> torch.Tensor:
        """The minimum (or with `maximum` the maximum), int64, over positions [lo, hi] (inclusive) of
        `axis`, the other indices at `points` (None at `axis`); a box reaching outside the input
        includes 0, an empty one gives 0. Broadcasts its arguments; the work at the size of all of them
        together is a few gathers."""
        columns, inside, reaches_out = self._columns(lo, hi)
        table = self.maxs if maximum else self.mins
        rows, sentinel = table.shape[0] - 1, table.shape[1] - 1  # the zero row and column
        # Everything that reads 0 is sent to a zero of the table, at the size of its own indices: a box
        # outside the input to the zero column, other indices outside it to the zero row.
        columns = [torch.where(inside, c, sentinel) for c in columns]
        row = torch.zeros((), dtype=torch.int64, device=lo.device)
        others = [(p, n) for i, (p, n) in enumerate(zip(points, self.shape, strict=True)) if i != self.axis]
        stride = rows
        for index, extent in others:
            stride //= max(extent, 1)
            row = row + torch.where((index >= 0) & (index < extent), index * stride, rows + 1)  # type: ignore[operator]
        start = row.clamp(max=rows) * table.shape[1]
        flat, pick = table.reshape(-1), torch.maximum if maximum else torch.minimum
        result = pick(pick(flat[start + columns[0]], flat[start + columns[1]]), flat[start + columns[2]])
        result = pick(result, flat[start + columns[3]])
        # A box reaching outside the input also reads 0.
        info = torch.iinfo(table.dtype)
        cap = torch.where(reaches_out, 0, info.min if maximum else info.max).to(table.dtype)
        return pick(result, cap).to(torch.int64)

    def query(
        self, points: Sequence[torch.Tensor | None], lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) over positions [lo, hi] of `axis`, as `bound`."""
        return self.bound(points, lo, hi, False), self.bound(points, lo, hi, True)


def whole_bounds(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of the whole input and 0 (a box may reach outside it): sound for any box."""
    values = _stored(tensor).to(torch.int64)
    zero = torch.zeros((), dtype=torch.int64, device=tensor.device)
    if values.numel() == 0:
        return zero, zero
    return torch.minimum(values.amin(), zero), torch.maximum(values.amax(), zero)


def box_bound(
    tensor: torch.Tensor,
    lows: Sequence[torch.Tensor],
    highs: Sequence[torch.Tensor],
    ranged: Sequence[int],
    table: Callable[[int], RangeTable],
    maximum: bool,
    synchronise: bool = True,
) -> torch.Tensor:
    """The minimum (or with `maximum` the maximum), int64, of `tensor` over the box [lows[i], highs[i]]
    of each axis i (broadcasting tensors), where only the axes in `ranged` may span more than one
    position (the others are read at `lows[i]`). `table(axis)` gives the (cached) `RangeTable` along
    an axis.

    A box along one axis is exact and never waits for the device. Over several axes it is exact where
    the positions enumerated off the tabled axis are few (`MAX_ENUMERATED`, or O(input size) in all),
    which one host synchronisation reads; without `synchronise` (while a CUDA graph captures) the axes
    off the one of largest extent are enumerated `CAPTURED_STEPS` positions each, and a box wider than
    that gets the whole input's bound, decided on the device."""
    if len(ranged) == 1:
        axis = ranged[0]
        points: list[torch.Tensor | None] = list(lows)
        points[axis] = None
        return table(axis).bound(points, lows[axis], highs[axis], maximum)
    shape = tensor.shape
    first, final, widths = {}, {}, {}
    for axis in ranged:
        # Positions from -1 to the extent: a box reaching outside the input reads one position
        # outside, which reads 0. An empty box reads position -1 alone.
        empty = lows[axis] > highs[axis]
        first[axis] = torch.where(empty, -1, lows[axis].clamp(-1, shape[axis]))
        final[axis] = torch.where(empty, -1, highs[axis].clamp(-1, shape[axis]))
    if not synchronise:
        return _captured_bound(tensor, lows, highs, ranged, table, maximum, first, final)
    for axis in ranged:
        widths[axis] = int((final[axis] - first[axis] + 1).max()) if first[axis].numel() else 1
    pick = torch.maximum if maximum else torch.minimum
    result: torch.Tensor | None = None
    if math.prod(widths.values()) <= DIRECT_READS:  # a box of a few positions: read them, no table
        values = torch.cat(
            [_stored(tensor).reshape(-1), torch.zeros(1, dtype=_stored(tensor).dtype, device=tensor.device)]
        )
        for steps in itertools.product(*(range(widths[a]) for a in ranged)):
            index = list(lows)
            for axis, step in zip(ranged, steps, strict=True):
                index[axis] = torch.minimum(first[axis] + step, final[axis])
            here = _read(values, shape, index)
            result = here if result is None else pick(result, here)
        assert result is not None
        return result.to(torch.int64)
    along = max(ranged, key=lambda a: widths[a])
    enumerated = [a for a in ranged if a != along]
    positions = math.prod(widths[a] for a in enumerated)
    queries = math.prod(torch.broadcast_shapes(*(x.shape for x in (*lows, *highs))))
    if positions > MAX_ENUMERATED and positions * queries > ENUMERATED_PER_ELEMENT * tensor.numel():
        return whole_bounds(tensor)[1 if maximum else 0]
    for steps in itertools.product(*(range(widths[a]) for a in enumerated)):
        points: list[torch.Tensor | None] = list(lows)
        points[along] = None
        for axis, step in zip(enumerated, steps, strict=True):
            points[axis] = torch.minimum(first[axis] + step, final[axis])
        here = table(along).bound(points, lows[along], highs[along], maximum)
        result = here if result is None else pick(result, here)
    assert result is not None
    return result


def _captured_bound(
    tensor: torch.Tensor,
    lows: Sequence[torch.Tensor],
    highs: Sequence[torch.Tensor],
    ranged: Sequence[int],
    table: Callable[[int], RangeTable],
    maximum: bool,
    first: dict[int, torch.Tensor],
    final: dict[int, torch.Tensor],
) -> torch.Tensor:
    """`box_bound` without a host synchronisation: a fixed number of enumerated positions."""
    along = max(ranged, key=lambda a: tensor.shape[a])
    enumerated = [a for a in ranged if a != along]
    pick = torch.maximum if maximum else torch.minimum
    result: torch.Tensor | None = None
    for steps in itertools.product(range(CAPTURED_STEPS), repeat=len(enumerated)):
        points: list[torch.Tensor | None] = list(lows)
        points[along] = None
        for axis, step in zip(enumerated, steps, strict=True):
            points[axis] = torch.minimum(first[axis] + step, final[axis])
        here = table(along).bound(points, lows[along], highs[along], maximum)
        result = here if result is None else pick(result, here)
    assert result is not None
    too_wide = torch.zeros((), dtype=torch.bool, device=result.device)
    for axis in enumerated:
        too_wide = too_wide | (final[axis] - first[axis] >= CAPTURED_STEPS)
    return torch.where(too_wide, whole_bounds(tensor)[1 if maximum else 0], result)


def _read(values: torch.Tensor, shape: Sequence[int], index: Sequence[torch.Tensor]) -> torch.Tensor:
    """The input at broadcasting indices, in its stored dtype; `values` is the input flattened with a 0
    appended, read for every position outside the input (no mask at the size of all indices)."""
    outside = values.numel() - 1
    strides = [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]
    flat = torch.zeros((), dtype=torch.int64, device=values.device)
    for i, extent, stride in zip(index, shape, strides, strict=True):  # leading (point) axes first
        # An index outside its axis adds more than the whole input: the sum lands past `outside`.
        flat = flat + torch.where((i >= 0) & (i < extent), i * stride, outside + 1)
    return values[flat.clamp(max=outside)]


def box_bounds(
    tensor: torch.Tensor,
    lows: Sequence[torch.Tensor],
    highs: Sequence[torch.Tensor],
    ranged: Sequence[int],
    table: Callable[[int], RangeTable],
    synchronise: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of `tensor` over the box, as `box_bound`."""
    return (
        box_bound(tensor, lows, highs, ranged, table, False, synchronise),
        box_bound(tensor, lows, highs, ranged, table, True, synchronise),
    )
