"""Which rank holds which query chunk: balance the largest forward and backward cost, then move the
least data (`docs/distributed.md`, `dispatch`, "Assignment").

Every rank holds the same number of chunks (one more on the first `num_chunks % world_size` ranks): the
layers around attention cost per token, so tokens stay balanced, and attention is balanced by choosing
which chunks. A rank's load is the pair (forward cost, backward cost), each divided by its mean over
the ranks; the objective is the largest of these over all ranks. Candidates: contiguous runs, head-tail
pairs (the "zigzag" split), both as they are, and a longest-processing-time-first (LPT) greedy improved
by swaps. The one with the smallest objective wins; among those within `slack` of it, the one whose
busiest receiver gets the fewest key/value chunks. Everything is in float64 with ties broken by chunk
and rank index: the same costs give the same owners on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Swaps tried at most per candidate: each removes some load from the busiest rank, so the loop ends
# long before this on every pattern measured (`benchmarks/context_parallel.py`).
_MAX_SWAPS = 4096
# A query chunk is split by its keys (`split`) only if it alone costs at least this much of a rank's
# mean load: lighter chunks balance whole, by swaps.
HEAVY = 0.5
# Query chunks split at most per layout: each split spreads one chunk over every rank holding its keys.
_MAX_SPLITS = 8
# Relative improvement a swap must bring: float noise never counts as one.
_EPS = 1e-12
# Swaps stop once the busiest rank is within this of the mean: each costs a few dozen small tensor
# operations, and the last swaps of a long run buy tenths of a percent (a 96-rank document layout
# takes ~90 swaps to 0.1%, ~45 to 0.5%).
CLOSE_ENOUGH = 5e-3


def chunk_counts(num_chunks: int, world_size: int) -> list[int]:
    """How many chunks each rank holds: equal, one more on the first `num_chunks % world_size` ranks."""
    base, extra = divmod(num_chunks, world_size)
    return [base + (r < extra) for r in range(world_size)]


def contiguous(num_chunks: int, world_size: int) -> torch.Tensor:
    """Owners of contiguous runs: rank 0 the first chunks, rank 1 the next, ... (int64 [num_chunks])."""
    counts = torch.tensor(chunk_counts(num_chunks, world_size))
    return torch.repeat_interleave(torch.arange(world_size), counts)


def head_tail(num_chunks: int, world_size: int) -> torch.Tensor | None:
    """Owners of the head-tail ("zigzag") split: the chunks in 2 * world_size equal runs, rank r holding
    run r and run 2 * world_size - 1 - r; None when the chunks do not cut into such runs."""
    if num_chunks % (2 * world_size):
        return None
    run = num_chunks // (2 * world_size)
    ranks = torch.arange(world_size)
    runs = torch.cat([ranks, ranks.flip(0)])
    return torch.repeat_interleave(runs, run)


def lpt(forward: torch.Tensor, backward: torch.Tensor, world_size: int) -> torch.Tensor:
    """Longest processing time first, in rounds: chunks by decreasing load, `world_size` at a time, the
    largest of a round to the least loaded rank with room, the next to the next (ties: the lower rank).
    With equal chunk counts this is LPT restricted to one chunk per rank per round, and costs a sort
    per round instead of a scan of the ranks per chunk. `forward` and `backward` are float64
    [num_chunks], each scaled to mean 1 per rank."""
    n = len(forward)
    order = torch.sort(torch.maximum(forward, backward), descending=True, stable=True).indices
    owner = torch.empty(n, dtype=torch.int64)
    load_f = torch.zeros(world_size, dtype=torch.float64)
    load_b = torch.zeros(world_size, dtype=torch.float64)
    for start in range(0, n, world_size):
        chunks = order[start : start + world_size]
        # The last round is short: the ranks with the most room (the lowest ones) compete for it.
        ranks = torch.sort(torch.maximum(load_f, load_b)[: len(chunks)], stable=True).indices
        owner[chunks] = ranks
        load_f[ranks] += forward[chunks]
        load_b[ranks] += backward[chunks]
    return owner


def loads(owner: torch.Tensor, cost: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum of `cost` over each rank's chunks, float64 [world_size]."""
    return torch.zeros(world_size, dtype=torch.float64).index_add_(0, owner, cost)


