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

How many positions a box spans along each axis follows from the tile size and the index expressions
(`static_width`: `q // 64` over 128-row tiles starting at multiples of 128 spans 2 blocks), so it is
known on the host without reading a tensor: no host synchronisation, also while a CUDA graph captures.
Only an index whose width has no static bound (a load inside an index, `abs` of a difference) is
measured on the device (one synchronisation), or under capture bounded by a fixed enumeration.

`RangeTable.of` keeps the tables of the last few inputs while they live with the same version
counter, so that plans that differ only in their other arguments (decoding steps) summarise an input
once. A write that does not move the counter (through `.data`, NumPy, a kernel writing in place) is not
seen, so only the launches' own plans use it (`oracle.Env.reuse_tables`, set by `launch.PlanCache`,
which keys its plans by the same counter); `kern.plan` and `kern.block_map` build the tables anew.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from attnc.ir.nodes import Node, Op

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

    @staticmethod
    def of(tensor: torch.Tensor, axis: int) -> RangeTable:
        """`build`, kept while the tensor lives with the same identity, version counter, address,
        shape and strides (the last `TABLE_CACHE_SIZE`; a write that does not move the version counter
        is not seen, see the module docstring): consecutive plans over one input
        whose other arguments change (decoding steps, a new `cache_seqlens` each) build its tables
        once. Not kept for an inference tensor (no version counter), under torch.compile, or while a
        CUDA graph captures (the tables would be the graph's, computed only when it replays)."""
        if (
            tensor.is_inference()
            or torch.compiler.is_compiling()
            or (tensor.is_cuda and torch.cuda.is_current_stream_capturing())
        ):
            return RangeTable.build(tensor, axis)
        key = (
            id(tensor), tensor._version, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype, str(tensor.device), axis,
        )  # fmt: skip
        with _TABLES_LOCK:
            entry = _TABLES.get(key)
            if entry is not None and entry[0]() is tensor:
                _TABLES.move_to_end(key)
                return entry[1]
        table = RangeTable.build(tensor, axis)
        with _TABLES_LOCK:
            # Dropped with the tensor (its id may then be another's), and beyond the cache's size.
            _TABLES[key] = (weakref.ref(tensor, lambda _, key=key: _TABLES.pop(key, None)), table)
            while len(_TABLES) > TABLE_CACHE_SIZE:
                _TABLES.popitem(last=False)
        return table

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


TABLE_CACHE_SIZE = 8
_TABLES: OrderedDict[tuple, tuple[weakref.ref, RangeTable]] = OrderedDict()
_TABLES_LOCK = threading.Lock()


def forget_tables() -> None:
    """Drop every kept `RangeTable` (`RangeTable.of`): the next plan builds its inputs' tables anew."""
    with _TABLES_LOCK:
        _TABLES.clear()


