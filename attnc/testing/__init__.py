"""Judging kernels against the dense oracle: the tolerance rule, shared by the tests, `attnc run` and
`attnc fuzz`, for outputs (`compare`), gradients (`compare_gradients`) and tile maps (`tile_problems`).

The rule (DESIGN.md section 7, as PyTorch's FlexAttention tests): a kernel's error against the float64
oracle may be at most `FACTOR` times the error of the same attention computed densely in the input
dtype (`Kernel.reference(..., precision=dtype)`: scores, score function and softmax in that type, the
mask exact), plus a tiny `ATOL` and one unit of the dtype's precision at the result's magnitude (a
stored result is rounded to its dtype). Rows the mask leaves empty must be exactly 0 with lse -inf, and
no value may be NaN.

Submodules: `attnc.testing.programs` (Hypothesis strategies of random programs and shapes) and
`attnc.testing.fuzz` (the differential fuzzer behind `attnc fuzz`); both need Hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

FACTOR = 2.0
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
GRAD_ATOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-4}


@dataclass(frozen=True)
class Comparison:
    """How a kernel's output and lse compare with the oracle's (max absolute errors)."""

    dtype: torch.dtype
    out_error: float
    out_dense_error: float  # of the same-dtype dense computation
    lse_error: float  # over the rows that see some key
    lse_dense_error: float
    empty_rows_match: bool  # lse is -inf exactly where the oracle's is
    empty_rows_zero: bool  # and the output there is 0
    has_nan: bool
    out_magnitude: float = 0.0  # max |oracle output|
    lse_magnitude: float = 0.0  # max |oracle lse| over the rows that see some key

    def bound(self, dense_error: float, magnitude: float = 0.0, dtype: torch.dtype | None = None) -> float:
        """The most error allowed: FACTOR x the dense error, the atol, and one unit of precision (of
        `dtype`, else the inputs' dtype) at the value's magnitude (the rounding of the stored value alone
        may be half that; with few values the dense computation may happen to round better
        everywhere)."""
        unit = torch.finfo(dtype or self.dtype).eps
        return FACTOR * dense_error + ATOL[self.dtype] + unit * magnitude

    @property
    def ok(self) -> bool:
        return (
            not self.has_nan
            and self.empty_rows_match
            and self.empty_rows_zero
            and self.out_error <= self.bound(self.out_dense_error, self.out_magnitude)
            # The lse is float32 whatever the inputs' dtype; the kernel computes it in base 2, with
            # roundings the dense natural-log computation does not make (at |lse| ~ 43 a float32 unit
            # is 3.8e-6).
            and self.lse_error <= self.bound(self.lse_dense_error, self.lse_magnitude, torch.float32)
        )

    def describe(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        dtype = str(self.dtype).removeprefix("torch.")
        text = (
            f"max |out - oracle| {self.out_error:.3g} (dense {dtype}: {self.out_dense_error:.3g}), "
            f"max |lse - oracle| {self.lse_error:.3g} (dense {dtype}: {self.lse_dense_error:.3g}): {verdict}"
        )
        problems = [
            what
            for what, bad in (
                ("NaN in the output", self.has_nan),
                ("rows with lse -inf differ from the oracle's", not self.empty_rows_match),
                ("a row that sees no key is not 0", not self.empty_rows_zero),
            )
            if bad
        ]
        return text + "".join(f"; {p}" for p in problems)


def compare(
    kern: Any,
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    **inputs: torch.Tensor,
) -> Comparison:
    """Compare a kernel's (out, lse) for these arguments with the oracle's, by the tolerance rule."""
    ref, ref_lse = kern.reference(q, k, v, return_lse=True, scale=scale, out_dtype=torch.float64, **inputs)
    dense, dense_lse = kern.reference(
        q, k, v, return_lse=True, scale=scale, out_dtype=torch.float64, precision=q.dtype, **inputs
    )
    empty = torch.isneginf(ref_lse)
    seen = ~empty

    def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b).abs().max().item() if a.numel() else 0.0

    return Comparison(
        dtype=q.dtype,
        out_error=max_error(out, ref),
        out_dense_error=max_error(dense, ref),
        lse_error=max_error(lse[seen], ref_lse[seen]),
        lse_dense_error=max_error(dense_lse[seen], ref_lse[seen]),
        empty_rows_match=bool(torch.equal(torch.isneginf(lse), empty)),
        empty_rows_zero=bool((out[empty] == 0).all()),
        has_nan=bool(out.isnan().any() or lse.isnan().any()),
        out_magnitude=ref.abs().max().item() if ref.numel() else 0.0,
        lse_magnitude=ref_lse[seen].abs().max().item() if bool(seen.any()) else 0.0,
    )


@dataclass(frozen=True)
class GradientComparison:
    """How a kernel's gradients compare with autograd through the oracle, by the same rule: for each
    gradient (dq, dk, dv, then the inputs'), the kernel's max absolute error and the error of the
    same-dtype dense computation, both against float64. Gradients are sums over many scores and can
    be large (an input's, summed over every query and key, reaches hundreds), and they are stored in
    their tensor's dtype: the atol is relative to the gradient's largest magnitude (when that exceeds
    1) and adds one unit of the dtype's precision there, as the rounding of the stored value alone
    may be that large. Its base is `GRAD_ATOL`: in float32 ten times the forward's, for the
    cancellation in dP - Delta every FlashAttention-style backward has (Delta = rowsum(dO * O) and dP
    = dO V^T are summed in different orders; where a row's weight sits on one key the two cancel to
    rounding, while the dense softmax backward cancels them exactly).

    Last, `stored`: the same backward takes Delta from the *stored* output, rounded to its dtype,
    which moves every gradient by exactly what an lse gradient of rowsum(dO * (round(O) - O)) would
    (Delta enters dZ = P * (dP - Delta) as the lse's gradient does, with the other sign). The oracle
    computes that shift, and the bound admits it: in bfloat16 with few keys per row it can be 5x the
    dense error (the dense softmax backward takes its rowsum from the unrounded probabilities)."""

    dtype: torch.dtype
    errors: dict[str, tuple[float, float, float]]  # name -> (kernel error, dense error, max |oracle|)
    has_nan: bool
    stored: dict[str, float] = field(default_factory=dict)  # name -> max shift by the stored output
    # name -> the dtype a gradient is stored in, where it is an input's coarser than q's (a float16
    # input beside float32 q): the kernel rounds its float64 sum to it once, the oracle its own, and
    # sums a rounding apart may round a unit of that dtype apart.
    storage: dict[str, torch.dtype] = field(default_factory=dict)

    def bound(
        self,
        dense_error: float,
        magnitude: float = 1.0,
        stored: float = 0.0,
        storage: torch.dtype | None = None,
    ) -> float:
        # One unit of precision for the stored gradient; in 16 bits another for dS, rounded to the
        # dtype for the tensor-core product (an error the dense computation spreads differently).
        units = 1 if self.dtype == torch.float32 else 2
        relative = GRAD_ATOL[self.dtype] + units * torch.finfo(self.dtype).eps
        if storage is not None and torch.finfo(storage).eps > torch.finfo(self.dtype).eps:
            relative += torch.finfo(storage).eps
        return FACTOR * dense_error + stored + relative * max(1.0, magnitude)

    def _within(self, name: str) -> bool:
        e, d, m = self.errors[name]
        return e <= self.bound(d, m, self.stored.get(name, 0.0), self.storage.get(name))

    @property
    def ok(self) -> bool:
        return not self.has_nan and all(self._within(name) for name in self.errors)

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [
            f"{name} {e:.3g} (dense {dtype}: {d:.3g}"
            + (f", stored-output shift {self.stored[name]:.3g}" if self.stored.get(name) else "")
            + f"){'' if self._within(name) else ' MISMATCH'}"
            for name, (e, d, m) in self.errors.items()
        ]
        verdict = "ok" if self.ok else "MISMATCH"
        nan = "; NaN in a gradient" if self.has_nan else ""
        return "max |grad - oracle|: " + ", ".join(parts) + f": {verdict}{nan}"


def compare_gradients(
    kern: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    seed: int = 0,
    lse_grad: bool = True,
    judge: Any = None,
    **inputs: Any,
) -> GradientComparison:
    """Differentiate the kernel (out and, with `lse_grad`, lse, against random upstream gradients)
    with respect to q, k, v and every input that requires grad, and judge the gradients against
    autograd through the oracle (float64) of `judge` (default: the kernel itself) by the tolerance
    rule. `inputs`: the input tensors, and runtime parameter values for the calls."""
    judge = kern if judge is None else judge
    g = torch.Generator().manual_seed(seed)
    shape_out = (*q.shape[:3], v.shape[3])
    dout = torch.randn(shape_out, generator=g).to(q.dtype).to(q.device)
    dlse = torch.randn(q.shape[:3], generator=g).to(q.device) if lse_grad else None
    tensors = {n: t for n, t in inputs.items() if isinstance(t, torch.Tensor)}
    values = {n: x for n, x in inputs.items() if n not in tensors}
    names = ["dq", "dk", "dv", *(f"d{n}" for n, t in tensors.items() if t.requires_grad)]

    def grads(precision: torch.dtype | None) -> list[torch.Tensor]:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if precision == torch.float64:
            leaves = [t.double().detach().requires_grad_() for t in leaves]
        ins = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in tensors.items()}
        wrt = leaves + [t for t in ins.values() if t.requires_grad]
        if precision is None:
            out, lse = kern(*leaves, scale=scale, return_lse=True, **ins, **values)
        else:
            out, lse = judge.reference(
                *leaves,
                scale=scale,
                return_lse=True,
                out_dtype=torch.float64,
                precision=precision,
                **ins,
                **values,
            )
        outputs, upstream = [out], [dout.to(out.dtype)]
        if dlse is not None:
            outputs.append(lse)
            upstream.append(dlse.to(lse.dtype))
        # (A score that ignores `s` leaves q and k unused, and the lse may be constant: 0 gradients.)
        used = [(o, u) for o, u in zip(outputs, upstream, strict=True) if o.requires_grad]
        if not used:
            return [torch.zeros_like(t, dtype=torch.float64) for t in wrt]
        result = torch.autograd.grad(
            [o for o, _ in used], wrt, [u for _, u in used], allow_unused=True, materialize_grads=True,
            retain_graph=precision == torch.float64,
        )  # fmt: skip
        if precision == torch.float64:
            shift[:] = [torch.zeros_like(t, dtype=torch.float64) for t in wrt]
            if lse.requires_grad:  # the shift of every gradient by the stored output's rounding
                rounded = out.detach().to(q.dtype).double()
                delta = (dout.double() * (rounded - out.detach())).sum(-1)
                shift[:] = torch.autograd.grad(lse, wrt, delta, allow_unused=True, materialize_grads=True)
        return [x.double() for x in result]

    shift: list[torch.Tensor] = []
    kernel, oracle_, dense = grads(None), grads(torch.float64), grads(q.dtype)

    def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a - b).abs().max().item() if a.numel() else 0.0

    return GradientComparison(
        dtype=q.dtype,
        errors={
            name: (max_error(a, r), max_error(d, r), r.abs().max().item() if r.numel() else 0.0)
            for name, a, r, d in zip(names, kernel, oracle_, dense, strict=True)
        },
        has_nan=any(bool(a.isnan().any()) for a in kernel),
        stored={
            name: x.abs().max().item() if x.numel() else 0.0 for name, x in zip(names, shift, strict=True)
        },
        storage={
            f"d{n}": t.dtype for n, t in tensors.items() if t.requires_grad and t.dtype.is_floating_point
        },
    )


# ---- tiles ----------------------------------------------------------------------------------------------


def tile_classes(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The exact tile classes of a dense mask [B, H, Lq, Lkv]: int8 [B, H, ceil(Lq/BM), ceil(Lkv/BN)],
    0 EMPTY / 1 PARTIAL / 2 FULL, counting only positions inside the lengths."""
    from attnc.runtime.plan import EMPTY, FULL, PARTIAL

    bm, bn = block
    b, h, lq, lkv = mask.shape
    mq, nk = -(-lq // bm), -(-lkv // bn)
    pad = (0, nk * bn - lkv, 0, mq * bm - lq)
    inside = torch.nn.functional.pad(torch.ones(b, h, lq, lkv, dtype=torch.bool), pad, value=False)
    padded = torch.nn.functional.pad(mask.cpu(), pad, value=False)
    tiles = padded.reshape(b, h, mq, bm, nk, bn).transpose(3, 4).flatten(4)
    inside = inside.reshape(b, h, mq, bm, nk, bn).transpose(3, 4).flatten(4)
    anywhere = (tiles & inside).any(-1)
    everywhere = (tiles | ~inside).all(-1)
    return torch.where(everywhere, FULL, torch.where(anywhere, PARTIAL, EMPTY)).to(torch.int8)


def tile_problems(
    kern: Any,
    q_len: int,
    kv_len: int,
    block: tuple[int, int],
    tight: bool = False,
    judge: Any = None,
    **kw: Any,
) -> list[str]:
    """What is wrong with a kernel's tile analysis at these sizes, judged by the dense mask of `judge`
    (default: the kernel itself; empty: nothing): `block_map` must be exact; the launch plan and its
    transpose (the backward's) may call a tile PARTIAL that is EMPTY or FULL, never the reverse (that
    would drop keys or skip the mask), and with `tight` must be exact too. `kw`: sizes, inputs and
    runtime parameter values, for every call."""
    from attnc.runtime.plan import PARTIAL

    expected = tile_classes((kern if judge is None else judge).mask(q_len, kv_len, **kw), block)
    problems = []
    got = kern.block_map(q_len, kv_len, block=block, **kw).cpu()
    if not torch.equal(got.expand_as(expected), expected):
        at = (got.expand_as(expected) != expected).nonzero()[0].tolist()
        problems.append(f"block_map is not exact at [b, h, q tile, kv tile] = {at}")
    plan = kern.plan(q_len, kv_len, block=block, **kw)
    for what, planned in (
        ("plan", plan.block_map()),
        ("transposed plan", plan.block_map(transposed=True).transpose(-1, -2)),
    ):
        planned = planned.cpu().expand_as(expected)
        wrong = (planned != expected) & (planned != PARTIAL)
        if wrong.any():
            problems.append(f"{what} claims a class the tile does not have at {wrong.nonzero()[0].tolist()}")
        elif tight and not torch.equal(planned, expected):
            problems.append(f"{what} is not exact")
    return problems