def improve(
    owner: torch.Tensor,
    forward: torch.Tensor,
    backward: torch.Tensor,
    world_size: int,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`owner` after swaps of two chunks between the busiest rank and another, each the swap that lowers
    the larger load of the two ranks most, while one lowers it and the busiest rank is more than
    `CLOSE_ENOUGH` above the mean (chunk counts never change). `extra`: (forward, backward) load each
    rank carries besides its chunks (the parts of split chunks it computes, `split`)."""
    owner = owner.clone()
    load_f, load_b = loads(owner, forward, world_size), loads(owner, backward, world_size)
    if extra is not None:
        load_f, load_b = load_f + extra[0], load_b + extra[1]
    for _ in range(_MAX_SWAPS):
        objective = torch.maximum(load_f, load_b)
        busiest = int(torch.argmax(objective))
        current = float(objective[busiest])
        if current <= 1 + CLOSE_ENOUGH:
            break
        mine = (owner == busiest).nonzero().flatten()
        others = (owner != busiest).nonzero().flatten()
        if len(mine) == 0 or len(others) == 0:
            break
        delta_f = forward[others].reshape(1, -1) - forward[mine].reshape(-1, 1)
        delta_b = backward[others].reshape(1, -1) - backward[mine].reshape(-1, 1)
        other = owner[others].reshape(1, -1)
        after = torch.maximum(
            torch.maximum(load_f[busiest] + delta_f, load_b[busiest] + delta_b),
            torch.maximum(load_f[other] - delta_f, load_b[other] - delta_b),
        )
        best = int(torch.argmin(after))
        if float(after.flatten()[best]) >= current * (1 - _EPS):
            break
        a, b = int(mine[best // len(others)]), int(others[best % len(others)])
        r = int(owner[b])
        for cost, load in ((forward, load_f), (backward, load_b)):
            load[busiest] += cost[b] - cost[a]
            load[r] += cost[a] - cost[b]
        owner[a], owner[b] = r, busiest
    return owner


def received(owner: torch.Tensor, visits: torch.Tensor, world_size: int) -> torch.Tensor:
    """bool [world_size, num_chunks]: the key chunks each rank's query chunks visit that it does not
    hold (what it must receive)."""
    n = len(owner)
    # Row r: how many of rank r's query chunks visit each key chunk (O(chunks^2), not a matrix product).
    needed = torch.zeros((world_size, n), dtype=torch.int32).index_add_(0, owner, visits.to(torch.int32)) > 0
    needed[owner, torch.arange(n)] = False
    return needed


def objective(owner: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, world_size: int) -> float:
    """The largest load over the ranks, forward or backward (costs scaled to mean 1 per rank)."""
    return float(torch.maximum(loads(owner, forward, world_size), loads(owner, backward, world_size)).max())


def assign(
    forward: torch.Tensor, backward: torch.Tensor, visits: torch.Tensor, world_size: int, slack: float = 0.0
) -> torch.Tensor:
    """The owner of each query chunk, int64 [num_chunks] (module docstring). `forward`, `backward`: the
    chunks' costs; `visits`: bool [num_chunks, num_chunks], query chunk i visits key chunk j."""
    n = len(forward)
    scaled = []
    for cost in (forward, backward):
        cost = cost.to(torch.float64)
        total = float(cost.sum())
        scaled.append(cost * (world_size / total) if total > 0 else cost)
    f, b = scaled
    # The fixed splits as they are (improving them takes many swaps); the greedy one improved.
    fixed = [contiguous(n, world_size), head_tail(n, world_size)]
    candidates = [c for c in fixed if c is not None] + [improve(lpt(f, b, world_size), f, b, world_size)]
    objectives = [objective(c, f, b, world_size) for c in candidates]
    best = min(objectives)
    kept = [c for c, o in zip(candidates, objectives, strict=True) if o <= best * (1 + slack) + _EPS]
    if len(kept) == 1:
        return kept[0]

    def traffic(owner: torch.Tensor) -> tuple[int, int]:
        counts = received(owner, visits, world_size).sum(1)
        return int(counts.max()), int(counts.sum())

    return min(kept, key=traffic)  # min keeps the first of equals: the order of `candidates`


def split(
    owner: torch.Tensor,
    forward: torch.Tensor,
    backward: torch.Tensor,
    pairs: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    world_size: int,
    target: float,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, list[int]]], float]:
    """Split heavy query chunks by their keys (`docs/distributed.md`, "Split query chunks"). While the
    busiest rank is above `target` and its costliest chunk not yet split is `HEAVY`, that chunk's work
    against key chunks held by other ranks moves to those ranks (no key moves: the query chunk travels
    to them, their partial outputs back), as much as brings the owner and them to one level
    (`_water_fill`); then swaps (`improve`) rebalance with the moved work as fixed extra loads.

    `forward`, `backward`: the chunks' costs, scaled to mean 1 per rank; `pairs(i)`: float64
    [num_chunks] twice, query chunk i's forward and backward cost against each key chunk, scaled alike
    (they sum to `forward[i]`, `backward[i]`; asked only for the chunks considered for a split).
    Returns the owners; per split chunk, the owner of each key chunk when it was split (the helper of
    that key chunk's work) and the key chunks whose work moved, ascending; the objective.
    """
    owner = owner.clone()
    own_f, own_b = forward.clone(), backward.clone()
    extra_f = torch.zeros(world_size, dtype=torch.float64)
    extra_b = torch.zeros_like(extra_f)
    pieces: list[tuple[int, torch.Tensor, list[int]]] = []

    def rank_loads() -> tuple[torch.Tensor, torch.Tensor]:
        return loads(owner, own_f, world_size) + extra_f, loads(owner, own_b, world_size) + extra_b

    for _ in range(_MAX_SPLITS):
        load_f, load_b = rank_loads()
        load = torch.maximum(load_f, load_b)
        busiest = int(torch.argmax(load))
        if float(load[busiest]) <= target:
            break
        done = {c for c, _, _ in pieces}
        mine = [c for c in (owner == busiest).nonzero().flatten().tolist() if c not in done]
        if not mine:
            break
        # The costliest, ties to the lowest index: the same choice on every rank.
        c = max(mine, key=lambda i: (max(float(own_f[i]), float(own_b[i])), -i))
        if max(float(own_f[c]), float(own_b[c])) < HEAVY:
            break
        key_owner = owner.clone()
        pair_forward, pair_backward = pairs(c)
        moved_keys = _water_fill(busiest, key_owner, pair_forward, pair_backward, load_f, load_b)
        if not moved_keys:
            break
        index = torch.tensor(moved_keys, dtype=torch.int64)
        own_f[c] -= pair_forward[index].sum()
        own_b[c] -= pair_backward[index].sum()
        extra_f.index_add_(0, key_owner[index], pair_forward[index])
        extra_b.index_add_(0, key_owner[index], pair_backward[index])
        pieces.append((c, key_owner, moved_keys))
        owner = improve(owner, own_f, own_b, world_size, (extra_f, extra_b))
    load_f, load_b = rank_loads()
    return owner, pieces, float(torch.maximum(load_f, load_b).max())


