"""`attnc run`: a pattern's kernel on random inputs, held to the oracle, timed, with the backend named."""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import triton

from attnc.api import Kernel, _dim_value
from attnc.ir.results import Sparsity
from attnc.runtime.backend import INTERPRETER, active
from attnc.show import ShowError, random_inputs
from attnc.testing import Comparison, GradientComparison, compare, compare_gradients

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_SHAPE = {INTERPRETER: (1, 2, 256, 64), "cuda": (2, 16, 4096, 128)}


@dataclass(frozen=True)
class RunReport:
    kernel: Kernel
    shape: tuple[int, int, int, int]
    kv_len: int
    kv_heads: int
    dtype: torch.dtype
    backend: str
    device: str
    config: str
    sparsity: Sparsity
    times_s: list[float]
    comparison: Comparison | None
    backward_times_s: list[float] | None = None  # forward + backward, with --backward
    gradients: GradientComparison | None = None

    @property
    def ok(self) -> bool:
        return (self.comparison is None or self.comparison.ok) and (
            self.gradients is None or self.gradients.ok
        )

    def describe(self) -> str:
        b, h, lq, d = self.shape
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [
            f"{_title(self.kernel)}: q [{b}, {h}, {lq}, {d}] {dtype}, "
            f"k/v [{b}, {self.kv_heads}, {self.kv_len}, {d}]",
            f"backend: {self.backend} ({self.device}; Triton {triton.__version__})",
            f"launch: {self.config}; plan: {self.sparsity}"
            + (" (no metadata)" if self.sparsity.analytic else " (block-sparse metadata)"),
        ]
        if self.comparison is not None:
            lines.append(f"kernel vs float64 oracle: {self.comparison.describe()}")
        else:
            lines.append("kernel vs float64 oracle: not checked (--no-check)")
        if self.gradients is not None:
            lines.append(f"gradients vs float64 oracle: {self.gradients.describe()}")
        note = " (Triton's interpreter on the CPU: not a speed figure)" if self.backend == INTERPRETER else ""
        median = statistics.median(self.times_s) * 1e3
        lines.append(f"time: {median:.3f} ms, median of {len(self.times_s)} calls{note}")
        if self.backward_times_s is not None:
            median, calls = statistics.median(self.backward_times_s) * 1e3, len(self.backward_times_s)
            lines.append(f"time forward + backward: {median:.3f} ms, median of {calls} calls{note}")
        return "\n".join(lines) + "\n"


def memory_needed(
    kernel: Kernel,
    shape: tuple[int, int, int, int],
    kv_len: int,
    kv_heads: int,
    check: bool,
    backward: bool,
) -> int:
    """About how many bytes a run of these sizes holds at once: q, k, v and the output (drawn in
    float32), the lse, the input tensors and, with the check, the float64 oracle's dense scores
    [B, H, L, M] and their softmax; gradients double what they differentiate."""
    batch, heads, q_len, dim = shape
    tensors = 4 * (
        2 * batch * heads * q_len * dim + 2 * batch * kv_heads * kv_len * dim + batch * heads * q_len
    )
    sizes = {"BATCH": batch, "NUM_HEADS": heads, "Q_LEN": q_len, "KV_LEN": kv_len}
    for decl in kernel.pattern.inputs:
        dims = [_dim_value(d, sizes) for d in decl.dims]
        tensors += 8 * math.prod(max(n or 0, 0) for n in dims)
    oracle = 2 * 8 * batch * heads * q_len * kv_len if check else 0
    return (tensors + oracle) * (2 if backward else 1)


