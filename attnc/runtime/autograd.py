"""`kern(q, k, v)` as PyTorch operators: `attnc::attention` and `attnc::attention_backward` (and
`attnc::raise_error`, a call's argument error in a compiled graph).

Both are `torch.library` custom ops with fake (meta) implementations, and the first has the second as
its autograd formula, so `torch.compile(..., fullgraph=True)` traces through a model that calls attnc
without a graph break, and AOT autograd sees the backward as one opaque op too.

A custom op takes tensors and plain values only, so a compiled pattern is named by its IR text
(`runtime/registry.py`): the ops find its kernels by that text, or compile them on first use in a
process that loaded a program `torch.export` saved (after `import attnc`, which registers the ops). The
pattern's `input` tensors travel as one list in declaration order, its runtime parameter values as two
(`int_params`, a `SymInt[]`, and `float_params`, a float64 CPU tensor), each in the pattern's parameter
order: an int value that changes between calls of a `torch.compile`d function becomes dynamic, one graph
for all later values; a float given as a 0-d CPU tensor is a graph input, one graph for all values (a
Python float is specialised, one graph per value, as dynamo does for a float passed to a custom op).
Gradients:

- q, k, v: always (the dK/dV kernel sums the query heads that share a key/value head);
- a float input the score reads (a bias table, a slope, a temperature): when it requires grad;
- the lse (with `return_lse=True`): its gradient joins the softmax's (d lse / d score = P).

Reverse mode, once. The kernels have no forward-mode formula (a tangent of a score function needs
its derivative inside the forward kernel), so `torch.func.jvp`, `jacfwd` and `forward_ad` raise
`check_no_forward_ad`'s error rather than drop the tangent; and the backward op's own gradient raises,
so double backward (`create_graph=True`, `gradgradcheck`) says that the kernels are differentiable once.

PyTorch's conventions: under `torch.autocast` the forward op runs q, k, v in the autocast dtype (an
autocast kernel of the op, `_autocast_rule`); under `torch.use_deterministic_algorithms(True)` the
backward op refuses, on the GPU, the input gradients it can only sum with atomics
(`check_deterministic`).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from attnc import config, oracle
from attnc.errors import LOCATED_ERRORS, InputError, Loc
from attnc.ir.nodes import PatternIR, Type
from attnc.runtime import backend, registry
from attnc.runtime.launch import Forward, empty_like_strides

FORWARD_AD_UNSUPPORTED = (
    "attnc kernels support reverse-mode autograd only; forward-mode AD (torch.func.jvp, jacfwd, "
    "torch.autograd.forward_ad) is not implemented"
)
DOUBLE_BACKWARD_UNSUPPORTED = (
    "attnc kernels are differentiable once: their backward has no gradient (double backward, "
    "create_graph=True through attnc, gradgradcheck and hessians are not supported)"
)


def check_no_forward_ad(tensors: list[Tensor]) -> None:
    """Raise if any tensor carries a forward-mode tangent: the custom op would drop it and return a
    silently zero tangent (its autograd rule is reverse mode only)."""
    if torch.compiler.is_compiling():
        # Dynamo's fake tensors carry no tangent to look at. Known gap: forward_ad through a
        # torch.compile'd function that calls attnc still drops the tangent, in the custom op.
        return
    for t in tensors:
        if forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(FORWARD_AD_UNSUPPORTED)


# The ops' `float_params` of a pattern with no float parameter (never written to: one serves every call).
NO_FLOAT_PARAMS = torch.empty(0, dtype=torch.float64)


def param_lists(pattern: PatternIR, values: dict[str, Any]) -> tuple[list[int], Tensor]:
    """A compiled pattern's runtime parameter values (its `params`) as the ops take them: the ints, then
    the floats as one float64 CPU tensor (exact), each in parameter order. A float given as a 0-d
    tensor (under `torch.compile`: `api._float_tensor_param`) stays a tensor, so the graph takes it as
    an input; a Python float is made a tensor here (dynamo specialises it either way)."""
    ints = [values[d.name] for d in pattern.params if d.type is Type.INT]
    floats = [values[d.name] for d in pattern.params if d.type is Type.FLOAT]
    if not floats:
        return ints, NO_FLOAT_PARAMS
    return ints, torch.stack(
        [
            v.detach().to(torch.float64)
            if isinstance(v, Tensor)
            else torch.scalar_tensor(v, dtype=torch.float64)
            for v in floats
        ]
    )


def _params(pattern: PatternIR, int_params: list[int], float_params: Tensor) -> dict[str, int | float]:
    """`param_lists` undone: the runtime values by name, as `oracle.Env.params` holds them."""
    if float_params.dim() != 1 or float_params.dtype != torch.float64 or float_params.device.type != "cpu":
        raise InputError(
            f"float_params must be a 1-d float64 CPU tensor (autograd.param_lists), got a "
            f"{float_params.dim()}-d {str(float_params.dtype)[6:]} tensor on {float_params.device.type}",
            pattern.loc,
        )
    counts = [sum(d.type is t for d in pattern.params) for t in (Type.INT, Type.FLOAT)]
    if [len(int_params), float_params.numel()] != counts:
        raise InputError(
            f"the pattern has {counts[0]} int and {counts[1]} float runtime parameters (autograd."
            f"param_lists), got {len(int_params)} int_params and {float_params.numel()} float_params",
            pattern.loc,
        )
    ints, floats = iter(int_params), iter(float_params.tolist())
    return {d.name: next(ints) if d.type is Type.INT else next(floats) for d in pattern.params}


def _env(
    forward: Forward,
    q: Tensor,
    k: Tensor,
    inputs: list[Tensor],
    int_params: list[int],
    float_params: Tensor,
    sizes: tuple[int, int, int] | None = None,
    **geometry: Any,
) -> oracle.Env:
    """The op's arguments as an environment: sizes (batch, q_len, kv_len) from q and k unless given
    (packed sequences, paged caches), and `geometry`, `oracle.Env`'s offsets and per-row lengths."""
    names = [d.name for d in forward.pattern.inputs]
    batch, q_len, kv_len = (q.shape[0], q.shape[2], k.shape[2]) if sizes is None else sizes
    return oracle.Env(
        batch,
        q.shape[1],
        q_len,
        kv_len,
        q.device,
        dict(zip(names, inputs, strict=True)),
        params=_params(forward.pattern, int_params, float_params),
        **geometry,
    )


