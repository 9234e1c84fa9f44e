"""`attnc bench`: attnc's attention kernels against FlexAttention and SDPA, forward and forward + backward,
side by side in one process (DESIGN.md section 8). `benchmarks/attention.py` runs the same harness.

Workloads. Ten patterns — full, causal, sliding window, sinks + window, causal document masking,
prefix LM, Longformer window + global tokens, dilated window, 2-D neighbourhood and a 10%-dense block
map — each written once in `.attn` (the stdlib or `examples/`) and once, independently, as
FlexAttention's `mask_mod`. They run at each length, in each head configuration
(head dims, query heads, and a GQA case with fewer key/value heads), batch 1 by default, bf16.

Method, for each (pattern, length, head configuration):

1. **The two masks agree.** Once per pattern, at a check length (`--check-len`), the `mask_mod`
   evaluated densely must equal attnc's oracle mask `kern.mask(...)` element by element, and their
   counts of allowed (query, key) pairs must agree. A pattern that fails is not timed at all.
2. **Allowed pairs**, counted exactly at every length from the `mask_mod`, evaluated over blocks of
   query rows (never the whole L x L at once); FLOPs count only allowed pairs: 4 x pairs x head dim
   forward, 2.5 times that more for the backward (two matrix products forward, five backward).
3. **Checked, then timed.** Each contender's first call (for attnc: compilation and autotuning; for
   Flex: the torch.compile compile) is timed on its own. Its output — and in forward + backward its
   dq, dk, dv for a random upstream gradient — is compared with a dense reference computed over
   blocks of query rows in float32 (float64 for float32 inputs), with the `mask_mod`, by the tolerance
   rule of `attnc.testing`: at most `FACTOR` times the error of the same dense computation in the
   input dtype, plus a tiny atol. Where the length is at most `--oracle-max-len`, attnc's result is
   also judged, by the same rule, against attnc's own oracle (`Kernel.reference`: the pattern's IR
   evaluated densely in float64, differentiated by autograd).
   Only a contender that passes is timed: a benchmark of a wrong kernel is worthless.
4. **Timing**: on a GPU, `triton.testing.do_bench` (warm-up, L2 flushed before each call, CUDA
   events), the median of its calls; on the CPU, the median of `--repeats` calls timed by the host
   clock. attnc is the whole `kern(q, k, v)` call, including the block-sparse metadata it builds at
   each launch for data-dependent patterns; Flex's `create_block_mask` is timed separately (the
   `mask_mod`'s dense evaluation, compiled), beside attnc's `kern.plan`. SDPA runs where the pattern is
   expressible there (full, causal): each backend `torch.nn.attention.sdpa_kernel` offers is tried and
   the fastest one that passes the check is kept (MATH only where its L x L scores fit in 2 GiB).
5. **Derived**: TFLOP/s on allowed pairs; attnc's speed-up over Flex (Flex time / attnc time); and the
   fraction of the ideal sparse speed-up: (dense time x density) / attnc time, the dense time being
   the faster of attnc's and SDPA's `full` at the same length and head configuration.

Results: a JSON file (every time, every check, the device, software versions and the date; rewritten
after each case, so an interrupted run keeps what it measured) and a Markdown table beside it.
`--smoke` runs tiny sizes under Triton's interpreter on the CPU, so the harness itself stays tested.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import attnc
from attnc.api import Kernel
from attnc.runtime.backend import INTERPRETER, active
from attnc.testing import ATOL, FACTOR, GradientComparison

ROOT = Path(__file__).resolve().parents[1]  # the source checkout: examples/ and benchmarks/ live here
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "benchmarks" / "results"

MODES = ("forward", "forward_backward")
MODE_TITLES = {"forward": "forward", "forward_backward": "forward + backward"}
METHODS = ("attnc", "flex", "sdpa")
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
# What SDPA says when the backend it was limited to cannot take these arguments.
SDPA_REFUSALS = ("No viable backend", "No available kernel")
MATH_SCORES_LIMIT = 2 * 2**30  # bytes of float32 scores above which SDPA's MATH backend is not tried
BACKWARD_FLOP_FACTOR = 2.5  # backward FLOPs per forward FLOP: five matrix products against two
FLEX_BLOCK = 128  # FlexAttention's default BLOCK_SIZE for create_block_mask
ROW_ELEMENTS = 2**27  # (batch x heads x rows x keys) elements per block of query rows in dense passes
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class BenchError(ValueError):
    """A bad benchmark setting: reported as one line, without a traceback."""


# ---- workloads -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """The patterns' parameters, for GPU-sized runs or for the smoke test's tiny lengths."""

    window: int  # sliding window and sinks + window: keys per query, itself included
    sinks: int
    doc_median: int  # document lengths: log-normal with this median (and DOC_SIGMA)
    longformer_window: int  # keys on each side of the query
    global_tokens: int
    dilated_window: int  # keys on each side, counted in steps of `dilation`
    dilation: int
    neighborhood_kernel: int  # a square 2-D window on a near-square grid of the tokens
    block: int  # the block map's granularity
    block_density: float  # the block map's share of key blocks per query block


# Document lengths in packed pre-training data are roughly log-normal: many short documents, a heavy tail.
DOC_SIGMA = 1.0
GPU_SCALE = Scale(
    window=1024,
    sinks=4,
    doc_median=512,
    longformer_window=256,
    global_tokens=16,
    dilated_window=256,
    dilation=4,
    neighborhood_kernel=31,
    block=128,
    block_density=0.1,
)
SMOKE_SCALE = Scale(
    window=16,
    sinks=2,
    doc_median=12,
    longformer_window=4,
    global_tokens=2,
    dilated_window=4,
    dilation=2,
    neighborhood_kernel=3,
    block=8,
    block_density=0.1,
)


@dataclass(frozen=True)
class Workload:
    """One pattern at one length: attnc's kernel and FlexAttention's `mask_mod` for the same mask, and
    the call-time inputs both read."""

    pattern: str
    label: str
    params: dict[str, Any]
    kernel: Kernel
    inputs: dict[str, torch.Tensor]
    mask_mod: MaskMod
    batch_dependent: bool  # the mask differs between batch rows
    head_dependent: bool  # the mask differs between query heads
    sdpa_causal: bool | None  # SDPA's `is_causal` for this mask; None: SDPA cannot express it


@dataclass(frozen=True)
class Shape:
    length: int
    batch: int
    heads: int


Builder = Callable[[Shape, Scale, torch.device, int], Workload]


@functools.cache
def _stdlib() -> attnc.Module:
    return attnc.stdlib()


@functools.cache
def _example(name: str) -> attnc.Module:
    path = EXAMPLES / f"{name}.attn"
    if not path.is_file():
        raise BenchError(f"{path} not found: attnc bench runs from attnc's source checkout")
    return attnc.load(path)


def _full(shape: Shape, scale: Scale, device: torch.device, seed: int) -> Workload:
    def every_key(b, h, q, kv):
        return q >= 0

    return Workload("full", "full", {}, _stdlib().full(), {}, every_key, False, False, False)


def _causal(shape: Shape, scale: Scale, device: torch.device, seed: int) -> Workload:
    def causal(b, h, q, kv):
        return kv <= q

    return Workload("causal", "causal", {}, _stdlib().causal(), {}, causal, False, False, True)


def _sliding_window(shape: Shape, scale: Scale, device: torch.device, seed: int) -> Workload:
    window = scale.window

    def sliding_window(b, h, q, kv):
        return (kv <= q) & (q - kv < window)

    kernel = _stdlib().sliding_window(window=window)
    return Workload(
        "sliding_window",
        f"sliding window {window}",
        {"window": window},
        kernel,
        {},
        sliding_window,
        False,
        False,
        None,
    )


def _sinks_window(shape: Shape, scale: Scale, device: torch.device, seed: int) -> Workload:
    window, sinks = scale.window, scale.sinks

    def sinks_window(b, h, q, kv):
        return (kv <= q) & ((q - kv < window) | (kv < sinks))

    kernel = _example("streaming_llm").streaming_llm(window=window, sinks=sinks)
    params = {"window": window, "sinks": sinks}
    label = f"{sinks} sinks + window {window}"
    return Workload("sinks_window", label, params, kernel, {}, sinks_window, False, False, None)


def document_ids(length: int, batch: int, median: int, seed: int, device: torch.device) -> torch.Tensor:
    """int32 [batch, length]: each row packs documents of log-normal lengths (this median, DOC_SIGMA)
    back to back; a token's value is its document's index in the row, from 0."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        normal = torch.randn(length, generator=generator, dtype=torch.float64)
        sizes = torch.exp(math.log(median) + DOC_SIGMA * normal).round().clamp(min=1).long()
        count = int(torch.searchsorted(sizes.cumsum(0), length)) + 1
        rows.append(torch.repeat_interleave(torch.arange(count), sizes[:count])[:length])
    return torch.stack(rows).to(torch.int32).to(device)


