"""Attention over a context-parallel layout: `ContextParallel.__call__` (issue 22 item 2;
`docs/distributed.md`, "cp(q_loc, k_loc, v_loc, layout)").

Each rank holds the query, key and value rows of its chunks (`Layout.shard`). A call

1. checks its arguments on every rank and compares them across ranks in one `all_gather_object`, so
   that a wrong shard, a layout of another group or inputs that differ raise the same `InputError` on
   every rank before any tensor moves (a rank that raised alone would leave the others in a collective);
2. starts the key/value exchange (`batch_isend_irecv`: each rank sends exactly `Layout.sends`, receives
   exactly `Layout.receives`, one message per peer holding K then V of its chunks), computes the query
   chunks whose keys are all local while the messages travel, waits, and computes the others;
3. computes each query chunk with `Kernel.chunk` over each run of consecutive visited key chunks
   (positions are the whole sequence's) and merges a chunk's partials by their lse, in float32, in
   ascending key order.

A split query chunk (`Layout.parts`) travels, as Q rows in the same message as the K/V chunks, to each
helper, which computes its part over its key chunks and returns the part's output and lse in a second
round of sends and receives; the owner merges its own runs (ascending key) then the parts (ascending
helper).

The backward is one `autograd.Function` over the whole exchange, so that every rank runs its collectives
in one fixed order: where the layout has parts, the owners' gradients of the parts' outputs and lse
(through the merge) go to the helpers; then the local gradients (autograd through the forward's graph,
the helpers' parts included), then the reverse exchange (the dK/dV partials of received chunks, and the
dQ of received query chunks, go back to their owners, which add them in ascending rank order), then one
`all_reduce` (sum) of the gradients of float inputs, which every rank holds whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from attnc.api import Kernel
from attnc.distributed.fingerprint import fingerprint, mask_key
from attnc.distributed.layout import Layout
from attnc.errors import AttnError, InputError
from attnc.runtime.launch import merge_splits


@dataclass(frozen=True)
class Call:
    """What one `cp(...)` call does on this rank: the layout, the kernel and its arguments besides the
    tensors that autograd tracks (`grad_names`: the float inputs passed as tensors to the Function)."""

    kern: Kernel
    layout: Layout
    group: Any
    scale: float | None
    inputs: Mapping[str, Any]
    grad_names: tuple[str, ...]
    # Whether the backward may run (grad mode on and some tensor needs a gradient): only then does the
    # forward keep its local graph.
    differentiable: bool

    def peer(self, rank: int) -> int:
        """The global rank of `rank` of the group (what P2POp takes)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


def attention(
    kern: Kernel,
    group: Any,
    world_size: int,
    rank: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float | None,
    inputs: Mapping[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's output and lse over `layout` (module docstring); `inputs` are the whole sequence's,
    the same on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            "cp(...) needs a live torch.distributed process group (dist.init_process_group)", None
        )
    problem = _local_problem(kern, world_size, rank, q, k, v, layout, scale, inputs)
    grad_names = tuple(
        sorted(
            name
            for name, value in inputs.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad
        )
    )
    # What must be equal everywhere: the layout, the kernel, the tensors' shapes but for the local
    # length, which tensors need gradients (and grad mode: the backward is collective), the inputs.
    agreed = None  # a rank with a problem only reports it: its arguments may not even be tensors
    if problem is None:
        agreed = (
            (layout.seq_len, layout.chunk, layout.world_size, layout.owner, layout.batch, layout.num_heads),
            repr(kern),
            [(t.dtype, t.shape[:-2], t.shape[-1], t.requires_grad) for t in (q, k, v)],
            grad_names,
            torch.is_grad_enabled(),
            scale,
            fingerprint(dict(inputs)),
        )
    # Whether the layout exchanges what this call's mask visits (`Layout.masks`): another kernel,
    # window or document ids would silently miss keys. Reported after the comparison across ranks, so
    # that inputs differing between ranks are named as such.
    other_mask = (
        problem is None
        and layout.masks is not None
        and mask_key(kern.pattern, *kern._split(dict(inputs))) not in layout.masks
    )
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, (problem, fingerprint(agreed), other_mask), group=group)
    errors = [f"rank {r}: {p}" for r, (p, _, _) in enumerate(gathered) if p is not None]
    if errors:
        raise InputError("cp(...) arguments rejected on " + "; ".join(errors), None)
    differing = [r for r, (_, f, _) in enumerate(gathered) if f != gathered[0][1]]
    if differing:
        raise InputError(
            f"cp(...) was called with another layout, kernel, tensor shape or dtype, gradient flags or "
            f"inputs on rank(s) {differing} than on rank 0: every rank must pass the same",
            None,
        )
    if any(m for _, _, m in gathered):
        raise InputError(
            f"cp(...) on rank(s) {[r for r, (_, _, m) in enumerate(gathered) if m]}: the layout was "
            "dispatched for another kernel, or other inputs or runtime parameters of its mask, than this "
            "call's: pass cp(...) what decides the mask as given to cp.dispatch, or dispatch again "
            "(another mask visits chunks the layout does not exchange)",
            None,
        )
    tracked = [inputs[name] for name in grad_names]
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *tracked))
    call = Call(kern, layout, group, scale, dict(inputs), grad_names, differentiable)
    out, lse = _Exchange.apply(call, q, k, v, *tracked)
    return out, lse