def whole_bounds(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of the whole input and 0 (a box may reach outside it): sound for any box."""
    values = _stored(tensor).to(torch.int64)
    zero = torch.zeros((), dtype=torch.int64, device=tensor.device)
    if values.numel() == 0:
        return zero, zero
    return torch.minimum(values.amin(), zero), torch.maximum(values.amax(), zero)


# ---- static widths of a box ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileSpan:
    """The tile boxes along one axis (`q` or `kv`) of a plan's evaluation, statically: every box
    `[x_first, x_last]` has `x_last - x_first <= width`, and `x_first % modulus == residue` (tiles start
    at multiples of the block plus the axis's offset; modulus 1 when the offset is a tensor)."""

    width: int
    modulus: int = 1
    residue: int = 0


_HOST_OPS: dict[Op, Callable[..., int | bool]] = {
    Op.ADD: lambda a, b: a + b,
    Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b,
    Op.NEG: lambda a: -a,
    Op.FLOORDIV: lambda a, b: 0 if b == 0 else a // b,
    Op.MOD: lambda a, b: a if b == 0 else a % b,
    Op.MIN: min,
    Op.MAX: max,
    Op.EQ: lambda a, b: a == b,
    Op.NE: lambda a, b: a != b,
    Op.LT: lambda a, b: a < b,
    Op.LE: lambda a, b: a <= b,
    Op.GT: lambda a, b: a > b,
    Op.GE: lambda a, b: a >= b,
    Op.AND: lambda *xs: all(xs),
    Op.OR: lambda *xs: any(xs),
    Op.NOT: lambda a: not a,
}


def _host_value(node: Node, params: Mapping[str, object]) -> int | bool | None:
    """The value of an int or bool expression of constants and runtime parameters (host values), else
    None (it depends on an index, a size, an input, or a parameter traced by torch.compile)."""
    if node.op is Op.CONST:
        return node.attr if isinstance(node.attr, int) else None
    if node.op is Op.PARAM:
        value = params.get(str(node.attr))
        return value if isinstance(value, int) else None
    if node.op not in _HOST_OPS:
        return None
    args = [_host_value(a, params) for a in node.args]
    if any(a is None for a in args):
        return None
    return _HOST_OPS[node.op](*args)


def static_width(
    lo: Node, hi: Node, spans: Mapping[str, TileSpan], params: Mapping[str, object] = {}
) -> int | None:
    """A bound on `hi - lo` over every tile box, for the bounds `(lo, hi)` of an index that the interval
    analysis built (`analysis/intervals.py`: they have the same shape, one from each end of the tile
    box), or None where the shape gives none. `spans` bounds the tile boxes (`TileSpan`, by axis);
    runtime parameters are read from `params` (host values)."""
    if lo == hi:
        return 0
    lo_value, hi_value = _host_value(lo, params), _host_value(hi, params)
    if lo_value is not None and hi_value is not None:
        return int(hi_value) - int(lo_value)
    if lo.op is Op.VAR and hi.op is Op.VAR:
        for axis, span in spans.items():
            first, last = f"{axis}_first", f"{axis}_last"
            if (lo.attr, hi.attr) == (first, last):
                return span.width
            if (lo.attr, hi.attr) == (last, first):
                return 0
        return None
    if lo.op is not hi.op or len(lo.args) != len(hi.args):
        return None

    def width(a: Node, b: Node) -> int | None:
        return static_width(a, b, spans, params)

    def total(*widths: int | None) -> int | None:
        return None if any(w is None for w in widths) else sum(widths)  # type: ignore[arg-type]

    op, (x, y) = lo.op, (lo.args, hi.args)
    if op is Op.ADD:
        return total(*(width(a, b) for a, b in zip(x, y, strict=True)))
    if op is Op.SUB:  # hi - lo = (y0 - x0) + (x1 - y1)
        return total(width(x[0], y[0]), width(y[1], x[1]))
    if op is Op.NEG:
        return width(y[0], x[0])
    if op in (Op.MIN, Op.MAX):  # min(a2, b2) - min(a1, b1) <= max(a2 - a1, b2 - b1); max likewise
        return _largest(*(width(a, b) for a, b in zip(x, y, strict=True)))
    if op is Op.WHERE:
        conditions = (_host_value(x[0], params), _host_value(y[0], params))
        if conditions[0] is not None and conditions[1] is not None:
            return width(x[1] if conditions[0] else x[2], y[1] if conditions[1] else y[2])
        if x[0] != y[0]:
            return None
        return _largest(width(x[1], y[1]), width(x[2], y[2]))
    if op is Op.MUL:
        for factor, other in ((0, 1), (1, 0)):
            k = _host_value(x[factor], params) if x[factor] == y[factor] else None
            if k is not None:
                w = width(x[other], y[other]) if k >= 0 else width(y[other], x[other])
                return None if w is None else abs(int(k)) * w
        return None
    if op in (Op.FLOORDIV, Op.MOD):
        d = _host_value(x[1], params) if x[1] == y[1] else None
        if d is None:
            return None
        d = int(d)
        if d == 0:  # x // 0 is 0, x % 0 is x
            return 0 if op is Op.FLOORDIV else width(x[0], y[0])
        if op is Op.MOD:  # both in [0, d - 1] (or [d + 1, 0])
            return abs(d) - 1
        # x // d for d < 0 is (-x) // |d|: decreasing in x, its ends swapped.
        w = width(x[0], y[0]) if d > 0 else width(y[0], x[0])
        if w is None:
            return None
        # floor((r + w) / |d|) with r = x_lo % |d| at its largest: |d| - 1, or less when the tiles'
        # alignment fixes r (a tile start divided by a divisor of its block).
        largest_r = abs(d) - 1
        if d > 0 and x[0].op is Op.VAR and y[0].op is Op.VAR:
            for axis, span in spans.items():
                if (x[0].attr, y[0].attr) == (f"{axis}_first", f"{axis}_last"):
                    g = math.gcd(span.modulus, d)
                    largest_r = d - g + span.residue % g
        return (largest_r + w) // abs(d)
    return None


def _largest(*widths: int | None) -> int | None:
    return None if any(w is None for w in widths) else max(widths)  # type: ignore[type-var]


def static_widths(
    bounds: Sequence[Node], ranged: Sequence[int], spans: Mapping[str, TileSpan], params: Mapping[str, object]
) -> list[int | None]:
    """`static_width` of each axis in `ranged` of a `range_min` / `range_max` node's bounds (lo, hi per
    axis, side by side)."""
    return [static_width(bounds[2 * axis], bounds[2 * axis + 1], spans, params) for axis in ranged]


def box_bound(
    tensor: torch.Tensor,
    lows: Sequence[torch.Tensor],
    highs: Sequence[torch.Tensor],
    ranged: Sequence[int],
    table: Callable[[int], RangeTable],
    maximum: bool,
    synchronise: bool = True,
    widths: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """The minimum (or with `maximum` the maximum), int64, of `tensor` over the box [lows[i], highs[i]]
    of each axis i (broadcasting tensors), where only the axes in `ranged` may span more than one
    position (the others are read at `lows[i]`). `table(axis)` gives the (cached) `RangeTable` along
    an axis. `widths` (one per axis in `ranged`, None where unknown) bounds `highs - lows` statically
    (`static_width`).

    A box along one axis is exact and never waits for the device. Over several axes it is exact where
    the positions enumerated off the tabled axis are few (`MAX_ENUMERATED`, or O(input size) in all).
    Their number is the static width where one is given; an axis without one is measured by one host
    synchronisation, or without `synchronise` (while a CUDA graph captures) enumerated
    `CAPTURED_STEPS` positions, a box wider than that getting the whole input's bound, decided on the
    device."""
    if len(ranged) == 1:
        axis = ranged[0]
        points: list[torch.Tensor | None] = list(lows)
        points[axis] = None
        return table(axis).bound(points, lows[axis], highs[axis], maximum)
    shape = tensor.shape
    first, final = {}, {}
    for axis in ranged:
        # Positions from -1 to the extent: a box reaching outside the input reads one position
        # outside, which reads 0. An empty box reads position -1 alone.
        empty = lows[axis] > highs[axis]
        first[axis] = torch.where(empty, -1, lows[axis].clamp(-1, shape[axis]))
        final[axis] = torch.where(empty, -1, highs[axis].clamp(-1, shape[axis]))
    # Positions per axis: at most the extent and the two outside it.
    counts: dict[int, int] = {}
    for axis, width in zip(ranged, widths or [None] * len(ranged), strict=True):
        if width is not None:
            counts[axis] = min(max(width, 0) + 1, shape[axis] + 2)
    unknown = [axis for axis in ranged if axis not in counts]
    if unknown and not synchronise:
        return _captured_bound(tensor, lows, highs, ranged, table, maximum, first, final, counts)
    for axis in unknown:
        counts[axis] = int((final[axis] - first[axis] + 1).max()) if first[axis].numel() else 1
    pick = torch.maximum if maximum else torch.minimum
    result: torch.Tensor | None = None
    if math.prod(counts.values()) <= DIRECT_READS:  # a box of a few positions: read them, no table
        values = torch.cat(
            [_stored(tensor).reshape(-1), torch.zeros(1, dtype=_stored(tensor).dtype, device=tensor.device)]
        )
        for steps in itertools.product(*(range(counts[a]) for a in ranged)):
            index = list(lows)
            for axis, step in zip(ranged, steps, strict=True):
                index[axis] = torch.minimum(first[axis] + step, final[axis])
            here = _read(values, shape, index)
            result = here if result is None else pick(result, here)
        assert result is not None
        return result.to(torch.int64)
    along = max(ranged, key=lambda a: counts[a])
    enumerated = [a for a in ranged if a != along]
    positions = math.prod(counts[a] for a in enumerated)
    queries = math.prod(torch.broadcast_shapes(*(x.shape for x in (*lows, *highs))))
    if positions > MAX_ENUMERATED and positions * queries > ENUMERATED_PER_ELEMENT * tensor.numel():
        return whole_bounds(tensor)[1 if maximum else 0]
    for steps in itertools.product(*(range(counts[a]) for a in enumerated)):
        points = list(lows)
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
    counts: Mapping[int, int],
) -> torch.Tensor:
    """`box_bound` without a host synchronisation where some axes have no static width: those are
    enumerated a fixed number of positions (the table runs along the one of largest extent), and a
    box wider than that gets the whole input's bound."""
    along = max(ranged, key=lambda a: counts.get(a, tensor.shape[a] + 2))
    enumerated = [a for a in ranged if a != along]
    steps_of = {a: counts.get(a, CAPTURED_STEPS) for a in enumerated}
    pick = torch.maximum if maximum else torch.minimum
    result: torch.Tensor | None = None
    for steps in itertools.product(*(range(steps_of[a]) for a in enumerated)):
        points: list[torch.Tensor | None] = list(lows)
        points[along] = None
        for axis, step in zip(enumerated, steps, strict=True):
            points[axis] = torch.minimum(first[axis] + step, final[axis])
        here = table(along).bound(points, lows[along], highs[along], maximum)
        result = here if result is None else pick(result, here)
    assert result is not None
    too_wide = torch.zeros((), dtype=torch.bool, device=result.device)
    for axis in enumerated:
        if axis not in counts:
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
    widths: Sequence[int | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of `tensor` over the box, as `box_bound`."""
    return (
        box_bound(tensor, lows, highs, ranged, table, False, synchronise, widths),
        box_bound(tensor, lows, highs, ranged, table, True, synchronise, widths),
    )