def memory_available(device: torch.device) -> int | None:
    """The memory of the device the run allocates on: the GPU's, or the machine's RAM (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows) or no such name
        return None


def _gib(n: int) -> str:
    size, unit = n / 2**30, "GiB"
    for bigger in ("TiB", "PiB", "EiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:,.1f} {unit}"


def _title(kernel: Kernel) -> str:
    return f"{kernel.name}({', '.join(f'{k}={v!r}' for k, v in kernel.params.items())})"


def run(
    kernel: Kernel,
    shape: tuple[int, int, int, int] | None = None,
    *,
    kv_len: int | None = None,
    kv_heads: int | None = None,
    dtype: str = "float16",
    seed: int = 0,
    repeats: int = 5,
    check: bool = True,
    backward: bool = False,
) -> RunReport:
    """Run `kernel` on random q, k, v (and inputs) of `shape` = (B, H, L, D); see `attnc run --help`.
    With `backward`, also differentiate it (q, k, v and the float inputs of the score): gradients
    checked and forward + backward timed."""
    backend = active()
    batch, heads, q_len, dim = shape or DEFAULT_SHAPE[backend]
    kv_len = q_len if kv_len is None else kv_len
    kv_heads = heads if kv_heads is None else kv_heads
    for what, value, least in (
        ("B", batch, 1),
        ("H", heads, 1),
        ("L", q_len, 0),
        ("D", dim, 1),
        ("kv-len", kv_len, 0),
    ):
        if value < least:
            raise ShowError(f"{what} must be at least {least}, got {value}")
    if kv_heads < 1 or heads % kv_heads:
        raise ShowError(f"--kv-heads must divide the {heads} query heads, got {kv_heads}")
    if repeats < 1:
        raise ShowError(f"--repeat must be at least 1, got {repeats}")
    device = torch.device("cuda" if backend != INTERPRETER else "cpu")
    # Sizes the memory cannot hold fail here, naming the option, rather than in the allocator mid-run.
    needed = memory_needed(kernel, (batch, heads, q_len, dim), kv_len, kv_heads, check, backward)
    available = memory_available(device)
    if available is not None and needed > available:
        checked = " and the oracle's float64 scores" if check else ""
        raise ShowError(
            f"--shape {batch},{heads},{q_len},{dim} (kv-len {kv_len}) needs about {_gib(needed)} for q, k, "
            f"v, the output{checked}; {'the GPU' if device.type == 'cuda' else 'this machine'} has "
            f"{_gib(available)}" + (": use smaller sizes, or --no-check" if check else ": use smaller sizes")
        )
    torch_dtype = DTYPES[dtype]
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=generator).to(device, torch_dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=generator).to(device, torch_dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=generator).to(device, torch_dtype)
    sizes = {"BATCH": batch, "NUM_HEADS": heads, "Q_LEN": q_len, "KV_LEN": kv_len}
    inputs = {n: t.to(device) for n, t in random_inputs(kernel, sizes, seed).items()}

    out, lse = kernel(q, k, v, return_lse=True, **inputs)  # the first call compiles (or tunes)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        kernel(q, k, v, **inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    comparison = compare(kernel, out, lse, q, k, v, **inputs) if check else None
    backward_times, gradients = None, None
    if backward:
        inputs = {n: t.requires_grad_(n in kernel._differentiable) for n, t in inputs.items()}
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        wrt = leaves + [t for t in inputs.values() if t.requires_grad]
        upstream = torch.randn(out.shape, generator=generator).to(device, torch_dtype)
        backward_times = []
        for _ in range(repeats + 1):  # the first call compiles the backward kernels
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.autograd.grad(kernel(*leaves, **inputs), wrt, upstream)
            if device.type == "cuda":
                torch.cuda.synchronize()
            backward_times.append(time.perf_counter() - start)
        backward_times = backward_times[1:]
        gradients = compare_gradients(kernel, q, k, v, seed=seed, **inputs) if check else None
    forward = kernel._forward
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    sparsity = kernel.pattern.sparsity
    assert sparsity is not None, "a kernel is compiled through block-sparsify"
    return RunReport(
        kernel=kernel,
        shape=(batch, heads, q_len, dim),
        kv_len=kv_len,
        kv_heads=kv_heads,
        dtype=torch_dtype,
        backend=backend,
        device=name,
        config=str(forward.last_config) if forward.last_config is not None else "no launch (empty output)",
        sparsity=sparsity,
        times_s=times,
        comparison=comparison,
        backward_times_s=backward_times,
        gradients=gradients,
    )
