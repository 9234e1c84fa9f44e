"""Which rank holds which tokens, and what each must receive: the result of `ContextParallel.dispatch`
(`docs/distributed.md`).

A layout cuts a sequence of `seq_len` tokens into chunks of `chunk` tokens; rank `r` holds the query,
key and value rows of its chunks (`chunks(r)`, ascending), concatenated in that order along dim -2
(`shard`). For the communication of issue 22 item 2 it records, per query chunk, the key chunks it
visits (`kv_chunks`), and per rank the chunks to receive from (`receives`) and send to (`sends`) every
other rank: exactly the key chunks its queries (and its parts) visit and it does not hold.

A query chunk too expensive for one rank is split by its keys (`Part`): a part is a set of the key
chunks it visits, computed by another rank (the helper, which usually holds those keys), which
receives the query chunk (`q_receives`) and returns the part's output and lse to the chunk's owner;
the owner computes the visited key chunks no part covers (`own_kv_chunks`) and merges everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist

from attnc.distributed.census import Census
from attnc.errors import InputError


@dataclass(frozen=True)
class CostModel:
    """Relative cost of one visited tile (`docs/distributed.md`, "Cost model"). Modelled, not
    measured: a PARTIAL tile evaluates the mask on top of a FULL tile's work (forward 1.3 vs 1.0), and
    the backward recomputes the scores and evaluates the mask in both its passes (dQ, then dK/dV)."""

    forward_full: float = 1.0
    forward_partial: float = 1.3
    backward_full: float = 2.5
    backward_partial: float = 3.5


@dataclass(frozen=True)
class Part:
    """Key chunks of one query chunk computed by a rank other than the chunk's owner: `helper`
    computes query chunk `q_chunk` against `kv_chunks` (ascending, visited by it) and returns the
    output and lse to the owner (`docs/distributed.md`, "Split query chunks"). `forward`, `backward`:
    the part's cost (the `CostModel` over its tiles), moved from the owner's load to the helper's."""

    q_chunk: int
    helper: int
    kv_chunks: tuple[int, ...]
    forward: float
    backward: float