def _document_causal(shape: Shape, scale: Scale, device: torch.device, seed: int) -> Workload:
    doc = document_ids(shape.length, shape.batch, scale.doc_median, seed, device)

    def document_causal(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (kv <= q)

    kernel = _example("document_causal").document_causal()
    params = {"doc_median": scale.doc_median, "doc_sigma": DOC_SIGMA, "documents": int(doc[0, -1]) + 1}
    label = f"causal documents (median {scale.doc_median})"
    return Workload(
        "document_causal", label, params, kernel, {"doc": doc}, document_causal, True, False, None
    )


def _prefix_lm(shape: Shape, scale: Scale, device: torch.device, seed: int) -> Workload:
    prefix = shape.length // 2

    def prefix_lm(b, h, q, kv):
        return (kv < prefix) | (kv <= q)

    kernel = _stdlib().prefix_lm(prefix=prefix)
    return Workload(
        "prefix_lm", f"prefix LM {prefix}", {"prefix": prefix}, kernel, {}, prefix_lm, False, False, None
    )


def _longformer(shape: Shape, scale: Scale, device: torch.device, seed: int) -> Workload:
    window, count = scale.longformer_window, min(scale.global_tokens, shape.length)
    generator = torch.Generator().manual_seed(seed)
    is_global = torch.zeros(shape.batch, shape.length, dtype=torch.bool)
    for row in is_global:
        row[torch.randperm(shape.length, generator=generator)[:count]] = True
    is_global = is_global.to(device)

    def longformer(b, h, q, kv):
        return ((q - kv).abs() <= window) | is_global[b, q] | is_global[b, kv]

    kernel = _example("longformer").longformer_global(w=window)
    params = {"window": window, "global_tokens": count}
    label = f"Longformer ±{window} + {count} global"
    return Workload(
        "longformer", label, params, kernel, {"is_global": is_global}, longformer, True, False, None
    )


def _dilated(shape: Shape, scale: Scale, device: torch.device, seed: int) -> Workload:
    window, dilation = scale.dilated_window, scale.dilation

    def dilated(b, h, q, kv):
        return ((q - kv).abs() <= window * dilation) & ((q - kv) % dilation == 0)

    kernel = _stdlib().dilated(window=window, dilation=dilation)
    params = {"window": window, "dilation": dilation}
    label = f"dilated ±{window} x {dilation}"
    return Workload("dilated", label, params, kernel, {}, dilated, False, False, None)


def near_square_grid(length: int) -> tuple[int, int]:
    """(height, width) of a row-major grid of `length` tokens: the width is the smallest divisor of the
    length that is at least its square root (a square when the length is an even power of two)."""
    width = next(w for w in range(math.isqrt(max(length - 1, 0)) + 1, length + 1) if length % w == 0)
    return length // width, width


def _neighborhood_2d(shape: Shape, scale: Scale, device: torch.device, seed: int) -> Workload:
    height, width = near_square_grid(shape.length)
    kernel_h, kernel_w = min(scale.neighborhood_kernel, height), min(scale.neighborhood_kernel, width)

    def axis(i: torch.Tensor, j: torch.Tensor, extent: int, size: int) -> torch.Tensor:
        # NATTEN: a window of `size` coordinates centred on i, shifted inward at the borders.
        start = torch.clamp(i - size // 2, 0, extent - size)
        return (start <= j) & (j < start + size)

    def neighborhood_2d(b, h, q, kv):
        return axis(q // width, kv // width, height, kernel_h) & axis(q % width, kv % width, width, kernel_w)

    params = {"height": height, "width": width, "kernel_h": kernel_h, "kernel_w": kernel_w}
    kernel = _stdlib().neighborhood_2d(**params)
    label = f"2-D neighbourhood {kernel_h}x{kernel_w} on {height}x{width}"
    return Workload("neighborhood_2d", label, params, kernel, {}, neighborhood_2d, False, False, None)


def block_map(
    batch: int, heads: int, q_blocks: int, kv_blocks: int, density: float, seed: int
) -> torch.Tensor:
    """bool [batch, heads, q_blocks, kv_blocks]: each query block sees max(1, round(density x
    kv_blocks)) key blocks, chosen at random for each batch row, head and query block."""
    per_row = max(1, round(density * kv_blocks))
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.rand(batch, heads, q_blocks, kv_blocks, generator=generator).argsort(dim=-1)[..., :per_row]
    blocks = torch.zeros(batch, heads, q_blocks, kv_blocks, dtype=torch.bool)
    return blocks.scatter_(-1, chosen, True)


def _block_sparse(shape: Shape, scale: Scale, device: torch.device, seed: int) -> Workload:
    block, tiles = scale.block, -(-shape.length // scale.block)
    blocks = block_map(shape.batch, shape.heads, tiles, tiles, scale.block_density, seed).to(device)

    def block_sparse(b, h, q, kv):
        return blocks[b, h, q // block, kv // block]

    kernel = _example("dynamic_sparse").block_sparse(block=block)
    params = {"block": block, "blocks_per_row": int(blocks[0, 0, 0].sum()), "block_rows": tiles}
    label = f"block map {block} ({scale.block_density:.0%})"
    return Workload("block_sparse", label, params, kernel, {"blocks": blocks}, block_sparse, True, True, None)


PATTERNS: dict[str, Builder] = {
    "full": _full,
    "causal": _causal,
    "sliding_window": _sliding_window,
    "sinks_window": _sinks_window,
    "document_causal": _document_causal,
    "prefix_lm": _prefix_lm,
    "longformer": _longformer,
    "dilated": _dilated,
    "neighborhood_2d": _neighborhood_2d,
    "block_sparse": _block_sparse,
}


# ---- masks and allowed pairs -----------------------------------------------------------------------------


def mask_rows(workload: Workload, shape: Shape, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """The `mask_mod` on query rows [start, stop) and every key: bool [B or 1, H or 1, rows, keys], size 1
    where the mask does not depend on the batch row or head."""
    batch = shape.batch if workload.batch_dependent else 1
    heads = shape.heads if workload.head_dependent else 1
    index = functools.partial(torch.arange, device=device)
    allowed = workload.mask_mod(
        index(batch).view(-1, 1, 1, 1),
        index(heads).view(1, -1, 1, 1),
        index(start, stop).view(1, 1, -1, 1),
        index(shape.length).view(1, 1, 1, -1),
    )
    return allowed.expand(batch, heads, stop - start, shape.length)


def row_blocks(shape: Shape, dependent_size: int) -> Iterable[tuple[int, int]]:
    """Blocks of query rows whose dense [dependent_size, rows, keys] slab has about ROW_ELEMENTS elements."""
    rows = max(1, ROW_ELEMENTS // max(1, dependent_size * shape.length))
    for start in range(0, shape.length, rows):
        yield start, min(shape.length, start + rows)


def allowed_pairs(workload: Workload, shape: Shape, device: torch.device) -> int:
    """The exact number of allowed (query, key) pairs summed over batch rows and query heads, from the
    `mask_mod` evaluated a block of query rows at a time."""
    batch = shape.batch if workload.batch_dependent else 1
    heads = shape.heads if workload.head_dependent else 1
    total = 0
    for start, stop in row_blocks(shape, batch * heads):
        total += int(mask_rows(workload, shape, start, stop, device).sum())
    return total * (shape.batch // batch) * (shape.heads // heads)


def check_mask(workload: Workload, shape: Shape, device: torch.device) -> dict[str, Any]:
    """The `mask_mod` against attnc's oracle mask, element by element, and their pair counts."""
    attnc_mask = workload.kernel.mask(
        shape.length, shape.length, batch=shape.batch, num_heads=shape.heads, **workload.inputs
    ).to(device)
    flex_mask = mask_rows(workload, shape, 0, shape.length, device).expand_as(attnc_mask)
    mismatches = int((attnc_mask != flex_mask).sum())
    counted = allowed_pairs(workload, shape, device)
    attnc_pairs = int(attnc_mask.sum())
    return {
        "pattern": workload.pattern,
        "length": shape.length,
        "params": workload.params,
        "ok": mismatches == 0 and counted == attnc_pairs,
        "mismatches": mismatches,
        "allowed_pairs": attnc_pairs,
        "counted_pairs": counted,
    }


# ---- the dense reference ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dense:
    """Dense attention of a workload's mask over the benchmark's tensors in one precision: the output
    and, when an upstream gradient was given, (dq, dk, dv)."""

    out: torch.Tensor
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def dense_attention(
    workload: Workload,
    shape: Shape,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor | None,
    precision: torch.dtype,
) -> Dense:
    """Softmax attention with the `mask_mod`, computed in `precision` a block of query rows at a time
    (scores, softmax and products in that type; dk and dv accumulate over the blocks). A query that
    sees no key gets output 0."""
    scale = q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    leaves = [t.detach().to(precision).requires_grad_(dout is not None) for t in (q, k, v)]
    q_, k_, v_ = leaves
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=precision, device=q.device)
    with torch.set_grad_enabled(dout is not None):
        for start, stop in row_blocks(shape, shape.batch * shape.heads):
            keys, values = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k_, v_))
            scores = (q_[:, :, start:stop] @ keys.transpose(-1, -2)) * scale
            allowed = mask_rows(workload, shape, start, stop, q.device)
            scores = scores.masked_fill(~allowed, float("-inf"))
            row_max = scores.amax(dim=-1, keepdim=True).detach()  # the shift changes no value
            weights = torch.exp(scores - torch.where(torch.isneginf(row_max), 0.0, row_max))
            total = weights.sum(dim=-1, keepdim=True)
            rows = (weights @ values) / torch.where(total == 0, 1.0, total)
            if dout is not None:
                rows.backward(dout[:, :, start:stop].to(precision))
            out[:, :, start:stop] = rows.detach()
    grads = (q_.grad, k_.grad, v_.grad) if dout is not None else None
    return Dense(out, grads)  # type: ignore[arg-type]


def oracle_attention(
    workload: Workload,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor | None,
    precision: torch.dtype,
) -> Dense:
    """attnc's oracle over the benchmark's tensors: `Kernel.reference` computing in `precision`
    (outputs in float64), differentiated by autograd when `dout` is given — as `attnc.testing` does: the
    float64 computation on float64 copies of q, k, v; a lower one on the tensors as they are, its
    gradients rounded to their dtype."""
    dtype = torch.float64 if precision == torch.float64 else q.dtype
    leaves = [t.detach().to(dtype).requires_grad_(dout is not None) for t in (q, k, v)]
    with torch.set_grad_enabled(dout is not None):
        out = workload.kernel.reference(
            *leaves, out_dtype=torch.float64, precision=precision, **workload.inputs
        )
        grads = None if dout is None else torch.autograd.grad(out, leaves, dout.to(torch.float64))
    return Dense(out.detach(), grads)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Agreement:
    """A contender's errors against the dense reference at the benchmark's size, judged by the rule of
    `attnc.testing`: each error at most FACTOR times the error of the same dense computation in the input
    dtype plus a tiny atol (for gradients, an atol relative to their magnitude, as `GradientComparison`)."""

    dtype: torch.dtype
    errors: dict[str, tuple[float, float, float]]  # "out", "dq", ... -> (error, dense error, max |reference|)
    has_nan: bool
    judge: str = "reference"

    def bound(self, name: str, dense_error: float, magnitude: float) -> float:
        if name == "out":
            return FACTOR * dense_error + ATOL[self.dtype]
        return GradientComparison(self.dtype, {}, False).bound(dense_error, magnitude)

    @property
    def ok(self) -> bool:
        return not self.has_nan and all(e <= self.bound(n, d, m) for n, (e, d, m) in self.errors.items())

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [
            f"{name} {e:.3g} (dense {dtype}: {d:.3g}){'' if e <= self.bound(name, d, m) else ' MISMATCH'}"
            for name, (e, d, m) in self.errors.items()
        ]
        nan = "; NaN" if self.has_nan else ""
        return f"max |x - {self.judge}|: " + ", ".join(parts) + f": {'ok' if self.ok else 'MISMATCH'}{nan}"

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "text": self.describe(),
            "errors": {
                n: {"error": e, "dense_error": d, "max_reference": m} for n, (e, d, m) in self.errors.items()
            },
        }


@dataclass(frozen=True)
class Reference:
    """A judge of contenders at one benchmark size: dense attention in a high precision, and the same in
    the input dtype (whose error sets the tolerance). `name` says which dense attention: the `mask_mod`'s
    ("reference") or attnc's ("oracle")."""

    high: Dense
    low: Dense
    dtype: torch.dtype
    name: str = "reference"

    def judge(self, out: torch.Tensor, grads: Sequence[torch.Tensor] | None) -> Agreement:
        names: list[str] = ["out"]
        values: list[torch.Tensor] = [out]
        if grads is not None:
            assert self.high.grads is not None and self.low.grads is not None
            names += ["dq", "dk", "dv"]
            values += list(grads)
        references = [self.high.out, *(self.high.grads or ())][: len(values)]
        dense = [self.low.out, *(self.low.grads or ())][: len(values)]

        def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
            return (a.to(b.dtype) - b).abs().max().item() if b.numel() else 0.0

        return Agreement(
            judge=self.name,
            dtype=self.dtype,
            errors={
                name: (max_error(x, r), max_error(d, r), r.abs().max().item() if r.numel() else 0.0)
                for name, x, r, d in zip(names, values, references, dense, strict=True)
            },
            has_nan=any(bool(x.isnan().any()) for x in values),
        )


# ---- timing ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call takes (with its compilation, on a first call) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


@dataclass(frozen=True)
class Timing:
    """How calls are timed: do_bench's warm-up and repetition times on a GPU, repeats on the CPU."""

    warmup_ms: float
    rep_ms: float
    repeats: int

    def kernel_ms(
        self, fn: Callable[[], Any], device: torch.device, grad_to_none: Sequence[torch.Tensor] = ()
    ) -> list[float]:
        """Milliseconds of each timed call of an attention (warmed up by a first call before)."""
        if device.type == "cuda":
            import triton.testing

            times = triton.testing.do_bench(
                fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=list(grad_to_none), return_mode="all"
            )
            return [float(t) for t in times]
        return self.host_ms(fn, device, grad_to_none)

    def host_ms(
        self, fn: Callable[[], Any], device: torch.device, grad_to_none: Sequence[torch.Tensor] = ()
    ) -> list[float]:
        """Milliseconds of each of `repeats` calls by the host clock (synchronised): for host-heavy work
        like building launch metadata, and for everything on the CPU."""
        times = []
        for _ in range(self.repeats):
            for t in grad_to_none:
                t.grad = None
            elapsed, result = first_call(fn, device)
            del result
            times.append(elapsed * 1e3)
        return times


def timed_result(times_ms: list[float], flops: float | None = None) -> dict[str, Any]:
    median = statistics.median(times_ms)
    result: dict[str, Any] = {"status": "ok", "ms": median, "min_ms": min(times_ms), "calls": len(times_ms)}
    if flops is not None:
        result["tflops"] = flops / (median * 1e-3) / 1e12
    return result


def failure(err: BaseException) -> dict[str, Any]:
    """A contender that raised: 'unsupported' when it says it cannot do this, else 'error'."""
    status = "unsupported" if isinstance(err, NotImplementedError) else "error"
    if isinstance(err, torch.OutOfMemoryError):
        torch.cuda.empty_cache()
    text = str(err).strip().splitlines()
    return {"status": status, "reason": f"{type(err).__name__}: {text[0] if text else ''}"[:400]}


@dataclass(frozen=True)
class Tensors:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor


def measure(
    attention: Attention,
    mode: str,
    tensors: Tensors,
    reference: Reference,
    timing: Timing,
    flops: float,
    oracle: Reference | None = None,
) -> dict[str, Any]:
    """One contender in one mode: its first call, timed on its own; its result judged by the reference
    (and by `oracle`, when given); then, only if every judge passes it, its timed calls."""
    device = tensors.q.device
    try:
        if mode == "forward":
            args = (tensors.q, tensors.k, tensors.v)
            leaves: list[torch.Tensor] = []

            def call() -> Any:
                return attention(*args)

            first_s, out = first_call(call, device)
            grads = None
        else:
            leaves = [t.detach().requires_grad_() for t in (tensors.q, tensors.k, tensors.v)]

            def call() -> Any:
                attention(*leaves).backward(tensors.dout)

            def first() -> torch.Tensor:
                result = attention(*leaves)
                result.backward(tensors.dout)
                return result

            first_s, out = first_call(first, device)
            grads = [t.grad for t in leaves]
        checks = {
            judge.name: judge.judge(out.detach(), grads).as_json()
            for judge in (reference, oracle)
            if judge is not None
        }
        del out, grads
        result: dict[str, Any] = {"first_call_s": first_s, "checks": checks}
        if not all(c["ok"] for c in checks.values()):
            return {"status": "check failed", **result}
        return {**timed_result(timing.kernel_ms(call, device, leaves), flops), **result}
    except Exception as err:  # a contender that fails is recorded, and the others still run
        return failure(err)


# ---- contenders -----------------------------------------------------------------------------------------


def attnc_attention(workload: Workload) -> Attention:
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return workload.kernel(q, k, v, **workload.inputs)  # type: ignore[return-value]

    return attention


@dataclass(frozen=True)
class Flex:
    """FlexAttention, compiled with torch.compile (each shape its own static compile) or eager."""

    compiled: bool

    @functools.cached_property
    def attention(self) -> Callable[..., torch.Tensor]:
        from torch.nn.attention.flex_attention import flex_attention

        return torch.compile(flex_attention, dynamic=False) if self.compiled else flex_attention

    @functools.cached_property
    def create_block_mask(self) -> Callable[..., Any]:
        from torch.nn.attention.flex_attention import create_block_mask

        return torch.compile(create_block_mask) if self.compiled else create_block_mask

    @property
    def description(self) -> str:
        if self.compiled:
            return "torch.compile(flex_attention, dynamic=False); torch.compile(create_block_mask)"
        return "eager flex_attention and create_block_mask (not compiled)"


def raise_recompile_limits() -> None:
    """Every (pattern, shape) compiles Flex anew; past Dynamo's default of 8 recompilations of one
    function it would fall back to eager Flex without a word, so the limits are raised."""
    config = torch._dynamo.config
    for names in (("recompile_limit", "cache_size_limit"), ("accumulated_recompile_limit",)):
        name = next((n for n in names if hasattr(config, n)), None)
        if name is not None:
            setattr(config, name, max(getattr(config, name), 4096))


def sdpa_attention(causal: bool, gqa: bool) -> Attention:
    import torch.nn.functional as F

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return attention


def measure_sdpa(
    causal: bool,
    mode: str,
    tensors: Tensors,
    reference: Reference,
    timing: Timing,
    flops: float,
) -> dict[str, Any]:
    """SDPA through each backend in turn; the fastest that passes the check is the result."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = tensors.q
    attention = sdpa_attention(causal, q.shape[1] != tensors.k.shape[1])
    backends: dict[str, dict[str, Any]] = {}
    for name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, name, None)
        scores = q.shape[0] * q.shape[1] * q.shape[2] * tensors.k.shape[2] * 4
        if backend is None:
            backends[name] = {"status": "unsupported", "reason": f"this torch has no SDPBackend.{name}"}
        elif name == "MATH" and scores > MATH_SCORES_LIMIT:
            backends[name] = {"status": "skipped", "reason": f"its scores take {scores / 2**30:.0f} GiB"}
        else:
            with sdpa_kernel([backend]):
                result = measure(attention, mode, tensors, reference, timing, flops)
            if result["status"] == "error" and any(r in result["reason"] for r in SDPA_REFUSALS):
                result["status"] = "unsupported"
            backends[name] = result
    ok = {n: r for n, r in backends.items() if r["status"] == "ok"}
    if not ok:
        return {
            "status": "unsupported",
            "reason": "no SDPA backend ran and passed the check",
            "backends": backends,
        }
    best = min(ok, key=lambda n: ok[n]["ms"])
    return {**ok[best], "backend": best, "backends": backends}


# ---- one case -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadConfig:
    head_dim: int
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class Settings:
    smoke: bool
    patterns: tuple[str, ...]
    lengths: tuple[int, ...]
    configs: tuple[HeadConfig, ...]
    batch: int
    dtype: torch.dtype
    modes: tuple[str, ...]
    methods: tuple[str, ...]
    flex_compiled: bool
    timing: Timing
    check_len: int
    oracle_max_len: int
    time_budget_s: float | None
    seed: int
    scale: Scale

    def as_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["dtype"] = str(self.dtype).removeprefix("torch.")
        return fields


def random_tensors(
    config: HeadConfig, shape: Shape, dtype: torch.dtype, seed: int, device: torch.device
) -> Tensors:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(heads: int) -> torch.Tensor:
        size = (shape.batch, heads, shape.length, config.head_dim)
        return torch.randn(size, generator=generator, device=device).to(dtype)

    return Tensors(randn(config.heads), randn(config.kv_heads), randn(config.kv_heads), randn(config.heads))


def metadata_costs(
    workload: Workload, shape: Shape, flex: Flex | None, timing: Timing, device: torch.device
) -> tuple[dict[str, Any], Any]:
    """attnc's launch plan and Flex's block mask for this case, timed (host clock, synchronised); returns
    the records and Flex's BlockMask (None without Flex)."""
    kernel, length = workload.kernel, shape.length

    def plan() -> Any:
        return kernel.plan(
            length, length, batch=shape.batch, num_heads=shape.heads, device=device, **workload.inputs
        )

    records: dict[str, Any] = {}
    first_s, result = first_call(plan, device)
    records["attnc_plan"] = {**timed_result(timing.host_ms(plan, device)), "first_call_s": first_s}
    records["attnc_plan"]["sparsity"] = result.sparsity
    if flex is None:
        return records, None
    batch = shape.batch if workload.batch_dependent else None
    heads = shape.heads if workload.head_dependent else None

    def block_mask() -> Any:
        return flex.create_block_mask(
            workload.mask_mod, batch, heads, length, length, device=device, BLOCK_SIZE=FLEX_BLOCK
        )

    try:
        first_s, mask = first_call(block_mask, device)
        records["flex_block_mask"] = {
            **timed_result(timing.host_ms(block_mask, device)),
            "first_call_s": first_s,
        }
    except Exception as err:
        records["flex_block_mask"] = failure(err)
        mask = None
    return records, mask


def flops_of(pairs: int, config: HeadConfig) -> dict[str, float]:
    forward = 4.0 * pairs * config.head_dim
    return {"forward": forward, "forward_backward": forward * (1 + BACKWARD_FLOP_FACTOR)}


def run_case(
    workload: Workload,
    shape: Shape,
    config: HeadConfig,
    pairs: int,
    settings: Settings,
    flex: Flex | None,
    device: torch.device,
) -> dict[str, Any]:
    """Every contender on one (pattern, length, head configuration), each checked before it is timed."""
    tensors = random_tensors(config, shape, settings.dtype, settings.seed, device)
    backward = "forward_backward" in settings.modes
    dout = tensors.dout if backward else None
    precision = torch.float64 if settings.dtype == torch.float32 else torch.float32
    reference = Reference(
        dense_attention(workload, shape, tensors.q, tensors.k, tensors.v, dout, precision),
        dense_attention(workload, shape, tensors.q, tensors.k, tensors.v, dout, settings.dtype),
        settings.dtype,
    )
    oracle = None
    if shape.length <= settings.oracle_max_len and "attnc" in settings.methods:
        oracle = Reference(
            oracle_attention(workload, tensors.q, tensors.k, tensors.v, dout, torch.float64),
            oracle_attention(workload, tensors.q, tensors.k, tensors.v, dout, settings.dtype),
            settings.dtype,
            "oracle",
        )
    flops = flops_of(pairs, config)
    record: dict[str, Any] = {"flops": flops}
    metadata, mask = metadata_costs(
        workload, shape, flex if "flex" in settings.methods else None, settings.timing, device
    )
    record["metadata"] = metadata
    gqa = config.kv_heads != config.heads
    for mode in settings.modes:
        results: dict[str, Any] = {}
        for method in settings.methods:
            if method == "attnc":
                results["attnc"] = measure(
                    attnc_attention(workload), mode, tensors, reference, settings.timing, flops[mode], oracle
                )
                if results["attnc"]["status"] == "ok":
                    results["attnc"]["config"] = launch_config(workload.kernel, mode)
            elif method == "flex":
                if mask is None:
                    results["flex"] = {"status": "error", "reason": "no block mask (see metadata)"}
                    continue
                assert flex is not None

                def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                    return flex.attention(q, k, v, block_mask=mask, enable_gqa=gqa)

                results["flex"] = measure(
                    flex_attention, mode, tensors, reference, settings.timing, flops[mode]
                )
            elif workload.sdpa_causal is not None:
                results["sdpa"] = measure_sdpa(
                    workload.sdpa_causal, mode, tensors, reference, settings.timing, flops[mode]
                )
        record[mode] = results
    attnc_statuses = [record[m]["attnc"]["status"] for m in settings.modes if "attnc" in record[m]]
    record["status"] = next((s for s in attnc_statuses if s != "ok"), "ok")
    return record


def launch_config(kernel: Kernel, mode: str) -> str | None:
    """The tile sizes, warps and stages of attnc's last launch in this mode (the backward's: its dQ
    kernel's, then its dK/dV kernel's, which are tuned apart)."""
    forward = kernel._forward
    if mode == "forward":
        return None if forward.last_config is None else str(forward.last_config)
    dq, dkv = forward.backward.last_config, forward.backward.last_dkv_config
    return None if dq is None else f"dQ {dq}; dK/dV {dkv}"


# ---- the sweep ------------------------------------------------------------------------------------------


def run(
    settings: Settings,
    device: torch.device,
    output: Path,
    patterns: dict[str, Builder] = PATTERNS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole benchmark; writes the JSON and Markdown after every case and returns the report. Cases
    run head configuration by head configuration, length by length, pattern by pattern; once
    `time_budget_s` has passed, the remaining ones are recorded as skipped."""
    started = time.perf_counter()
    flex = Flex(settings.flex_compiled) if "flex" in settings.methods else None
    if flex is not None and flex.compiled:
        raise_recompile_limits()
    report = header(settings, device, flex)
    log(f"attnc bench on {report['device']} (kernels: {report['backend']}); Flex: {report['flex']}")
    for note in report["notes"]:
        log(f"note: {note}")
    check_shape = Shape(
        min(settings.check_len, max(settings.lengths)), settings.batch, max(c.heads for c in settings.configs)
    )
    for name in settings.patterns:
        result = check_mask(
            patterns[name](check_shape, settings.scale, device, settings.seed), check_shape, device
        )
        report["mask_checks"][name] = result
        verdict = "ok" if result["ok"] else f"MISMATCH ({result['mismatches']} pairs differ)"
        log(f"mask check {name} at L={check_shape.length}: {verdict}")
    workloads: dict[tuple[str, int, int], tuple[Workload, int]] = {}
    with warnings.catch_warnings(), torch_threads(1 if settings.smoke else None):
        if flex is not None and not flex.compiled:  # said once in the notes rather than at every call
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        for config in settings.configs:
            for length in settings.lengths:
                for name in settings.patterns:
                    shape = Shape(length, settings.batch, config.heads)
                    record: dict[str, Any] = {
                        "pattern": name,
                        "length": length,
                        "batch": settings.batch,
                        "head_dim": config.head_dim,
                        "heads": config.heads,
                        "kv_heads": config.kv_heads,
                        "dtype": str(settings.dtype).removeprefix("torch."),
                    }
                    elapsed = time.perf_counter() - started
                    if not report["mask_checks"][name]["ok"]:
                        record |= {"status": "mask mismatch", "reason": "the two masks differ: nothing timed"}
                    elif settings.time_budget_s is not None and elapsed > settings.time_budget_s:
                        record |= {
                            "status": "skipped",
                            "reason": f"past the time budget of {settings.time_budget_s:g} s",
                        }
                    else:
                        record |= case(name, patterns[name], shape, config, settings, flex, device, workloads)
                        record["wall_s"] = time.perf_counter() - started - elapsed
                    report["cases"].append(record)
                    log(describe(record))
                    report["total_wall_s"] = time.perf_counter() - started
                    derive(report["cases"])
                    write(report, output)
    return report


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` (None: left alone) for the block, then restored. The
    smoke test's tensors are tiny: on a busy machine, a thread pool only stalls them."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def case(
    name: str,
    builder: Builder,
    shape: Shape,
    config: HeadConfig,
    settings: Settings,
    flex: Flex | None,
    device: torch.device,
    workloads: dict[tuple[str, int, int], tuple[Workload, int]],
) -> dict[str, Any]:
    """One case's record; a failure of the harness itself is recorded as an error, and the sweep goes on."""
    key = (name, shape.length, shape.heads)  # head dims and key/value heads share the workload
    try:
        if key not in workloads:
            workload = builder(shape, settings.scale, device, settings.seed)
            workloads[key] = workload, allowed_pairs(workload, shape, device)
        workload, pairs = workloads[key]
        record = {
            "label": workload.label,
            "params": workload.params,
            "allowed_pairs": pairs,
            "density": pairs / (shape.batch * shape.heads * shape.length**2),
        }
        return record | run_case(workload, shape, config, pairs, settings, flex, device)
    except Exception as err:
        return failure(err)
    finally:
        if device.type == "cuda":  # the next case starts with the memory this one held
            gc.collect()
            torch.cuda.empty_cache()


def describe(record: dict[str, Any]) -> str:
    """One line of progress for a case."""
    head = (
        f"{record['pattern']:16} L={record['length']:<6} D={record['head_dim']:<3} "
        f"H={record['heads']}/{record['kv_heads']}"
    )
    if "flops" not in record:
        return f"{head}: {record['status']}: {record.get('reason', '')}"
    parts = []
    for mode in MODES:
        if mode not in record:
            continue
        cells = []
        for method, result in record[mode].items():
            backend = f" ({result['backend']})" if "backend" in result else ""
            cells.append(
                f"{method}{backend} "
                + (f"{result['ms']:.3f} ms" if result["status"] == "ok" else result["status"])
            )
        parts.append(f"{MODE_TITLES[mode]}: " + ", ".join(cells))
    return f"{head} density {record['density']:.3f}: " + "; ".join(parts)


# ---- derived figures and the report -------------------------------------------------------------------


def config_key(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record[k] for k in ("length", "batch", "head_dim", "heads", "kv_heads", "dtype"))


def ok_ms(record: dict[str, Any], mode: str, method: str) -> float | None:
    result = record.get(mode, {}).get(method)
    return result["ms"] if result is not None and result["status"] == "ok" else None


def derive(cases: list[dict[str, Any]]) -> None:
    """Per case and mode: attnc's speed-up over Flex, and the fraction of the ideal sparse speed-up
    (dense time x density / attnc's time; dense time: the faster of attnc's and SDPA's `full` at the
    same length and head configuration, None where that did not run)."""
    dense: dict[tuple[Any, ...], float] = {}
    for record in cases:
        if record["pattern"] != "full":
            continue
        for mode in MODES:
            times = [t for t in (ok_ms(record, mode, "attnc"), ok_ms(record, mode, "sdpa")) if t is not None]
            if times:
                dense[(*config_key(record), mode)] = min(times)
    for record in cases:
        if "flops" not in record:
            continue
        derived = {}
        for mode in MODES:
            if mode not in record:
                continue
            attnc_ms, flex_ms = ok_ms(record, mode, "attnc"), ok_ms(record, mode, "flex")
            dense_ms = dense.get((*config_key(record), mode))
            derived[mode] = {
                "speedup_vs_flex": flex_ms / attnc_ms if attnc_ms and flex_ms else None,
                "dense_ms": dense_ms,
                "ideal_fraction": dense_ms * record["density"] / attnc_ms if attnc_ms and dense_ms else None,
            }
        record["derived"] = derived


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def git_revision() -> dict[str, Any]:
    def git(*argv: str) -> str:
        try:
            done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
        except OSError:
            return ""
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "attnc"))}


def header(settings: Settings, device: torch.device, flex: Flex | None) -> dict[str, Any]:
    import triton

    report: dict[str, Any] = {
        "benchmark": "attention",
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "device_type": device.type,
        "device_capability": (
            ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None
        ),
        "backend": active(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "attnc": attnc.__version__,
        "attnc_git": git_revision(),
        "python": platform.python_version(),
        "flex": flex.description if flex is not None else "not run",
        "sdpa_backends": list(SDPA_BACKENDS),
        "settings": settings.as_json(),
        "notes": [
            "attnc's time is the whole kern(q, k, v) call, with the block-sparse metadata it builds at each "
            "launch for data-dependent patterns",
            "Flex's time excludes create_block_mask, timed on its own under 'launch metadata'",
        ],
        "mask_checks": {},
        "cases": [],
    }
    if active() == INTERPRETER:
        report["notes"].append(
            "attnc ran under Triton's interpreter on the CPU: its times are no speed figures"
        )
    if flex is not None and not flex.compiled:
        report["notes"].append(
            "FlexAttention ran eagerly, not compiled (compiling it on the CPU takes about 10 s per pattern "
            "and shape): its times are no speed figures"
        )
    if device.type == "cpu" and flex is not None:
        report["notes"].append(
            "FlexAttention has no backward on the CPU: its forward + backward is 'unsupported'"
        )
    return report


def write(report: dict[str, Any], output: Path) -> None:
    """The JSON, and the Markdown beside it (`.md`), each written atomically."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (output, json.dumps(report, indent=1) + "\n"),
        (output.with_suffix(".md"), markdown(report)),
    ):
        scratch = path.with_name(path.name + ".tmp")
        scratch.write_text(text, encoding="utf-8")
        os.replace(scratch, path)


def _ms(result: dict[str, Any] | None) -> str:
    if result is None:
        return "—"
    if result["status"] != "ok":
        return result["status"]
    backend = f" ({result['backend'].lower()})" if "backend" in result else ""
    return f"{result['ms']:.3g}{backend}"


def _tflops(result: dict[str, Any] | None) -> str:
    if result is None or result["status"] != "ok" or "tflops" not in result:
        return "—"
    return f"{result['tflops']:.3g}"


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _label(record: dict[str, Any]) -> str:
    return record.get("label", record["pattern"])


def _order(record: dict[str, Any]) -> tuple[Any, ...]:
    """Tables list head configurations (largest head dim, then MHA before GQA), lengths, then patterns in
    PATTERNS' order."""
    names = list(PATTERNS)
    pattern = names.index(record["pattern"]) if record["pattern"] in names else len(names)
    return (-record["head_dim"], -record["kv_heads"], record["length"], pattern)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a table per mode, the launch metadata, and every check that failed."""
    git = report["attnc_git"]
    versions = (
        f"torch {report['torch']}, Triton {report['triton']}, attnc {report['attnc']} "
        f"({git['commit'][:10] or 'no git'}{', dirty' if git['dirty'] else ''})"
    )
    settings = report["settings"]
    lines = [
        f"## Attention kernels on {report['device']}, {report['date']}",
        "",
        f"{versions}; {settings['dtype']}, batch {settings['batch']}; Flex: {report['flex']}. Times: median "
        "ms. TFLOP/s count allowed (query, key) pairs only. 'vs Flex': Flex's time over attnc's. 'of ideal': "
        "(dense time x density) / attnc's time, the dense time the faster of attnc's and SDPA's full "
        "attention.",
        "",
        *(f"- {note}" for note in report["notes"]),
    ]
    cases = sorted(report["cases"], key=_order)
    for mode in MODES:
        if mode not in settings["modes"]:
            continue
        lines += [
            "",
            f"### {MODE_TITLES[mode]}",
            "",
            "| pattern | tokens | D | heads q/kv | density | attnc ms | attnc TFLOP/s | Flex ms "
            "| Flex TFLOP/s | SDPA ms | vs Flex | of ideal |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for record in cases:
            heads = f"{record['heads']}/{record['kv_heads']}"
            head = f"| {_label(record)} | {record['length']:,} | {record['head_dim']} | {heads} |"
            if "flops" not in record:
                lines.append(f"{head} — | {record['status']} | | | | | | |")
                continue
            results, derived = record[mode], record["derived"][mode]
            attnc_result, flex_result = results.get("attnc"), results.get("flex")
            cells = [
                f"{record['density']:.3f}",
                _ms(attnc_result),
                _tflops(attnc_result),
                _ms(flex_result),
                _tflops(flex_result),
                _ms(results.get("sdpa")),
                _times(derived["speedup_vs_flex"]),
                _percent(derived["ideal_fraction"]),
            ]
            lines.append(f"{head} {' | '.join(cells)} |")
    lines += [
        "",
        "### launch metadata",
        "",
        "| pattern | tokens | attnc plan ms | Flex create_block_mask ms | its first call (compile) s |",
        "|---|---:|---:|---:|---:|",
    ]
    seen = set()
    for record in cases:
        if "metadata" not in record or (record["pattern"], record["length"]) in seen:
            continue
        seen.add((record["pattern"], record["length"]))
        plan, mask = record["metadata"]["attnc_plan"], record["metadata"].get("flex_block_mask")
        first = f"{mask['first_call_s']:.2f}" if mask is not None and mask["status"] == "ok" else "—"
        lines.append(f"| {_label(record)} | {record['length']:,} | {_ms(plan)} | {_ms(mask)} | {first} |")
    checked = sum(
        1
        for record in report["cases"]
        for mode in MODES
        if mode in record and record[mode].get("attnc", {}).get("status") == "ok"
    )
    lines += [
        "",
        f"Checks: {checked} attnc results timed, each checked first against a dense reference at its size "
        f"(and the float64 oracle up to {settings['oracle_max_len']:,} tokens).",
    ]
    lines += [
        f"- mask mismatch: {c['pattern']} at {c['length']:,} tokens: {c['mismatches']} pairs differ"
        for c in report["mask_checks"].values()
        if not c["ok"]
    ]
    lines += [
        f"- {_label(r)}, {r['length']:,} tokens, D {r['head_dim']}, heads {r['heads']}/{r['kv_heads']}: "
        f"{r['status']}" + (f" ({r['reason']})" if "reason" in r else "")
        for r in cases
        if r["status"] not in ("ok", "skipped")
    ]
    return "\n".join(lines) + "\n"


def failed(report: dict[str, Any]) -> bool:
    """Whether a mask check, an attnc check or attnc itself failed anywhere in the report."""
    return any(not c["ok"] for c in report["mask_checks"].values()) or any(
        r["status"] not in ("ok", "skipped") for r in report["cases"]
    )


def read_report(path: Path) -> dict[str, Any]:
    """A report `attnc bench` wrote, read for `--merge`: a `BenchError` naming the file if it cannot be
    read or is not one."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise BenchError(f"--merge {path}: {err.strerror or err}") from None
    except ValueError as err:  # not JSON, or not UTF-8
        raise BenchError(f"--merge {path}: not a JSON report ({err})") from None
    shapes = {"device": str, "settings": dict, "mask_checks": dict, "cases": list}
    if not isinstance(report, dict) or any(not isinstance(report.get(k), t) for k, t in shapes.items()):
        keys = ", ".join(shapes)
        raise BenchError(f"--merge {path}: not an attnc bench report (an object with {keys})")
    if not isinstance(report["settings"].get("modes"), list) or not all(
        isinstance(c, dict) for c in report["cases"]
    ):
        raise BenchError(f"--merge {path}: not an attnc bench report (malformed settings or cases)")
    return report


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    """Several reports of one device as one: the first one's header, every case, derived figures anew."""
    reports = [read_report(path) for path in paths]
    devices = {r["device"] for r in reports}
    if len(devices) > 1:
        raise BenchError(f"cannot merge reports of different devices: {', '.join(sorted(devices))}")
    merged = dict(reports[0])
    merged["merged_from"] = [str(p) for p in paths]
    merged["mask_checks"] = {k: v for r in reports for k, v in r["mask_checks"].items()}
    merged["cases"] = [c for r in reports for c in r["cases"]]
    modes = {m for r in reports for m in r["settings"]["modes"]}
    merged["settings"] = {**reports[0]["settings"], "modes": [m for m in MODES if m in modes]}
    try:
        derive(merged["cases"])
        markdown(merged)  # what `write` renders: a case it cannot read fails here, before anything is written
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BenchError(f"--merge: a case of {', '.join(map(str, paths))} is malformed ({err!r})") from None
    return merged


def check_output(output: Path) -> None:
    """Refuse an `--output` the report could not be written to, before anything runs: a directory at
    the JSON's or the Markdown's path, or a folder that cannot be created or written."""
    if output.suffix == ".md":
        raise BenchError(f"--output {output}: the Markdown goes beside the JSON as .md; name the JSON .json")
    for path in (output, output.with_suffix(".md")):
        for target in (path, path.with_name(path.name + ".tmp")):
            if target.is_dir():
                raise BenchError(f"--output {output}: {target} is a directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".attnc-bench-"):
            pass  # the folder takes a file: the report's atomic writes will succeed
    except OSError as err:
        where = err.filename or output.parent
        raise BenchError(f"--output {output}: cannot write to {where}: {err.strerror or err}") from None


# ---- command line ---------------------------------------------------------------------------------------

DEFAULTS = {
    "gpu": {
        "lengths": [4096, 16384, 32768],
        "head_dims": [128, 64],
        "heads": 16,
        "gqa_kv_heads": 4,
        "gqa_head_dim": 128,
        "flex": "compiled",
        "repeats": 10,
        "check_len": 2048,
        "oracle_max_len": 4096,
    },
    "smoke": {
        "lengths": [64],
        "head_dims": [16],
        "heads": 2,
        "gqa_kv_heads": 1,
        "gqa_head_dim": 16,
        "flex": "eager",
        "repeats": 1,
        "check_len": 64,
        "oracle_max_len": 64,
    },
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The options of `attnc bench` (and `benchmarks/attention.py`); the parser runs `run_command`."""
    parser.description = (
        "Time attnc's kernels against compiled FlexAttention and SDPA's best backend, forward and forward + "
        "backward, on ten patterns; check every result against a dense reference before timing it; write "
        "JSON and a Markdown table. Needs a GPU, except with --smoke (tiny sizes under Triton's interpreter)."
    )
    smoke, gpu = DEFAULTS["smoke"], DEFAULTS["gpu"]

    def default(name: str) -> str:
        return f"default {gpu[name]}; --smoke: {smoke[name]}"

    parser.add_argument("--smoke", action="store_true", help="tiny sizes that run on the CPU in seconds")
    parser.add_argument(
        "--patterns", nargs="+", choices=list(PATTERNS), metavar="PATTERN", help=f"of {', '.join(PATTERNS)}"
    )
    parser.add_argument("--lengths", nargs="+", type=int, metavar="N", help=f"tokens; {default('lengths')}")
    parser.add_argument(
        "--head-dims",
        nargs="*",
        type=int,
        metavar="D",
        help=f"head dims of the cases with as many key/value heads as query heads (none: only the GQA "
        f"case); {default('head_dims')}",
    )
    parser.add_argument("--heads", type=int, metavar="H", help=f"query heads; {default('heads')}")
    parser.add_argument(
        "--gqa-kv-heads",
        type=int,
        metavar="N",
        help=f"key/value heads of the GQA case, 0 for none; {default('gqa_kv_heads')}",
    )
    parser.add_argument(
        "--gqa-head-dim", type=int, metavar="D", help=f"its head dim; {default('gqa_head_dim')}"
    )
    parser.add_argument("--batch", type=int, default=1, metavar="B", help="default 1")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--flex", choices=["compiled", "eager"], help=f"how FlexAttention runs; {default('flex')}"
    )
    parser.add_argument(
        "--warmup-ms", type=float, default=25.0, help="do_bench warm-up on a GPU (default 25)"
    )
    parser.add_argument(
        "--rep-ms", type=float, default=100.0, help="do_bench repetition time on a GPU (default 100)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help=f"timed calls of launch metadata, and of kernels on the CPU; {default('repeats')}",
    )
    parser.add_argument(
        "--check-len", type=int, metavar="N", help=f"length of the mask check; {default('check_len')}"
    )
    parser.add_argument(
        "--oracle-max-len",
        type=int,
        metavar="N",
        help=f"check attnc against the float64 oracle up to this length; {default('oracle_max_len')}",
    )
    parser.add_argument(
        "--time-budget-s", type=float, metavar="S", help="start no new case after S seconds (default: none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random tensor (default 0)")
    parser.add_argument(
        "--output",
        type=Path,
        metavar="JSON",
        help="the JSON (the Markdown goes beside it, .md); default "
        "benchmarks/results/attention-DEVICE-DATE.json, with --smoke in the temporary directory",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: merge these reports (one device) into --output and write its Markdown",
    )
    parser.set_defaults(run=run_command)


def settings_from(args: argparse.Namespace) -> Settings:
    defaults = DEFAULTS["smoke" if args.smoke else "gpu"]

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    heads, gqa_kv_heads = pick("heads"), pick("gqa_kv_heads")
    configs = [HeadConfig(d, heads, heads) for d in pick("head_dims")]
    if gqa_kv_heads:
        if gqa_kv_heads >= heads or heads % gqa_kv_heads:
            raise BenchError(
                f"--gqa-kv-heads must divide the {heads} query heads and be fewer, got {gqa_kv_heads}"
            )
        configs.append(HeadConfig(pick("gqa_head_dim"), heads, gqa_kv_heads))
    if not configs:
        raise BenchError("no head configuration: give --head-dims or --gqa-kv-heads")
    for what, values in (
        ("--lengths", pick("lengths")),
        ("--head-dims", [c.head_dim for c in configs]),
        ("--heads", [heads]),
        ("--batch", [args.batch]),
        ("--repeats", [pick("repeats")]),
        ("--check-len", [pick("check_len")]),
    ):
        if min(values) < 1:
            raise BenchError(f"{what} must be positive, got {values}")
        if max(values) >= 2**31:  # sizes torch and the kernels index with 32-bit ints, or less
            raise BenchError(f"{what} must be below 2**31, got {values}")
    for what, value in (
        ("--warmup-ms", args.warmup_ms),
        ("--rep-ms", args.rep_ms),
        ("--time-budget-s", args.time_budget_s),
    ):
        # `float` takes 'nan' and 'inf': a NaN budget is never exceeded, so it would silently be none.
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BenchError(f"{what} must be a finite number at least 0, got {value}")
    if not 0 <= args.seed < 2**63:
        raise BenchError(f"--seed must be an int from 0 to 2**63 - 1, got {args.seed}")
    return Settings(
        smoke=args.smoke,
        patterns=tuple(args.patterns or PATTERNS),
        lengths=tuple(pick("lengths")),
        configs=tuple(configs),
        batch=args.batch,
        dtype=DTYPES[args.dtype],
        modes=tuple(m for m in MODES if m in args.modes),
        methods=tuple(m for m in METHODS if m in args.methods),
        flex_compiled=pick("flex") == "compiled",
        timing=Timing(args.warmup_ms, args.rep_ms, pick("repeats")),
        check_len=pick("check_len"),
        oracle_max_len=pick("oracle_max_len"),
        time_budget_s=args.time_budget_s,
        seed=args.seed,
        scale=SMOKE_SCALE if args.smoke else GPU_SCALE,
    )


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_command(args: argparse.Namespace) -> int:
    """`attnc bench`: 0 when every check passed, 1 when one failed, 2 on a bad setting."""
    try:
        if args.merge:
            if args.output is None:
                raise BenchError("--merge needs --output")
            check_output(args.output)
            report = merge(args.merge)
            write(report, args.output)
            print(markdown(report))
            print(f"wrote {args.output} and {args.output.with_suffix('.md')}")
            return 1 if failed(report) else 0
        settings = settings_from(args)
        device = torch.device("cuda" if active() != INTERPRETER else "cpu")
        if device.type == "cpu" and not settings.smoke:
            raise BenchError(
                "no GPU in this process: attnc bench times GPU kernels; --smoke runs tiny sizes on the CPU"
            )
        output = args.output
        if output is None:
            name = f"attention-{slug(device_name(device))}-{datetime.date.today().isoformat()}"
            folder = Path(tempfile.gettempdir()) if settings.smoke else RESULTS
            output = folder / f"{name}{'-smoke' if settings.smoke else ''}.json"
        check_output(output)  # not after a run of hours
        report = run(settings, device, output)
    except BenchError as err:
        print(f"attnc bench: error: {err}", file=sys.stderr)
        return 2
    print()
    print(markdown(report))
    print(f"wrote {output} and {output.with_suffix('.md')} ({report.get('total_wall_s', 0.0):.0f} s)")
    return 1 if failed(report) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnc bench")
    configure_parser(parser)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