def _chunk(
    q_offset: int, q_offsets: Tensor | None, kv_offset: int, q_size: int, kv_size: int
) -> dict[str, Any]:
    """The op's offsets and sizes (-1: a size that follows from the offset and the rows) as
    `oracle.Env`'s fields."""
    return dict(
        q_offset=q_offset if q_offsets is None else q_offsets,
        kv_offset=kv_offset,
        q_size=None if q_size < 0 else q_size,
        kv_size=None if kv_size < 0 else kv_size,
    )


@torch.library.custom_op("attnc::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    inputs: list[Tensor],
    pattern: str,
    scale: float,
    int_params: list[int],
    float_params: Tensor,
    q_offset: int = 0,
    q_offsets: Tensor | None = None,
    kernel_options: list[int] | None = None,
    kv_rows: Tensor | None = None,
    block_table: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    kv_offset: int = 0,
    q_size: int = -1,
    kv_size: int = -1,
    return_max: bool = False,
    where: str = "",
) -> tuple[Tensor, Tensor]:
    """(out, lse) of the pattern whose IR text is `pattern` (arguments checked by `Kernel.__call__`,
    `Kernel.decode`, `Kernel.varlen` and `Kernel.chunk`).

    Positions: query row i of batch row b is position `q_offsets[b] + i` (an int tensor [B]), else
    `q_offset + i`; key row j is position `kv_offset + j`; the pattern's sizes are `q_size`/`kv_size`
    (-1: the offset plus the rows; other sizes: a chunk of a longer problem, `Kernel.chunk`).
    `kernel_options`: [BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT_KV, PACK_GQA], 0 where not given
    (`launch.with_options`). Decoding: `kv_rows` int32 or int64 [B], the valid key rows of each batch
    row, and `block_table` int32 [B, pages per row] for a paged cache k/v [pages, page size, Hkv, D].
    Packed sequences: q [1, Hq, Tq, D] and k/v [1, Hkv, Tk, D] (views of the packed tensors),
    `cu_seqlens_q`/`cu_seqlens_k` int32 or int64 [N + 1] and the longest lengths. With `return_max`,
    lse is [2, *lse's shape]: the lse and each query's largest score (`return_aux`; it has no gradient).

    The values of `kv_rows`, `block_table` and the cumulative lengths are checked here, where they are
    real tensors also under `torch.compile` (which traces the callers with fake ones), when they can be
    read without a device sync (`_readable`); `where` (`Loc.pack`) is the calling kernel's pattern, where
    the errors point (patterns of one structure share `pattern`)."""
    forward = registry.find(pattern)
    loc = Loc.unpack(where) if where else forward.pattern.loc
    if cu_seqlens_q is not None and cu_seqlens_k is not None:
        if _readable(cu_seqlens_q):
            check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[2], max_seqlen_q, loc)
            check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[2], max_seqlen_k, loc)
        cu_seqlens_q, cu_seqlens_k = (cu.to(torch.int32).contiguous() for cu in (cu_seqlens_q, cu_seqlens_k))
        env = _env(
            forward, q, k, inputs, int_params, float_params,
            sizes=(cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k),
            q_rows=cu_seqlens_q[1:] - cu_seqlens_q[:-1],
            kv_rows=cu_seqlens_k[1:] - cu_seqlens_k[:-1],
        )  # fmt: skip
        cu_seqlens = (cu_seqlens_q, cu_seqlens_k)
        return forward.run(q, k, v, env, scale, kernel_options, cu_seqlens=cu_seqlens, return_max=return_max)
    sizes = None if block_table is None else (q.shape[0], q.shape[2], block_table.shape[1] * k.shape[1])
    if kv_rows is not None:
        if _readable(kv_rows):
            capacity = k.shape[2] if sizes is None else sizes[2]
            check_cache(kv_rows, block_table, q.shape[2], capacity, k.shape[0], loc)
        kv_rows = kv_rows.to(torch.int32)
    geometry = _chunk(q_offset, q_offsets, kv_offset, q_size, kv_size)
    env = _env(forward, q, k, inputs, int_params, float_params, sizes, kv_rows=kv_rows, **geometry)
    return forward.run(q, k, v, env, scale, kernel_options, block_table, return_max=return_max)


