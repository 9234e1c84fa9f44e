"""`ContextParallel`: one long sequence over the ranks of a torch.distributed group, its query chunks
assigned by their exact tile costs (`docs/distributed.md`).

This is the host side of issue 22: `dispatch` (and `dispatch_many` for a model whose layers use
several patterns) computes a `Layout` from the kernels' tile censuses alone, without a live process
group where `world_size=` is given, identically on every rank (with a live group, a collective that
checks every rank passed the same). Calling the object, `cp(q_loc, k_loc, v_loc, layout, **inputs)`,
runs attention over a layout (`attention.py`: the key/value exchange, forward and backward).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from attnc import oracle
from attnc.api import Kernel
from attnc.distributed.assign import assign, objective, split
from attnc.distributed.attention import attention
from attnc.distributed.census import Census, census_env, census_from_env, check_chunking
from attnc.distributed.fingerprint import fingerprint, mask_key
from attnc.distributed.layout import CostModel, Layout, Part
from attnc.errors import InputError

# The default chunk: the largest size of at most this many tokens...
DEFAULT_CHUNK = 1024
# ... that gives every rank at least this many chunks (where the sequence allows)...
MIN_CHUNKS_PER_RANK = 4
# ... and balances within this much (largest load over mean, forward and backward); else half of it,
# then a quarter, at most this many sizes in all, keeping the best balanced, and stopping where halving
# the chunk gained less than `SMALLER_GAIN` (relative).
BALANCE_TARGET = 1.02
CHUNK_TRIES = 3
SMALLER_GAIN = 0.01
# Where the best assignment of whole chunks leaves a rank above this (largest load over mean), heavy
# query chunks are split by their keys (`assign.split`; `ContextParallel(split_target=)`).
SPLIT_TARGET = 1.05

KernelEntry = tuple[Kernel, Mapping[str, Any]] | tuple[Kernel, Mapping[str, Any], int]


class ContextParallel:
    """Context parallelism for `kern` over `group` (a torch.distributed ProcessGroup; None: WORLD).

    Where no process group is initialised (planning, simulation, tests) give `world_size=` (and
    `rank=`, default 0): `dispatch` never needs a live group. Where one is, rank and world size come
    from it, and a `world_size=` that differs is an error. `split_target`: the balance (largest load
    over the mean) above which `dispatch` splits heavy query chunks by their keys (`SPLIT_TARGET`;
    `float("inf")` never splits; a lower one splits more readily, as the tests do on tiny sequences)."""

    def __init__(
        self,
        kern: Kernel,
        group: Any = None,
        *,
        world_size: int | None = None,
        rank: int | None = None,
        cost_model: CostModel | None = None,
        block: tuple[int, int] = (128, 128),
        split_target: float = SPLIT_TARGET,
    ) -> None:
        if not isinstance(kern, Kernel):
            raise InputError(f"ContextParallel takes an attnc Kernel, got {type(kern).__name__}", None)
        live = dist.is_available() and dist.is_initialized()
        if live:
            size, me = dist.get_world_size(group), dist.get_rank(group)
            if world_size is not None and world_size != size:
                raise InputError(f"world_size={world_size}, but the process group has {size} ranks", None)
            if rank is not None and rank != me:
                raise InputError(f"rank={rank}, but this process is rank {me} of the group", None)
        elif group is not None:
            raise InputError("a process group was given but torch.distributed is not initialised", None)
        else:
            if world_size is None:
                raise InputError(
                    "no torch.distributed process group is initialised: pass world_size= (and rank=)", None
                )
            size, me = world_size, 0 if rank is None else rank
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise InputError(f"world_size must be a positive int, got {size!r}", None)
        if not isinstance(me, int) or isinstance(me, bool) or not 0 <= me < size:
            raise InputError(f"rank must be an int in [0, {size}), got {me!r}", None)
        self.kern = kern
        self.group = group
        self.live = live
        self.world_size = size
        self.rank = me
        self.cost_model = cost_model or CostModel()
        self.block = block
        if isinstance(split_target, bool) or not isinstance(split_target, int | float) or split_target < 1:
            raise InputError(f"split_target must be a number >= 1, got {split_target!r}", None)
        self.split_target = float(split_target)

    def dispatch(
        self,
        seq_len: int,
        *,
        batch: int | None = None,
        num_heads: int | None = None,
        chunk: int | None = None,
        **inputs: Any,
    ) -> Layout:
        """The layout of a sequence of `seq_len` tokens (self-attention; `inputs` are the kernel's), the
        same on every rank given the same arguments. `batch`, `num_heads`: as `kern.plan` takes them
        (default: what the inputs' shapes name, else 1). `chunk`: tokens per chunk, a multiple of the
        tile sizes dividing `seq_len` (default: module constants, `docs/distributed.md`)."""
        return self.dispatch_many(
            seq_len, [(self.kern, inputs)], batch=batch, num_heads=num_heads, chunk=chunk
        )

    def dispatch_many(
        self,
        seq_len: int,
        kernels: Sequence[KernelEntry],
        *,
        batch: int | None = None,
        num_heads: int | None = None,
        chunk: int | None = None,
    ) -> Layout:
        """One layout for several kernels over the same sequence (a model mixing, say, sliding-window
        and global layers): `kernels` are `(kern, inputs)` or `(kern, inputs, layers)` entries, and the
        costs balanced are the sums over them, each counted `layers` times (default 1)."""
        if self.live:  # first: past this point every rank has the same arguments, and fails alike
            arguments = (
                (seq_len, batch, num_heads, chunk, self.block, self.cost_model, self.split_target),
                list(kernels),
            )
            self._check_same_everywhere(fingerprint(arguments))
        checked = [_entry(e) for e in kernels]
        if not checked:
            raise InputError("dispatch_many needs at least one (kern, inputs) entry", None)
        entries = [
            (kern, census_env(kern, seq_len, batch, num_heads, dict(inputs), self.block), layers)
            for kern, inputs, layers in checked
        ]
        masks = tuple(mask_key(kern.pattern, *kern._split(dict(inputs))) for kern, inputs, _ in checked)
        # Sizes not given: those an input's shape names (as `kern.plan` infers them), else 1; the same
        # for every kernel, so that each counts as many batch rows and heads.
        batch = batch or max(env.batch or 1 for _, env, _ in entries)
        num_heads = num_heads or max(env.num_heads or 1 for _, env, _ in entries)
        if chunk is not None:
            return self._layout(seq_len, chunk, entries, batch, num_heads, masks)
        best: Layout | None = None
        best_objective = float("inf")
        for size in self._chunk_sizes(seq_len)[:CHUNK_TRIES]:
            layout = self._layout(seq_len, size, entries, batch, num_heads, masks)
            value, previous = _imbalance(layout), best_objective
            if value < best_objective:
                best, best_objective = layout, value
            # Smaller chunks did not help (one heavy tile row, say): smaller still will not either.
            if value <= BALANCE_TARGET or value > previous * (1 - SMALLER_GAIN):
                break
            # Nor can they where the heaviest half of a chunk alone keeps the balance within
            # SMALLER_GAIN of this one (a rank holding it carries at least that): no census needed.
            if _half_chunk_bound(layout, self.cost_model) >= value * (1 - SMALLER_GAIN):
                break
        assert best is not None
        return best

    def __call__(
        self,
        q_loc: torch.Tensor,
        k_loc: torch.Tensor,
        v_loc: torch.Tensor,
        layout: Layout,
        *,
        scale: float | None = None,
        return_lse: bool = False,
        **inputs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """This rank's attention output over `layout`, `[B, H, L_loc, Dv]` (and its lse, float32
        `[B, H, L_loc]`, with `return_lse=True`): a collective of the group, forward and backward
        (every rank calls it, and every rank runs the backward through its output).

        q_loc, k_loc, v_loc: this rank's shards (`layout.shard`); `inputs`: the kernel's inputs and
        runtime parameters for the WHOLE sequence, the same on every rank (the gradient of a float
        input is summed over the ranks: every rank holds all of it). `docs/distributed.md`."""
        if not isinstance(return_lse, bool):
            raise InputError(f"return_lse must be a bool, got {return_lse!r}", None)
        out, lse = attention(
            self.kern, self.group, self.world_size, self.rank, q_loc, k_loc, v_loc, layout, scale, inputs
        )
        return (out, lse) if return_lse else out

    def _check_same_everywhere(self, mine: Any) -> None:
        """An `InputError` on every rank unless every rank of the group called `dispatch` with the same
        arguments and inputs: a layout computed from other inputs on one rank would exchange the wrong
        chunks later, silently. One `all_gather_object` of a fingerprint (no tensor leaves its rank)."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        differing = [r for r, other in enumerate(gathered) if other != gathered[0]]
        if differing:
            raise InputError(
                f"dispatch was called with other arguments or inputs on rank(s) {differing} than on "
                f"rank 0: every rank must pass the same sequence length, sizes, kernels and inputs",
                None,
            )

    def _chunk_sizes(self, seq_len: int) -> list[int]:
        """Default chunk sizes to try, largest first (`DEFAULT_CHUNK`, `MIN_CHUNKS_PER_RANK`)."""
        unit = math.lcm(*self.block)
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0 or seq_len % unit:
            raise InputError(
                f"seq_len={seq_len!r} must be a positive multiple of the tile sizes {self.block} (pad the "
                f"sequence with keys no query may see, or pass chunk=)",
                None,
            )
        sizes = [c for c in range(unit, min(DEFAULT_CHUNK, seq_len) + 1, unit) if seq_len % c == 0]
        enough = [c for c in sizes if seq_len // c >= MIN_CHUNKS_PER_RANK * self.world_size]
        first = max(enough) if enough else min(sizes)
        return [c for c in sorted(sizes, reverse=True) if c <= first and first % c == 0]

    def _layout(
        self,
        seq_len: int,
        chunk: int,
        entries: list[tuple[Kernel, oracle.Env, int]],
        batch: int,
        num_heads: int,
        masks: tuple[Any, ...],
    ) -> Layout:
        check_chunking(seq_len, chunk, self.block)
        model = self.cost_model
        censuses: list[tuple[Census, int]] = []
        forward = torch.zeros(seq_len // chunk, dtype=torch.float64)
        backward = torch.zeros_like(forward)
        for kern, env, layers in entries:
            census = census_from_env(kern, env, seq_len, chunk, self.block, batch, num_heads)
            partial, full = census.partial.sum(1).to(torch.float64), census.full.sum(1).to(torch.float64)
            forward += layers * (model.forward_partial * partial + model.forward_full * full)
            backward += layers * (model.backward_partial * partial + model.backward_full * full)
            censuses.append((census, layers))
        visits = torch.zeros((len(forward), len(forward)), dtype=torch.bool)
        for census, _ in censuses:
            visits |= census.visits()
        owner = assign(forward, backward, visits, self.world_size)
        parts: tuple[Part, ...] = ()
        scale = [self.world_size / t if (t := float(c.sum())) > 0 else 1.0 for c in (forward, backward)]
        whole = objective(owner, forward * scale[0], backward * scale[1], self.world_size)
        if whole > self.split_target:
            owner, parts = self._split(owner, forward, backward, censuses, scale, whole)
        return Layout(
            seq_len=seq_len,
            chunk=chunk,
            world_size=self.world_size,
            rank=self.rank,
            batch=batch,
            num_heads=num_heads,
            owner=tuple(owner.tolist()),
            censuses=tuple(censuses),
            forward=tuple(forward.tolist()),
            backward=tuple(backward.tolist()),
            group=self.group,
            parts=parts,
            masks=masks,
        )

    def _split(
        self,
        owner: torch.Tensor,
        forward: torch.Tensor,
        backward: torch.Tensor,
        censuses: list[tuple[Census, int]],
        scale: list[float],
        whole: float,
    ) -> tuple[torch.Tensor, tuple[Part, ...]]:
        """The owners and parts of `assign.split`, kept only where they balance better than `whole`
        (the objective of the owners given)."""
        model = self.cost_model

        def pair(c: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Query chunk c's forward and backward cost against each key chunk (not scaled)."""
            f = torch.zeros(len(forward), dtype=torch.float64)
            b = torch.zeros_like(f)
            for census, layers in censuses:
                partial, full = census.partial[c].to(torch.float64), census.full[c].to(torch.float64)
                f += layers * (model.forward_partial * partial + model.forward_full * full)
                b += layers * (model.backward_partial * partial + model.backward_full * full)
            return f, b

        def scaled(c: int) -> tuple[torch.Tensor, torch.Tensor]:
            f, b = pair(c)
            return f * scale[0], b * scale[1]

        new_owner, pieces, value = split(
            owner, forward * scale[0], backward * scale[1], scaled, self.world_size, self.split_target
        )
        if not pieces or value >= whole:
            return owner, ()
        parts = []
        for c, key_owner, moved in pieces:
            pair_f, pair_b = pair(c)
            by_helper: dict[int, list[int]] = {}
            for j, helper in zip(moved, key_owner[moved].tolist(), strict=True):
                by_helper.setdefault(helper, []).append(j)
            for helper, keys in sorted(by_helper.items()):
                if helper == int(new_owner[c]):
                    continue  # the owner's own work
                parts.append(
                    Part(
                        c, helper, tuple(keys),
                        float(pair_f[keys].sum()), float(pair_b[keys].sum()),
                    )
                )  # fmt: skip
        parts.sort(key=lambda p: (p.q_chunk, p.helper))
        return new_owner, tuple(parts)


def _entry(entry: Any) -> tuple[Kernel, Mapping[str, Any], int]:
    """A `dispatch_many` entry as (kernel, inputs, layers), checked."""
    if isinstance(entry, tuple) and len(entry) in (2, 3):
        kern, inputs, *rest = entry
        layers = rest[0] if rest else 1
        if (
            isinstance(kern, Kernel)
            and isinstance(inputs, Mapping)
            and isinstance(layers, int)
            and not isinstance(layers, bool)
            and layers > 0
        ):
            return kern, inputs, layers
    raise InputError(
        f"a dispatch_many entry is (kern, inputs) or (kern, inputs, layers > 0), got {entry!r}", None
    )


def _imbalance(layout: Layout) -> float:
    """Largest load over the mean, forward or backward (parts counted on their helpers)."""
    if not layout.parts:
        scaled = []
        for cost in (layout.forward, layout.backward):
            tensor = torch.tensor(cost, dtype=torch.float64)
            total = float(tensor.sum())
            scaled.append(tensor * (layout.world_size / total) if total > 0 else tensor)
        return objective(torch.tensor(layout.owner), *scaled, layout.world_size)
    result = 0.0
    for cost in layout.loads():
        tensor = torch.tensor(cost, dtype=torch.float64)
        total = float(tensor.sum())
        result = max(result, float(tensor.max()) * layout.world_size / total if total > 0 else 0.0)
    return result


def _half_chunk_bound(layout: Layout, model: CostModel) -> float:
    """A lower bound of the balance of any layout of chunks half as large, forward or backward: those
    chunks are the halves of these (`Census.half_partial`), and some rank holds the heaviest one and at
    least `2 * num_chunks // world_size - 1` others, at best the cheapest; over the mean rank load."""
    held = 2 * layout.num_chunks // layout.world_size
    bounds = []
    for w_partial, w_full, cost in (
        (model.forward_partial, model.forward_full, layout.forward),
        (model.backward_partial, model.backward_full, layout.backward),
    ):
        halves = sum(
            layers * (w_partial * c.half_partial.double() + w_full * c.half_full.double())
            for c, layers in layout.censuses
        )
        ordered = torch.sort(halves.flatten()).values
        busiest = float(ordered[-1] + ordered[: max(held - 1, 0)].sum())
        mean = sum(cost) / layout.world_size
        bounds.append(busiest / mean if mean > 0 else 0.0)
    return max(bounds)