def _local_problem(
    kern: Kernel,
    world_size: int,
    rank: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float | None,
    inputs: Mapping[str, Any],
) -> str | None:
    """Why this rank's arguments cannot run (one line), or None: checked before any collective but
    the one that shares the verdicts, so that every rank raises alike."""
    if not isinstance(layout, Layout):
        return f"the layout must be a Layout from cp.dispatch, got {type(layout).__name__}"
    if layout.world_size != world_size:
        return f"the layout is for {layout.world_size} ranks, but the process group has {world_size}"
    if layout.rank != rank:
        return f"the layout was made on rank {layout.rank}, but this process is rank {rank}"
    try:
        kern._check_qkv(q, k, v)
        kern._check_one_kernel_dtype(q=q, k=k, v=v)
        expected = len(layout.chunks()) * layout.chunk
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[2] != expected:
                return (
                    f"{name} holds {t.shape[2]} tokens along dim -2, but the layout gives this rank "
                    f"{expected} ({len(layout.chunks())} chunks of {layout.chunk}): pass layout.shard of "
                    f"the whole tensor (context parallel is self-attention: one length for q, k and v)"
                )
        if q.shape[0] != layout.batch or q.shape[1] != layout.num_heads:
            return (
                f"q has batch {q.shape[0]} and {q.shape[1]} heads, but the layout was dispatched for "
                f"batch={layout.batch}, num_heads={layout.num_heads}"
            )
        inputs_, params = kern._split(dict(inputs))
        kern._env(
            q.shape[2], k.shape[2], q.shape[0], q.shape[1], inputs_, params, q.device, 0,
            (0, layout.seq_len, layout.seq_len),
        )  # fmt: skip
        kern._check_input_grads(inputs_)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
            return f"scale must be a number, got {scale!r}"
    except AttnError as error:
        return error.reason if error.loc is None else f"{error.loc}: {error.reason}"
    return None


def _p2p(
    call: Call, sends: Sequence[tuple[int, torch.Tensor]], receives: Sequence[tuple[int, torch.Tensor]]
) -> list[Any]:
    """Start one batch of sends and receives (empty: none); the caller waits on the works."""
    ops = [dist.P2POp(dist.isend, t, call.peer(r), call.group) for r, t in sends]
    ops += [dist.P2POp(dist.irecv, t, call.peer(r), call.group) for r, t in receives]
    return dist.batch_isend_irecv(ops) if ops else []


def _slots(layout: Layout, chunks: Sequence[int], held: Sequence[int]) -> list[int]:
    """The token positions, in a shard of `held` chunks, of `chunks` (each held), concatenated."""
    where = {c: i for i, c in enumerate(held)}
    return [where[c] * layout.chunk + t for c in chunks for t in range(layout.chunk)]