def _readable(t: Tensor) -> bool:
    """Whether the op reads a tensor argument's values to check them: on the CPU (free), or on a device
    with `ATTNC_DEBUG=1` (a copy to the host and a sync: otherwise they are the caller's contract)."""
    return t.device.type == "cpu" or config.debug()


def check_cache(
    kv_rows: Tensor, table: Tensor | None, q_len: int, capacity: int, pages: int, loc: Loc
) -> None:
    """The values of `Kernel.decode`'s cache_seqlens (`kv_rows`) and block table."""
    values = kv_rows.tolist()
    for b, n in enumerate(values):
        if n < 0 or n > capacity or 0 < n < q_len:
            raise InputError(
                f"cache_seqlens[{b}] = {n}: each row holds 0 keys or from Lq={q_len} to the cache's "
                f"capacity {capacity}",
                loc,
            )
    if table is None:
        return
    page_size = capacity // max(table.shape[1], 1)
    for b, n in enumerate(values):
        used = table[b, : -(-n // page_size)]
        bad = (used < 0) | (used >= pages)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise InputError(
                f"block_table[{b}, {i}] = {int(used[i])} is not a page of the cache (it has {pages})", loc
            )


def check_cu_seqlens(name: str, cu: Tensor, total: int, longest: int, loc: Loc) -> None:
    """The values of `Kernel.varlen`'s cumulative lengths `name` of `total` packed rows, whose longest
    sequence the caller said is at most `longest` rows."""
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total:
        raise InputError(
            f"{name} must run from 0 to {total} (the packed rows), got {values[0]} to {values[-1]}", loc
        )
    lengths = [b - a for a, b in itertools.pairwise(values)]
    if any(n < 0 for n in lengths):
        raise InputError(f"{name} must not decrease, got {values}", loc)
    if lengths and max(lengths) > longest:
        wanted = "max_seqlen_q" if name.endswith("q") else "max_seqlen_k"
        raise InputError(f"{wanted}={longest} is below the longest sequence ({max(lengths)})", loc)


@attention.register_fake
def _attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    inputs: list[Tensor],
    pattern: str,
    scale: float,
    int_params: list[int],
    float_params: Tensor,
    q_offset: int = 0,
    q_offsets: Tensor | None = None,
    kernel_options: list[int] | None = None,
    kv_rows: Tensor | None = None,
    block_table: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    kv_offset: int = 0,
    q_size: int = -1,
    kv_size: int = -1,
    return_max: bool = False,
    where: str = "",
) -> tuple[Tensor, Tensor]:
    out = empty_like_strides(q, v.shape[3])  # as `Forward.run` allocates it
    lse = q.new_empty((2, *q.shape[:3]) if return_max else q.shape[:3], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attnc::attention_backward", mutates_args=())
def attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    inputs: list[Tensor],
    pattern: str,
    scale: float,
    int_params: list[int],
    float_params: Tensor,
    wanted: list[bool],
    q_offset: int = 0,
    q_offsets: Tensor | None = None,
    kernel_options: list[int] | None = None,
    kv_offset: int = 0,
    q_size: int = -1,
    kv_size: int = -1,
) -> list[Tensor]:
    """[dq, dk, dv, then the gradient of each input whose `wanted` flag is set]."""
    forward = registry.find(pattern)
    names = [d.name for d in forward.pattern.inputs]
    chosen = tuple(n for n, w in zip(names, wanted, strict=True) if w)
    if chosen:
        check_deterministic(forward.name, chosen)
    geometry = _chunk(q_offset, q_offsets, kv_offset, q_size, kv_size)
    env = _env(forward, q, k, inputs, int_params, float_params, **geometry)
    dq, dk, dv, grads = forward.backward.run(
        q, k, v, out, lse, dout, dlse, env, scale, chosen, kernel_options
    )
    return [dq, dk, dv, *(grads[n] for n in chosen)]


@attention_backward.register_fake
def _attention_backward_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    inputs: list[Tensor],
    pattern: str,
    scale: float,
    int_params: list[int],
    float_params: Tensor,
    wanted: list[bool],
    q_offset: int = 0,
    q_offsets: Tensor | None = None,
    kernel_options: list[int] | None = None,
    kv_offset: int = 0,
    q_size: int = -1,
    kv_size: int = -1,
) -> list[Tensor]:
    # The op returns input gradients contiguous (t.new_empty), whatever the input's strides.
    chosen = [t.new_empty(t.shape) for t, w in zip(inputs, wanted, strict=True) if w]
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *chosen]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, tensors, pattern, scale, int_params, float_params, q_offset, q_offsets, kernel_options = inputs[
        :11
    ]
    # kv_rows, block_table (decoding), cu_seqlens_q, cu_seqlens_k (packed sequences): forward only.
    ctx.decoding = any(x is not None for x in inputs[11:15])
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_offsets, *tensors)
    ctx.pattern, ctx.scale, ctx.int_params, ctx.float_params = pattern, scale, int_params, float_params
    ctx.q_offset, ctx.kernel_options = q_offset, kernel_options
    ctx.chunk = tuple(inputs[17:20])  # kv_offset, q_size, kv_size
    ctx.return_max = inputs[20]
    ctx.wanted = [t.requires_grad for t in tensors]