def _water_fill(
    busiest: int,
    key_owner: torch.Tensor,
    pair_forward: torch.Tensor,
    pair_backward: torch.Tensor,
    load_f: torch.Tensor,
    load_b: torch.Tensor,
) -> list[int]:
    """The key chunks of a query chunk whose work moves from its owner `busiest` to the ranks holding
    them (`pair_forward`, `pair_backward`: the chunk's cost against each key chunk), ascending: at the
    lowest level such that, every other rank taking its key chunks of the chunk in ascending order
    while its load stays at most the level (forward and backward), the owner ends at most at the level
    (bisection, 48 steps: far below the costs' resolution)."""
    visited = ((pair_forward > 0) | (pair_backward > 0)) & (key_owner != busiest)
    keys = visited.nonzero().flatten()
    if len(keys) == 0:
        return []
    # Each key chunk's cost and the cost of its helper's key chunks up to it (cumulative by helper).
    helper = key_owner[keys]
    order = torch.argsort(helper * len(key_owner) + keys)  # by helper, then key: each helper a run
    keys, helper = keys[order], helper[order]
    cost_f, cost_b = pair_forward[keys], pair_backward[keys]
    starts = torch.ones_like(helper, dtype=torch.bool)
    starts[1:] = helper[1:] != helper[:-1]
    group = torch.cumsum(starts.to(torch.int64), 0) - 1
    cum_f, cum_b = torch.cumsum(cost_f, 0), torch.cumsum(cost_b, 0)
    before_f = torch.cat([torch.zeros(1, dtype=torch.float64), cum_f])[starts.nonzero().flatten()][group]
    before_b = torch.cat([torch.zeros(1, dtype=torch.float64), cum_b])[starts.nonzero().flatten()][group]
    cum_f, cum_b = cum_f - before_f, cum_b - before_b
    base_f, base_b = load_f[helper] + cum_f, load_b[helper] + cum_b
    owner_f, owner_b = float(load_f[busiest]), float(load_b[busiest])

    def moves(level: float) -> torch.Tensor:
        return (base_f <= level) & (base_b <= level)

    low, high = 0.0, max(owner_f, owner_b)
    for _ in range(48):
        level = (low + high) / 2
        take = moves(level)
        if max(owner_f - float(cost_f[take].sum()), owner_b - float(cost_b[take].sum())) <= level:
            high = level
        else:
            low = level
    take = moves(high)
    return sorted(keys[take].tolist())