class _Exchange(torch.autograd.Function):
    """The key/value exchange and the attention of this rank's query chunks, forward and backward
    (module docstring). The forward keeps the local autograd graph (over detached leaves) that the
    backward differentiates."""

    @staticmethod
    def forward(
        ctx: Any, call: Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *tracked: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layout = call.layout
        held = layout.chunks()
        receives, sends = layout.receives(), layout.sends()
        q_receives, q_sends = layout.q_receives(), layout.q_sends()
        # One message per peer: K then V of the key chunks it needs from us, then Q of the query chunks
        # whose parts it computes, flattened.
        outgoing = []
        for r in sorted(set(sends) | set(q_sends)):
            kv_slots = _slots(layout, sends.get(r, ()), held)
            outgoing.append(
                (r, _pack((k, v, q), (kv_slots, kv_slots, _slots(layout, q_sends.get(r, ()), held))))
            )
        shapes = (list(k.shape), list(v.shape), list(q.shape))
        incoming = []
        for r in sorted(set(receives) | set(q_receives)):
            rows = _rows_of(layout, receives.get(r, ()), q_receives.get(r, ()))
            incoming.append((r, torch.empty(_size(shapes, rows), dtype=k.dtype, device=k.device)))
        works = _p2p(call, outgoing, incoming)
        # Whether the received messages need gradients: they go back to their senders (dK, dV, and dQ
        # of the query chunks sent for parts).
        reverse = call.differentiable and (
            k.requires_grad or v.requires_grad or (q.requires_grad and bool(layout.parts))
        )
        with torch.set_grad_enabled(call.differentiable):
            leaves = [
                t.detach().requires_grad_(t.requires_grad and call.differentiable)
                for t in (q, k, v, *tracked)
            ]
            q_leaf, k_leaf, v_leaf = leaves[:3]
            inputs = dict(call.inputs)
            inputs.update(zip(call.grad_names, leaves[3:], strict=True))
            sources: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {
                c: (k_leaf, v_leaf, i) for i, c in enumerate(held)
            }
            whole = [i for i, c in enumerate(held) if not layout.parts_of(c)]
            local = [i for i in whole if all(j in sources for j in layout.kv_chunks(held[i]))]
            outs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            # Overlap: the query chunks whose keys are all here run while the messages travel.
            for i in local:
                outs[i] = _query_chunk(call, q_leaf, held[i], i, sources, inputs, v.shape[3])
            for work in works:
                work.wait()
            received = []
            q_sources: dict[int, tuple[torch.Tensor, int]] = {}
            for r, buffer in incoming:
                chunks, q_chunks = receives.get(r, ()), q_receives.get(r, ())
                leaf = buffer.requires_grad_(reverse)
                received.append(leaf)
                k_part, v_part, q_part = _unpack(leaf, shapes, _rows_of(layout, chunks, q_chunks))
                sources.update({c: (k_part, v_part, n) for n, c in enumerate(chunks)})
                q_sources.update({c: (q_part, n) for n, c in enumerate(q_chunks)})
            # The parts this rank computes for others: their output and lse go back to the owners.
            by_owner: dict[int, list[torch.Tensor]] = {}
            for part in layout.helps():
                q_part, n = q_sources[part.q_chunk]
                rows = q_part[:, :, n * layout.chunk : (n + 1) * layout.chunk]
                runs = _runs(call, rows, part.q_chunk, part.kv_chunks, sources, inputs)
                # Sent in float32, as merged: the owner merges again, without a narrower round trip.
                part_out, part_lse = _merge(runs, rows, v.shape[3], narrow=False)
                packed = torch.cat([part_out.float().reshape(-1), part_lse.float().reshape(-1)])
                by_owner.setdefault(layout.owner[part.q_chunk], []).append(packed)
            # One message per owner: its parts' output then lse, by ascending query chunk.
            helped = [(r, torch.cat(pieces)) for r, pieces in sorted(by_owner.items())]
            partial_in = []
            for r, q_chunks in sorted(_helpers_of(layout, held).items()):
                size = len(q_chunks) * _partial_numel(q, v, layout.chunk)
                partial_in.append((r, torch.empty(size, dtype=torch.float32, device=q.device)))
            partial_works = _p2p(call, [(r, t.detach()) for r, t in helped], partial_in)
            for i, c in enumerate(held):
                if i not in outs and not layout.parts_of(c):
                    outs[i] = _query_chunk(call, q_leaf, c, i, sources, inputs, v.shape[3])
            own = {
                i: _runs(call, _rows(q_leaf, i, layout.chunk), c, layout.own_kv_chunks(c), sources, inputs)
                for i, c in enumerate(held)
                if layout.parts_of(c)
            }
            for work in partial_works:
                work.wait()
            partial_leaves = [t.requires_grad_(call.differentiable) for _, t in partial_in]
            remote: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for (r, _), leaf in zip(partial_in, partial_leaves, strict=True):
                for n, c in enumerate(_helpers_of(layout, held)[r]):
                    remote.setdefault(c, []).append(_unpack_partial(leaf, n, q, v, layout.chunk))
            for i, runs in own.items():
                # Fixed order: the owner's runs by ascending key, then the parts by ascending helper.
                rows = _rows(q_leaf, i, layout.chunk)
                out_i, lse_i = _merge([*runs, *remote[held[i]]], rows, v.shape[3])
                outs[i] = (out_i.to(q.dtype), lse_i)
            if held:
                out = torch.cat([outs[i][0] for i in range(len(held))], dim=2)
                lse = torch.cat([outs[i][1] for i in range(len(held))], dim=2)
            else:
                out = q_leaf.new_zeros((*q.shape[:3], v.shape[3]))
                lse = q_leaf.new_zeros(q.shape[:3], dtype=torch.float32)
        ctx.call = call
        ctx.graph = (
            out,
            lse,
            leaves,
            received,
            incoming,
            shapes,
            reverse,
            helped,
            partial_in,
            partial_leaves,
        )
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call: Call = ctx.call
        layout = call.layout
        if torch.is_grad_enabled():  # create_graph=True: the gradients would silently be constants
            raise InputError(
                "cp(...) does not support double backward (create_graph=True): its gradients are not "
                "differentiable",
                None,
            )
        if not hasattr(ctx, "graph"):  # every rank alike: no collective has started
            raise InputError(
                "cp(...)'s backward ran a second time (backward(retain_graph=True) twice): its graph is "
                "differentiated once; call cp(...) again for another backward",
                None,
            )
        out, lse, leaves, received, incoming, shapes, reverse, helped, partial_in, partial_leaves = ctx.graph
        del ctx.graph  # the graph is differentiated once
        outputs, grad_outputs = [out, lse], [grad_out, grad_lse]
        if layout.parts:
            # The gradients of the partial outputs received go back to the helpers that computed them
            # (through the merge only: autograd visits no kernel here), theirs come from the owners.
            d_partials = [torch.zeros_like(t) for t in partial_leaves]
            merged = [i for i, t in enumerate((out, lse)) if t.grad_fn is not None]
            if partial_leaves and merged:
                got = torch.autograd.grad(
                    [(out, lse)[i] for i in merged],
                    partial_leaves,
                    [(grad_out, grad_lse)[i] for i in merged],
                    retain_graph=True,
                    allow_unused=True,
                )
                d_partials = [g if g is not None else d for g, d in zip(got, d_partials, strict=True)]
            d_helped = [(r, torch.empty_like(t)) for r, t in helped]
            back = [(r, d) for (r, _), d in zip(partial_in, d_partials, strict=True)]
            for work in _p2p(call, back, d_helped):
                work.wait()
            outputs += [t for _, t in helped]
            grad_outputs += [d for _, d in d_helped]
        keep = [i for i, t in enumerate(outputs) if t.grad_fn is not None]
        wanted = [t for t in (*leaves, *received) if t.requires_grad]
        grads: dict[int, torch.Tensor] = {}
        if wanted and keep:
            got = torch.autograd.grad(
                [outputs[i] for i in keep], wanted, [grad_outputs[i] for i in keep], allow_unused=True
            )
            grads = {id(t): g for t, g in zip(wanted, got, strict=True) if g is not None}
        full = [grads.get(id(t), torch.zeros_like(t)) if t.requires_grad else None for t in leaves]
        dq, dk, dv = full[:3]
        if reverse:
            # The reverse exchange: the gradient of what we received goes back to its sender.
            back = [
                (r, grads.get(id(t), torch.zeros_like(t)))
                for (r, _), t in zip(incoming, received, strict=True)
            ]
            held = layout.chunks()
            sends, q_sends = layout.sends(), layout.q_sends()
            arriving = []
            for r in sorted(set(sends) | set(q_sends)):
                chunks, q_chunks = sends.get(r, ()), q_sends.get(r, ())
                size = _size(shapes, _rows_of(layout, chunks, q_chunks))
                arriving.append(
                    (r, torch.empty(size, dtype=leaves[1].dtype, device=leaves[1].device), chunks, q_chunks)
                )
            for work in _p2p(call, back, [(r, t) for r, t, _, _ in arriving]):
                work.wait()
            # Ascending rank order: the same sum, run after run; in float32 where the tensor is narrower.
            sums = {}
            for name, grad in (("q", dq), ("k", dk), ("v", dv)):
                if grad is not None:
                    sums[name] = grad.to(torch.promote_types(grad.dtype, torch.float32))
            for _, buffer, chunks, q_chunks in arriving:
                k_part, v_part, q_part = _unpack(buffer, shapes, _rows_of(layout, chunks, q_chunks))
                for name, part, slots in (
                    ("k", k_part, chunks),
                    ("v", v_part, chunks),
                    ("q", q_part, q_chunks),
                ):
                    if name in sums and slots:
                        index = torch.tensor(_slots(layout, slots, held), device=buffer.device)
                        sums[name] = sums[name].index_add(2, index, part.to(sums[name].dtype))
            dq, dk, dv = (
                sums[n].to(g.dtype) if g is not None else None for n, g in (("q", dq), ("k", dk), ("v", dv))
            )
        tracked = full[3:]
        if tracked:
            # Every rank holds the whole gradient of a replicated float input: the sum of the ranks'.
            flat = torch.cat([g.reshape(-1).to(torch.float64) for g in tracked])
            dist.all_reduce(flat, group=call.group)
            pieces = flat.split([g.numel() for g in tracked])
            tracked = [p.reshape(g.shape).to(g.dtype) for p, g in zip(pieces, tracked, strict=True)]
        return (
            None,
            dq,
            dk if leaves[1].requires_grad else None,
            dv if leaves[2].requires_grad else None,
            *tracked,
        )


def _query_chunk(
    call: Call,
    q: torch.Tensor,
    q_chunk: int,
    slot: int,
    sources: Mapping[int, tuple[torch.Tensor, torch.Tensor, int]],
    inputs: Mapping[str, Any],
    v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and lse of one query chunk (at `slot` of this rank's shard) over the key chunks it
    visits: one `Kernel.chunk` per run of consecutive chunks, merged by lse in ascending order."""
    q_rows = _rows(q, slot, call.layout.chunk)
    return _merge(
        _runs(call, q_rows, q_chunk, call.layout.kv_chunks(q_chunk), sources, inputs), q_rows, v_dim
    )


def _runs(
    call: Call,
    q_rows: torch.Tensor,
    q_chunk: int,
    kv_chunks: Sequence[int],
    sources: Mapping[int, tuple[torch.Tensor, torch.Tensor, int]],
    inputs: Mapping[str, Any],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output, lse) of query chunk `q_chunk` (its rows `q_rows`) over each run of consecutive chunks
    of `kv_chunks` (ascending), one `Kernel.chunk` each."""
    layout, size = call.layout, call.layout.chunk
    runs: list[list[int]] = []
    for j in kv_chunks:
        if runs and runs[-1][-1] == j - 1:
            runs[-1].append(j)
        else:
            runs.append([j])
    parts = []
    for run in runs:
        k_run = torch.cat([_rows(sources[j][0], sources[j][2], size) for j in run], dim=2)
        v_run = torch.cat([_rows(sources[j][1], sources[j][2], size) for j in run], dim=2)
        parts.append(
            call.kern.chunk(
                q_rows, k_run, v_run, q_offset=q_chunk * size, kv_offset=run[0] * size,
                q_len=layout.seq_len, kv_len=layout.seq_len, scale=call.scale, return_lse=True,
                **inputs,
            )
        )  # fmt: skip
    return parts


def _merge(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]], q_rows: torch.Tensor, v_dim: int, narrow: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (output, lse) from partials over disjoint keys, merged by lse in their order in float32 (the
    output in the first partial's dtype where `narrow`, else as merged); none: output 0 and lse -inf
    (as the kernel gives)."""
    if not parts:  # a query chunk that sees no key
        out = q_rows.new_zeros((*q_rows.shape[:3], v_dim))
        return out, torch.full(q_rows.shape[:3], -float("inf"), dtype=torch.float32, device=q_rows.device)
    if len(parts) == 1:
        return parts[0]
    out, lse = merge_splits(
        torch.stack([p[0].float() for p in parts]), torch.stack([p[1].float() for p in parts])
    )
    return (out.to(parts[0][0].dtype) if narrow else out), lse


def _helpers_of(layout: Layout, held: Sequence[int]) -> dict[int, list[int]]:
    """This rank's query chunks with parts, by the helper computing a part of them (ascending both)."""
    result: dict[int, list[int]] = {}
    for c in held:
        for part in layout.parts_of(c):
            result.setdefault(part.helper, []).append(c)
    return result


def _partial_numel(q: torch.Tensor, v: torch.Tensor, rows: int) -> int:
    """Elements of one part's message: output then lse of `rows` query rows."""
    return q.shape[0] * q.shape[1] * rows * (v.shape[3] + 1)


def _unpack_partial(
    buffer: torch.Tensor, n: int, q: torch.Tensor, v: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n`-th part's (output, lse), float32, of a message of parts."""
    b, h, d = q.shape[0], q.shape[1], v.shape[3]
    piece = buffer[n * _partial_numel(q, v, rows) : (n + 1) * _partial_numel(q, v, rows)]
    return piece[: b * h * rows * d].reshape(b, h, rows, d), piece[b * h * rows * d :].reshape(b, h, rows)


def _rows(t: torch.Tensor, slot: int, size: int) -> torch.Tensor:
    return t[:, :, slot * size : (slot + 1) * size]


def _rows_of(layout: Layout, kv_chunks: Sequence[int], q_chunks: Sequence[int]) -> tuple[int, int]:
    """Rows of a message: of K and V each, and of Q."""
    return len(kv_chunks) * layout.chunk, len(q_chunks) * layout.chunk


def _numel(shape: Sequence[int], rows: int) -> int:
    return shape[0] * shape[1] * rows * shape[3]


def _size(shapes: Sequence[Sequence[int]], rows: tuple[int, int]) -> int:
    """Elements of a message of K, V (`rows[0]` rows each) and Q (`rows[1]`) rows; `shapes`: k, v, q."""
    return _numel(shapes[0], rows[0]) + _numel(shapes[1], rows[0]) + _numel(shapes[2], rows[1])


def _pack(tensors: Sequence[torch.Tensor], slots: Sequence[list[int]]) -> torch.Tensor:
    """The rows `slots[i]` of each of `tensors`, flattened one after the other."""
    pieces = []
    for t, rows in zip(tensors, slots, strict=True):
        if rows:
            pieces.append(t.index_select(2, torch.tensor(rows, device=t.device)).reshape(-1))
    return torch.cat(pieces)


def _unpack(
    buffer: torch.Tensor, shapes: Sequence[Sequence[int]], rows: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V and Q rows of a message (`_size`)."""
    pieces = []
    start = 0
    for shape, n in zip(shapes, (rows[0], rows[0], rows[1]), strict=True):
        size = _numel(shape, n)
        pieces.append(buffer[start : start + size].reshape(shape[0], shape[1], n, shape[3]))
        start += size
    return pieces[0], pieces[1], pieces[2]