def _backward(ctx, dout: Tensor, dlse: Tensor | None):
    if ctx.decoding:
        raise NotImplementedError(
            "attnc: Kernel.decode and Kernel.varlen have no backward pass yet (run them under "
            "torch.no_grad(); for training on packed sequences, a document mask over one batch row has one)"
        )
    q, k, v, out, lse, q_offsets, *tensors = ctx.saved_tensors
    if ctx.return_max:  # lse and the row maxima: only the lse has a gradient
        lse, dlse = lse[0], None if dlse is None else dlse[0]
    grads = attention_backward(
        q,
        k,
        v,
        out,
        lse,
        dout,
        dlse,
        tensors,
        ctx.pattern,
        ctx.scale,
        ctx.int_params,
        ctx.float_params,
        ctx.wanted,
        ctx.q_offset,
        q_offsets,
        ctx.kernel_options,
        *ctx.chunk,
    )
    dq, dk, dv, *rest = grads
    chosen = iter(rest)
    input_grads = [next(chosen) if w else None for w in ctx.wanted]
    no_params = _no_gradient(ctx.int_params), None
    result = (dq, dk, dv, input_grads, None, None, *no_params, *([None] * 14))
    # One gradient per argument the call passed: the dispatcher drops trailing arguments equal to their
    # defaults (q_offset=0, q_offsets=None, kernel_options=None) from the autograd node's inputs.
    return result[: len(ctx.needs_input_grad)]


