"""Range summaries of `input` tensors: bounds of an input over an index box without reading the box.

The tile analyses bound a load like `doc[b, q]` over a tile by `range_min` / `range_max` of the input
over the tile's index range. A `RangeTable` answers those queries for one input along one axis (the
other indices being single points) in O(1) per query, from a sparse table over chunks of `CHUNK`
elements: O(n / CHUNK * log(n / CHUNK)) memory on top of one pass over the input, never O(n^2).

Bounds are *sound*: a query covers whole chunks, so it sees a superset of the box and may report a
lower minimum or a higher maximum than the box holds; for boxes whose ends are multiples of `CHUNK`
(every tile of a kernel, whose block sizes are multiples of 16) it is exact. Positions outside the input
read 0 (false), as loads do, so a box reaching outside the input includes 0 in its bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 16


@dataclass(frozen=True)
class RangeTable:
    """Sparse tables of chunk minima and maxima of `tensor` along `axis` (stacked over levels)."""

    axis: int
    extent: int
    shape: tuple[int, ...]  # the input's shape
    mins: torch.Tensor  # [levels, *other dims, chunks]
    maxs: torch.Tensor

    @staticmethod
    def build(tensor: torch.Tensor, axis: int) -> RangeTable:
        values = tensor.to(torch.int64).movedim(axis, -1)
        extent = values.shape[-1]
        chunks = max(-(-extent // CHUNK), 1)
        if extent == 0:
            values = torch.zeros((*values.shape[:-1], 1), dtype=torch.int64, device=tensor.device)
        pad = chunks * CHUNK - values.shape[-1]
        if pad:  # repeat the last element: it changes no chunk's bounds
            values = torch.cat([values, values[..., -1:].expand(*values.shape[:-1], pad)], dim=-1)
        blocks = values.reshape(*values.shape[:-1], chunks, CHUNK)
        mins, maxs = [blocks.amin(dim=-1)], [blocks.amax(dim=-1)]
        width = 1
        while 2 * width <= chunks:
            lo, hi = mins[-1], maxs[-1]
            # Level k holds the bound of chunks [i, i + 2^k); past the end it repeats level k - 1.
            shifted_lo = torch.cat([lo[..., width:], lo[..., -width:]], dim=-1)
            shifted_hi = torch.cat([hi[..., width:], hi[..., -width:]], dim=-1)
            mins.append(torch.minimum(lo, shifted_lo))
            maxs.append(torch.maximum(hi, shifted_hi))
            width *= 2
        return RangeTable(axis, extent, tuple(tensor.shape), torch.stack(mins), torch.stack(maxs))

    def query(
        self, points: list[torch.Tensor | None], lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) over positions [lo, hi] (inclusive) of `axis`, the other indices at `points`
        (None at `axis`); boxes reaching outside the input include 0. Broadcasts its arguments."""
        others = [p for i, p in enumerate(points) if i != self.axis]
        lo, hi, *others = torch.broadcast_tensors(lo, hi, *others)  # type: ignore[misc]
        inside = torch.ones_like(lo, dtype=torch.bool)
        flat = torch.zeros_like(lo)
        stride = self.mins.shape[-1]
        other_extents = [n for i, n in enumerate(self.shape) if i != self.axis]
        for index, extent in zip(reversed(others), reversed(other_extents), strict=True):
            inside &= (index >= 0) & (index < extent)
            flat = flat + index.clamp(0, max(extent - 1, 0)) * stride
            stride *= extent
        last = self.extent - 1
        reaches_out = (lo < 0) | (hi > last)
        inside &= (hi >= 0) & (lo <= last) & (lo <= hi) & (self.extent > 0)
        c0 = lo.clamp(0, max(last, 0)) // CHUNK
        c1 = hi.clamp(0, max(last, 0)) // CHUNK
        c1 = torch.maximum(c0, c1)
        level = torch.floor(torch.log2((c1 - c0 + 1).to(torch.float64))).to(torch.int64)
        level = level.clamp(0, self.mins.shape[0] - 1)
        second = c1 - (1 << level) + 1
        base = flat + level * stride
        mins, maxs = self.mins.reshape(-1), self.maxs.reshape(-1)
        low = torch.minimum(mins[base + c0], mins[base + second])
        high = torch.maximum(maxs[base + c0], maxs[base + second])
        zero = torch.zeros_like(low)
        low = torch.where(inside, torch.where(reaches_out, torch.minimum(low, zero), low), zero)
        high = torch.where(inside, torch.where(reaches_out, torch.maximum(high, zero), high), zero)
        return low, high