@dataclass(frozen=True, eq=False)
class Layout:
    """The dispatch of one sequence over `world_size` ranks, seen from `rank` (module docstring).

    owner:      the rank holding each chunk, [num_chunks]
    censuses:   one `Census` per kernel dispatched (`dispatch_many` balances several), with its weight
    forward:    each query chunk's forward cost (summed over the kernels, times their weights)
    backward:   each query chunk's backward cost
    parts:      the split query chunks' parts, ordered by (query chunk, helper); empty where no query
                chunk needed splitting (every layout whose chunks balance whole)
    masks:      per kernel dispatched, its mask and the values of what the mask reads
    """

    seq_len: int
    chunk: int
    world_size: int
    rank: int
    batch: int
    num_heads: int
    # Per chunk, too long to show.
    owner: tuple[int, ...] = field(repr=False)
    censuses: tuple[tuple[Census, int], ...] = field(repr=False)
    forward: tuple[float, ...] = field(repr=False)
    backward: tuple[float, ...] = field(repr=False)
    group: Any = field(default=None, repr=False)
    parts: tuple[Part, ...] = field(default=(), repr=False)
    # Per kernel dispatched, what its visits depend on (`fingerprint.mask_key`): `cp(...)` refuses a
    # kernel, inputs or runtime parameters whose mask differs from all of them (another window would
    # visit chunks the layout never exchanges). None: not recorded (a layout built by hand).
    masks: tuple[Any, ...] | None = field(default=None, repr=False)

    @property
    def num_chunks(self) -> int:
        return len(self.owner)

    def chunks(self, rank: int | None = None) -> tuple[int, ...]:
        """The chunks `rank` (default: this rank) holds, ascending: its shard's order."""
        return self._chunks_of[self.rank if rank is None else rank]

    @cached_property
    def _chunks_of(self) -> tuple[tuple[int, ...], ...]:
        held: list[list[int]] = [[] for _ in range(self.world_size)]
        for c, r in enumerate(self.owner):
            held[r].append(c)
        return tuple(tuple(h) for h in held)

    @cached_property
    def visits(self) -> torch.Tensor:
        """bool [num_chunks, num_chunks]: query chunk i visits a tile of key chunk j for some kernel."""
        result = torch.zeros((self.num_chunks, self.num_chunks), dtype=torch.bool)
        for census, _ in self.censuses:
            result |= census.visits()
        return result

    def kv_chunks(self, q_chunk: int) -> tuple[int, ...]:
        """The key chunks query chunk `q_chunk` visits (for some kernel), ascending."""
        return tuple(self.visits[q_chunk].nonzero().flatten().tolist())

    def own_kv_chunks(self, q_chunk: int) -> tuple[int, ...]:
        """The key chunks query chunk `q_chunk`'s owner computes it against: those it visits that no
        `Part` of it covers, ascending (all of `kv_chunks` for a chunk that is not split)."""
        covered = {j for part in self.parts_of(q_chunk) for j in part.kv_chunks}
        return tuple(j for j in self.kv_chunks(q_chunk) if j not in covered)

    def parts_of(self, q_chunk: int) -> tuple[Part, ...]:
        """The parts of query chunk `q_chunk` computed elsewhere, by ascending helper."""
        return self._parts_by_chunk.get(q_chunk, ())

    def helps(self, rank: int | None = None) -> tuple[Part, ...]:
        """The parts `rank` (default: this rank) computes for other ranks, by ascending query chunk."""
        me = self.rank if rank is None else rank
        return tuple(p for p in self.parts if p.helper == me)

    def q_receives(self, rank: int | None = None) -> dict[int, tuple[int, ...]]:
        """The query chunks `rank` (default: this rank) receives to compute their parts, by owner."""
        by_owner: dict[int, list[int]] = {}
        for part in self.helps(rank):
            by_owner.setdefault(self.owner[part.q_chunk], []).append(part.q_chunk)
        return {r: tuple(cs) for r, cs in sorted(by_owner.items())}

    def q_sends(self, rank: int | None = None) -> dict[int, tuple[int, ...]]:
        """The query chunks `rank` (default: this rank) sends to the helpers of their parts, by helper."""
        me = self.rank if rank is None else rank
        by_helper: dict[int, list[int]] = {}
        for part in self.parts:
            if self.owner[part.q_chunk] == me:
                by_helper.setdefault(part.helper, []).append(part.q_chunk)
        return {r: tuple(cs) for r, cs in sorted(by_helper.items())}

    @cached_property
    def _parts_by_chunk(self) -> dict[int, tuple[Part, ...]]:
        result: dict[int, list[Part]] = {}
        for part in self.parts:
            result.setdefault(part.q_chunk, []).append(part)
        return {c: tuple(ps) for c, ps in result.items()}

    def receives(self, rank: int | None = None) -> dict[int, tuple[int, ...]]:
        """The key/value chunks `rank` (default: this rank) must receive, by the rank holding them:
        those its query chunks (`own_kv_chunks`) and its parts visit and it does not hold; ranks it
        needs nothing from are absent."""
        return self._receives[self.rank if rank is None else rank]

    def sends(self, rank: int | None = None) -> dict[int, tuple[int, ...]]:
        """The chunks `rank` (default: this rank) must send, by the rank receiving them."""
        me = self.rank if rank is None else rank
        return {r: got[me] for r, got in enumerate(self._receives) if me in got}

    @cached_property
    def _receives(self) -> tuple[dict[int, tuple[int, ...]], ...]:
        result = []
        for r in range(self.world_size):
            mine = list(self.chunks(r))
            needed = self.visits[mine].any(0) if mine else torch.zeros(self.num_chunks, dtype=torch.bool)
            if self.parts:  # split chunks: the keys of the owner's own work and of the parts it helps
                needed = needed.clone()
                needed[[j for c in mine for j in self.kv_chunks(c)]] = False
                for c in mine:
                    needed[list(self.own_kv_chunks(c))] = True
                for part in self.helps(r):
                    needed[list(part.kv_chunks)] = True
            by_owner: dict[int, list[int]] = {}
            for c in needed.nonzero().flatten().tolist():
                if self.owner[c] != r:
                    by_owner.setdefault(self.owner[c], []).append(c)
            result.append({src: tuple(cs) for src, cs in sorted(by_owner.items())})
        return tuple(result)

    def token_index(self, rank: int | None = None) -> torch.Tensor:
        """The positions of `rank`'s (default: this rank's) tokens in its shard's order, int64."""
        chunks = torch.tensor(self.chunks(rank), dtype=torch.int64)
        return (chunks.reshape(-1, 1) * self.chunk + torch.arange(self.chunk)).reshape(-1)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a full tensor (the sequence along dim -2, e.g. [B, H, L, D])."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-2] != self.seq_len:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(
                f"shard takes a tensor with the sequence ({self.seq_len} tokens) along dim -2, got {shape}",
                None,
            )
        return x.index_select(-2, self.token_index().to(x.device))

    def assemble(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor, original order, from every rank's shard (`shards[r]` from rank r): what
        `unshard` does once it has gathered them; usable without a process group (tests, tools)."""
        if len(shards) != self.world_size:
            raise InputError(
                f"assemble takes {self.world_size} shards (one per rank), got {len(shards)}", None
            )
        for r, piece in enumerate(shards):
            self._check_shard(piece, r)
        order = torch.cat([self.token_index(r) for r in range(self.world_size)])
        pieces = torch.cat(list(shards), dim=-2)
        out = torch.empty_like(pieces)
        out.index_copy_(-2, order.to(pieces.device), pieces)
        return out

    def unshard(self, x_loc: torch.Tensor) -> torch.Tensor:
        """The full tensor, original order, on every rank, from each rank's shard: an all_gather over
        the layout's process group (shards padded to the largest, cut back after)."""
        if self.group is None and not (dist.is_available() and dist.is_initialized()):
            raise InputError(
                "unshard needs a live torch.distributed process group; without one, gather the shards "
                "yourself and call layout.assemble(shards)",
                None,
            )
        self._check_shard(x_loc, self.rank)
        longest = max(len(c) for c in self._chunks_of) * self.chunk
        padded = torch.zeros(
            (*x_loc.shape[:-2], longest, x_loc.shape[-1]), dtype=x_loc.dtype, device=x_loc.device
        )
        padded[..., : x_loc.shape[-2], :] = x_loc
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.detach().contiguous(), group=self.group)
        # This rank's own rows keep their autograd history: a loss over the whole tensor, computed alike
        # on every rank, then gives each rank the gradient of its own shard (the other ranks' rows are
        # theirs to differentiate), as the loss over the shard would.
        gathered[self.rank] = padded
        return self.assemble([g[..., : len(self.chunks(r)) * self.chunk, :] for r, g in enumerate(gathered)])

    def _check_shard(self, piece: torch.Tensor, rank: int) -> None:
        expected = len(self.chunks(rank)) * self.chunk
        if not isinstance(piece, torch.Tensor) or piece.dim() < 2 or piece.shape[-2] != expected:
            shape = list(piece.shape) if isinstance(piece, torch.Tensor) else type(piece).__name__
            raise InputError(
                f"rank {rank}'s shard must hold {expected} tokens ({len(self.chunks(rank))} chunks of "
                f"{self.chunk}) along dim -2, got {shape}",
                None,
            )

    def loads(self) -> tuple[list[float], list[float]]:
        """Each rank's forward and backward cost: its query chunks', less their parts computed
        elsewhere, plus the parts it computes for others."""
        forward = [sum(self.forward[c] for c in self.chunks(r)) for r in range(self.world_size)]
        backward = [sum(self.backward[c] for c in self.chunks(r)) for r in range(self.world_size)]
        for part in self.parts:
            owner = self.owner[part.q_chunk]
            forward[owner] -= part.forward
            backward[owner] -= part.backward
            forward[part.helper] += part.forward
            backward[part.helper] += part.backward
        return forward, backward

    def stats(
        self, head_dim: int = 128, dtype: torch.dtype = torch.bfloat16, kv_heads: int | None = None
    ) -> list[dict[str, float | int]]:
        """Per rank: `forward_cost` and `backward_cost` (tile-weighted, `CostModel`; a `Part` counts on
        its helper, not on the chunk's owner), `chunks_held`, `chunks_received` (key/value chunks),
        `query_chunks_received` (to compute parts), `partials_received` (parts' outputs) and
        `bytes_received`: the K and V rows of the received chunks (`batch` rows, `kv_heads` heads,
        default `num_heads`, of `head_dim` elements of `dtype`), the Q rows of the received query
        chunks (`num_heads` heads), and per partial its output and lse rows in float32 (`head_dim + 1`
        values per row and head: what `cp(...)` sends)."""
        heads = self.num_heads if kv_heads is None else kv_heads
        size = torch.empty((), dtype=dtype).element_size()
        chunk_bytes = 2 * self.batch * heads * self.chunk * head_dim * size
        q_bytes = self.batch * self.num_heads * self.chunk * head_dim * size
        partial_bytes = self.batch * self.num_heads * self.chunk * (head_dim + 1) * 4
        forward, backward = self.loads()
        result = []
        for r in range(self.world_size):
            mine = self.chunks(r)
            received = sum(len(cs) for cs in self.receives(r).values())
            queries = len(self.helps(r))
            partials = sum(len(self.parts_of(c)) for c in mine)
            result.append(
                {
                    "rank": r,
                    "forward_cost": forward[r],
                    "backward_cost": backward[r],
                    "chunks_held": len(mine),
                    "chunks_received": received,
                    "query_chunks_received": queries,
                    "partials_received": partials,
                    "bytes_received": received * chunk_bytes + queries * q_bytes + partials * partial_bytes,
                }
            )
        return result