def _no_gradient(values: list) -> list | None:
    """The gradient of a list of numbers as `torch.library` checks it against the argument's structure:
    None for `[1, 2]` (a leaf), but `[]` for an empty list (to its pytree, a list of no tensors)."""
    return [] if len(values) == 0 else None


attention.register_autograd(_backward, setup_context=_setup_context)


def _backward_of_backward(ctx, *grads):
    raise NotImplementedError(DOUBLE_BACKWARD_UNSUPPORTED)


attention_backward.register_autograd(_backward_of_backward)


def check_deterministic(name: str, chosen: tuple[str, ...]) -> None:
    """Honour `torch.use_deterministic_algorithms(True)` for the gradients of the score's inputs: the
    dQ kernel adds them up with float64 atomics, whose order (hence last bits) varies between runs on a
    GPU, so there this raises torch's way (a `RuntimeError` naming the op and the ways out), or warns
    with `warn_only=True`. Triton's interpreter runs the programs one after another, in order: its sums
    are deterministic. dQ, dK and dV never use atomics (one program writes each element)."""
    if not torch.are_deterministic_algorithms_enabled() or backend.active() != backend.CUDA:
        return
    message = (
        f"attnc::attention_backward (pattern '{name}') computes the gradient of input(s) "
        f"{', '.join(repr(n) for n in chosen)} with atomic adds, which are not deterministic on the GPU, but "
        f"torch.use_deterministic_algorithms(True) is set. Pass the input(s) detached (requires_grad=False), "
        f"or allow it with torch.use_deterministic_algorithms(True, warn_only=True)"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=2)
        return
    raise RuntimeError(message)


def _autocast_rule(device_type: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """`attnc::attention` under `torch.autocast(device_type)`: q, k and v run in the autocast dtype (as
    in `scaled_dot_product_attention`, float64 is left alone); the pattern's inputs keep their declared
    dtypes (the kernel reads them as declared). The casts are ordinary ops, so autograd returns their
    gradients in the callers' dtypes."""

    def rule(q: Tensor, k: Tensor, v: Tensor, *rest: Any) -> tuple[Tensor, Tensor]:
        dtype = torch.get_autocast_dtype(device_type)
        cast = [t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in (q, k, v)]
        with torch.autocast(device_type, enabled=False):
            return attention(*cast, *rest)

    return rule


@torch.library.custom_op("attnc::raise_error", mutates_args=())
def raise_error(kind: str, reason: str, where: str, like: list[Tensor]) -> list[Tensor]:
    """Raise `LOCATED_ERRORS[kind](reason, Loc.unpack(where))` (no location if `where` is empty): the
    error that a `Kernel` call's argument checks raised while `torch.compile` traced it, raised when
    the graph runs, as the uncompiled call raises it (dynamo refuses an exception that leaves a
    `fullgraph=True` trace, and reports it as its own `Unsupported`). The fake returns tensors shaped
    as `like` (the call's results), so that tracing goes on past the call; the op is marked as having a
    side effect (the raise), so that a graph keeps it also when the results go unused."""
    raise LOCATED_ERRORS[kind](reason, Loc.unpack(where) if where else None)


@raise_error.register_fake
def _raise_error_fake(kind: str, reason: str, where: str, like: list[Tensor]) -> list[Tensor]:
    return [torch.empty_like(t) for t in like]


torch.fx.node.has_side_effect(torch.ops.attnc.raise_error.default)


_AUTOCAST = torch.library.Library("attnc", "FRAGMENT")
for _device_type, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _AUTOCAST.impl("attention", _autocast_rule(_device_type), _key)
