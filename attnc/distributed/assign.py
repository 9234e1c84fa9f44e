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

import torch

# Swaps tried at most per candidate: each removes some load from the busiest rank, so the loop ends
# long before this on every pattern measured (`benchmarks/context_parallel.py`).
_MAX_SWAPS = 4096
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
    owner: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, world_size: int
) -> torch.Tensor:
    """`owner` after swaps of two chunks between the busiest rank and another, each the swap that lowers
    the larger load of the two ranks most, while one lowers it and the busiest rank is more than
    `CLOSE_ENOUGH` above the mean (chunk counts never change)."""
    owner = owner.clone()
    load_f, load_b = loads(owner, forward, world_size), loads(owner, backward, world_size)
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
