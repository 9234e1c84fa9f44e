"""Judging kernels against the dense oracle: the tolerance rule, shared by the tests and `attnc run`.

The rule (DESIGN.md section 7, as PyTorch's FlexAttention tests): a kernel's error against the float64
oracle may be at most `FACTOR` times the error of the same attention computed densely in the input
dtype (`Kernel.reference(..., precision=dtype)`: scores, score function and softmax in that type, the
mask exact), plus a tiny `ATOL`. Rows the mask leaves empty must be exactly 0 with lse -inf, and no
value may be NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FACTOR = 2.0
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


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

    def bound(self, dense_error: float) -> float:
        return FACTOR * dense_error + ATOL[self.dtype]

    @property
    def ok(self) -> bool:
        return (
            not self.has_nan
            and self.empty_rows_match
            and self.empty_rows_zero
            and self.out_error <= self.bound(self.out_dense_error)
            and self.lse_error <= self.bound(self.lse_dense_error)
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
    )
