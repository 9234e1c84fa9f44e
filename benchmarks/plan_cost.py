"""Metadata cost: attnc's launch plan (`Kernel.plan`) against FlexAttention's compiled `create_block_mask`.

Both answer the same question before an attention launch — which (query tile, key tile) pairs does the
kernel visit, and which of them are FULL — for tiles of 128 x 128, batch 1, one head. attnc answers it
from the compiled pattern: closed-form tile ranges for analytic patterns (no tensors at all), per-tile
summaries of the inputs for data-dependent ones (O(number of tiles), never the L x L elements).
FlexAttention evaluates its `mask_mod` on every (query, key) pair (O(L^2)), fused by `torch.compile`.

Method (DESIGN.md section 8: "measured side by side in one run"):

1. **Check** (default, at small lengths, before any timing): for every pattern, FlexAttention's
   `mask_mod` evaluated densely (`create_mask`) must equal attnc's oracle `kern.mask(L, L)`; the
   FULL/PARTIAL/EMPTY classes of Flex's `BlockMask` must equal attnc's exact `kern.block_map`; and
   attnc's plan (`plan.block_map()`) must be sound against that exact map (EMPTY and FULL only where
   exact); the PARTIAL tiles of the plan that are exactly EMPTY or FULL are counted. Any mismatch
   stops the run: a benchmark of two different masks must not pass silently.
2. **Timing**: each (method, pattern, length) runs in a fresh subprocess (this script with
   `--worker`). The subprocess builds what is built once per pattern — attnc's `Kernel` (parsing,
   compilation; timed as `build_s`) or Flex's `mask_mod` and `torch.compile(create_block_mask)` — and
   the inputs (`doc` ids, outside the timing for both). It makes one warm-up call (timed as `warmup_s`:
   for Flex this includes the torch.compile compile for this length), then timed calls: at least
   `--reps` and until `--min-time-s` has passed (at most 100), fewer where one call is so slow that they
   would overrun `--budget-s`; the median is reported. A call is everything a user pays per launch
   configuration: `kern.plan(L, L, block=(128, 128), device=..., **inputs)` and
   `compiled_create_block_mask(mask_mod, 1, 1, L, L, device=..., BLOCK_SIZE=128)`, synchronised on CUDA.
3. **Peak memory** of the timed calls over the state after the warm-up: on CPU, VmHWM - VmRSS from
   /proc/self/status with the high-water mark reset (`/proc/self/clear_refs` = 5) and freed heap
   returned to the OS (`malloc_trim`) just before the timed calls; on CUDA, max_memory_allocated -
   memory_allocated with the peak statistics reset. CPU figures are page-granular, so a call that
   allocates almost nothing reads as ~0 MiB. On a CPU shared with other busy processes, pass
   `--threads` below the number of idle cores: a torch thread descheduled by another process stalls
   every parallel region, inflating both methods' times 10-100x (the run records the load average).
4. **Guard**: before each length the previous length's median time and peak memory of the same
   (method, pattern) are scaled by the square of the length ratio (both methods are at most quadratic
   in L: Flex in elements, attnc in tiles). A case whose projected warm-up plus one call exceeds
   `--budget-s`, or whose projected memory exceeds `--max-mem-gib`, is not run and is recorded as
   skipped with the projection; a subprocess that crashes, is killed (e.g. out of memory) or times out
   is recorded as such.
5. **Cross-check at full size**: after its timing, each Flex subprocess also builds attnc's plan for
   the same case and compares it with Flex's (exact) block mask: soundness violations (must be 0) and
   the number of tiles the plan leaves PARTIAL that are EMPTY or FULL.

Usage::

    python benchmarks/plan_cost.py                  # check, then the full sweep (CPU)
    python benchmarks/plan_cost.py --quick          # check + a small subset (smoke test, < 1 min)
    python benchmarks/plan_cost.py --device cuda    # the same on a GPU
    python benchmarks/plan_cost.py --methods attnc --patterns document_causal --threads 1 \
        --merge benchmarks/results/plan_cost-....json --label r5   # rerun some rows, keep the others

Results go to `benchmarks/results/plan_cost-<device>-<date>.json`; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that `python benchmarks/plan_cost.py` finds attnc without installing it
    sys.path.insert(0, str(ROOT))

BLOCK = 128
LENGTHS = (8192, 32768, 131072, 1048576)
PATTERNS = ("causal", "sliding_window", "streaming_llm", "document_causal", "neighborhood_2d")
METHODS = ("attnc", "flex")
QUICK_LENGTHS = (8192,)
QUICK_PATTERNS = ("causal", "document_causal")
WINDOW = 1024
SINKS = 4
# 31 x 31 neighbourhoods: a typical NATTEN kernel size for image/video models, wider than a tile's
# 128 tokens of one grid row needs to see, so no tile is FULL and every visited tile is PARTIAL.
KERNEL_2D = 31
MAX_DOC = 4096  # document lengths are uniform in 1..MAX_DOC
SEED = 0
MAX_REPS = 100
RESULT_PREFIX = "PLAN_COST_RESULT "
EMPTY, PARTIAL, FULL = 0, 1, 2

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def square_grid(length: int) -> tuple[int, int]:
    """A row-major (height, width) grid of `length` tokens, as square as powers of two allow."""
    width = 1 << math.ceil(math.log2(length) / 2)
    if length % width:
        raise ValueError(f"no power-of-two grid for {length} tokens")
    return length // width, width


def document_ids(length: int, max_doc: int, seed: int, device: torch.device) -> torch.Tensor:
    """int32 [1, length]: sorted document ids of documents with lengths uniform in 1..max_doc."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_doc + 1, (length,), generator=gen)
    count = int(torch.searchsorted(sizes.cumsum(0), length)) + 1
    ids = torch.repeat_interleave(torch.arange(count), sizes[:count])[:length]
    return ids.to(torch.int32).reshape(1, length).to(device)


@dataclass(frozen=True)
class Case:
    """One pattern at one length: the attnc kernel, the equivalent Flex `mask_mod`, and their inputs."""

    pattern: str
    length: int
    grid: tuple[int, int] | None = None  # neighborhood_2d: (height, width); default `square_grid`
    max_doc: int = MAX_DOC  # document_causal

    @property
    def params(self) -> dict[str, Any]:
        """The attnc pattern's parameters (and the workload's shape parameters)."""
        if self.pattern == "sliding_window":
            return {"window": WINDOW}
        if self.pattern == "streaming_llm":
            return {"window": WINDOW, "sinks": SINKS}
        if self.pattern == "document_causal":
            return {"max_doc": self.max_doc, "seed": SEED}
        if self.pattern == "neighborhood_2d":
            height, width = self.grid or square_grid(self.length)
            return {"height": height, "width": width, "kernel_h": KERNEL_2D, "kernel_w": KERNEL_2D}
        return {}

    def kernel(self) -> Any:
        """The attnc `Kernel` (parsed and compiled here: this is the one-time cost)."""
        import attnc

        if self.pattern == "causal":
            return attnc.stdlib().causal()
        if self.pattern == "sliding_window":
            return attnc.stdlib().sliding_window(window=WINDOW)
        if self.pattern == "streaming_llm":
            return attnc.load(ROOT / "examples" / "streaming_llm.attn").streaming_llm(
                window=WINDOW, sinks=SINKS
            )
        if self.pattern == "document_causal":
            return attnc.load(ROOT / "examples" / "document_causal.attn").document_causal()
        if self.pattern == "neighborhood_2d":
            return attnc.stdlib().neighborhood_2d(**self.params)
        raise ValueError(f"unknown pattern {self.pattern}")

    def inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The call-time inputs, shared by both methods."""
        if self.pattern == "document_causal":
            return {"doc": document_ids(self.length, self.max_doc, SEED, device)}
        return {}

    def mask_mod(self, inputs: dict[str, torch.Tensor]) -> MaskMod:
        """FlexAttention's `mask_mod` with exactly the semantics of the attnc pattern."""
        if self.pattern == "causal":
            return lambda b, h, q, kv: kv <= q
        if self.pattern == "sliding_window":
            return lambda b, h, q, kv: (kv <= q) & (q - kv < WINDOW)
        if self.pattern == "streaming_llm":
            return lambda b, h, q, kv: (kv <= q) & ((q - kv < WINDOW) | (kv < SINKS))
        if self.pattern == "document_causal":
            doc = inputs["doc"]
            return lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (kv <= q)
        if self.pattern == "neighborhood_2d":
            params = self.params
            height, width, kernel_h, kernel_w = (
                params[k] for k in ("height", "width", "kernel_h", "kernel_w")
            )

            def neighborhood_2d(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor):
                return neighborhood_axis(q // width, kv // width, height, kernel_h) & neighborhood_axis(
                    q % width, kv % width, width, kernel_w
                )

            return neighborhood_2d
        raise ValueError(f"unknown pattern {self.pattern}")


def neighborhood_axis(i: torch.Tensor, j: torch.Tensor, extent: int, kernel: int) -> torch.Tensor:
    """stdlib.attn's `neighborhood_axis` without dilation or causality (NATTEN): a window of `kernel`
    coordinates centred on i, shifted inward at the borders so that it always holds `kernel`."""
    start = torch.clamp(i - kernel // 2, 0, extent - kernel)
    return (start <= j) & (j < start + kernel)


# ---- measuring ----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_freed_memory(device: torch.device) -> None:
    """Return freed memory, so that the next allocations show in RSS / the allocator's statistics."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak memory of what runs after `start()`, over the memory in use at `start()`, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        release_freed_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current VmRSS
            self.baseline = proc_status_kib("VmRSS") * 1024

    @property
    def baseline_mib(self) -> float:
        return self.baseline / 2**20

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = proc_status_kib("VmHWM") * 1024
        return max(peak - self.baseline, 0) / 2**20


def timed(call: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = call()
    synchronize(device)
    return time.perf_counter() - start, out


def repeat_timed(
    call: Callable[[], Any], device: torch.device, reps: int, min_time_s: float, budget_s: float
) -> list[float]:
    """Timed calls: at least `reps` and `min_time_s` of them (at most MAX_REPS), one at least, none
    that would take the total past `budget_s`."""
    times: list[float] = []
    while len(times) < MAX_REPS:
        total = sum(times)
        if times and (
            (len(times) >= reps and total >= min_time_s) or total + statistics.median(times) > budget_s
        ):
            break
        elapsed, out = timed(call, device)
        del out
        times.append(elapsed)
    return times


# ---- tile classes -------------------------------------------------------------------------------------


def flex_classes(mask: BlockMask) -> torch.Tensor:
    """Flex's BlockMask as tile classes, int8 [B, H, query tiles, key tiles] (0 EMPTY, 1 PARTIAL,
    2 FULL), on the CPU: row r lists its first `kv_num_blocks[r]` entries of `kv_indices[r]` (and
    full_*)."""
    classes = torch.zeros(mask.kv_indices.shape, dtype=torch.int8)
    for num_blocks, indices, value in (
        (mask.kv_num_blocks, mask.kv_indices, PARTIAL),
        (mask.full_kv_num_blocks, mask.full_kv_indices, FULL),
    ):
        if num_blocks is None or indices is None:
            continue
        num_blocks, indices = num_blocks.cpu(), indices.cpu()
        valid = torch.arange(indices.shape[-1], device=indices.device) < num_blocks.unsqueeze(-1)
        src = torch.where(valid, value, EMPTY).to(torch.int8)
        classes.scatter_reduce_(-1, indices.long(), src, reduce="amax")
    return classes


def class_counts(classes: torch.Tensor) -> dict[str, int]:
    return {
        name: int((classes == value).sum())
        for name, value in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))
    }


def plan_against_exact(plan_map: torch.Tensor, exact: torch.Tensor) -> dict[str, int]:
    """How the plan's classes relate to the exact ones: `unsound` counts tiles the plan calls EMPTY or
    FULL wrongly (must be 0); `partial_but_empty` / `partial_but_full` the tiles it leaves PARTIAL
    that are exactly EMPTY / FULL (allowed, but the kernel then does work it need not)."""
    plan_map, exact = torch.broadcast_tensors(plan_map.cpu(), exact.cpu())
    return {
        "tiles": exact.numel(),
        "unsound": int(((plan_map != PARTIAL) & (plan_map != exact)).sum()),
        "partial_but_empty": int(((plan_map == PARTIAL) & (exact == EMPTY)).sum()),
        "partial_but_full": int(((plan_map == PARTIAL) & (exact == FULL)).sum()),
    }


# ---- check mode ----------------------------------------------------------------------------------------


def check_cases() -> list[Case]:
    """Small cases covering every benchmark pattern, plus grids whose rows straddle tiles and short
    documents (many document boundaries inside tiles)."""
    cases = [Case(pattern, 4096) for pattern in PATTERNS]
    cases += [
        Case("neighborhood_2d", 4096, grid=(32, 128)),
        Case("neighborhood_2d", 3840, grid=(48, 80)),
        Case("document_causal", 4096, max_doc=300),
    ]
    return cases


def check_case(case: Case, device: torch.device) -> dict[str, Any]:
    """Flex's dense mask and block mask against attnc's oracle and exact block map; the plan's
    soundness and looseness against the exact map. `ok` is False on any mismatch."""
    kern = case.kernel()
    inputs = case.inputs(device)
    length = case.length
    mask_mod = case.mask_mod(inputs)
    flex_dense = create_mask(mask_mod, 1, 1, length, length, device=device)
    attnc_dense = kern.mask(length, length, **inputs)
    dense_mismatches = int((flex_dense.cpu() != attnc_dense.cpu()).sum())
    flex_map = flex_classes(
        create_block_mask(mask_mod, 1, 1, length, length, device=device, BLOCK_SIZE=BLOCK)
    )
    exact = kern.block_map(length, length, block=(BLOCK, BLOCK), **inputs).cpu()
    tile_mismatches = int((flex_map != exact).sum())
    plan = kern.plan(length, length, block=(BLOCK, BLOCK), device=device, **inputs)
    versus_exact = plan_against_exact(plan.block_map(), exact)
    ok = dense_mismatches == 0 and tile_mismatches == 0 and versus_exact["unsound"] == 0
    return {
        "pattern": case.pattern,
        "length": length,
        "params": case.params,
        "ok": ok,
        "dense_mismatches": dense_mismatches,
        "allowed_pairs": int(attnc_dense.sum()),
        "tile_mismatches": tile_mismatches,
        "exact_tiles": class_counts(exact),
        "plan_sparsity": plan.sparsity,
        "plan_vs_exact": versus_exact,
    }


def run_checks(device: torch.device) -> list[dict[str, Any]]:
    results = []
    for case in check_cases():
        result = check_case(case, device)
        loose = result["plan_vs_exact"]
        print(
            f"check {case.pattern:16} L={case.length:5} {case.params}: "
            f"{'ok' if result['ok'] else 'MISMATCH'} (dense mismatches {result['dense_mismatches']}, "
            f"tile mismatches {result['tile_mismatches']}, plan unsound {loose['unsound']}, "
            f"plan PARTIAL but EMPTY/FULL {loose['partial_but_empty']}/{loose['partial_but_full']})",
            flush=True,
        )
        results.append(result)
    return results


# ---- one case, in a subprocess ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    method: str
    pattern: str
    length: int
    device: str
    reps: int
    min_time_s: float
    budget_s: float
    threads: int | None


def run_worker(spec: WorkerSpec) -> dict[str, Any]:
    """Time one (method, pattern, length) in this (fresh) process; see the module docstring."""
    device = torch.device(spec.device)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    if device.type == "cuda":
        torch.cuda.init()
    case = Case(spec.pattern, spec.length)
    length = spec.length
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    start = time.perf_counter()
    if spec.method == "attnc":
        kern = case.kernel()
        result["build_s"] = time.perf_counter() - start
        inputs = case.inputs(device)
        from attnc.analysis.summaries import forget_tables

        def call() -> Any:
            # Every call summarises its inputs anew, as a plan for a new input does (repeated plans
            # of one unchanged input reuse its range tables: `RangeTable.of`).
            forget_tables()
            return kern.plan(length, length, block=(BLOCK, BLOCK), device=device, **inputs)

    else:
        inputs = case.inputs(device)
        mask_mod = case.mask_mod(inputs)
        compiled = torch.compile(create_block_mask)

        def call() -> Any:
            return compiled(mask_mod, 1, 1, length, length, device=device, BLOCK_SIZE=BLOCK)

    result["warmup_s"], out = timed(call, device)
    del out
    memory = PeakMemory(device)
    memory.start()
    cpu_start = time.process_time()
    times = repeat_timed(call, device, spec.reps, spec.min_time_s, spec.budget_s)
    # The process's CPU time per call: less disturbed than the wall time by other processes on a
    # shared CPU (with --threads 1 it is the one thread's time).
    result["mean_cpu_s"] = (time.process_time() - cpu_start) / len(times)
    result["peak_mib"] = memory.peak_mib()
    result["baseline_mib"] = memory.baseline_mib
    result |= {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "reps": len(times),
    }
    # Untimed facts about the result, and the cross-check against the other method.
    out = call()
    if spec.method == "attnc":
        result["sparsity"] = out.sparsity
        result["metadata_bytes"] = sum(t.numel() * t.element_size() for t in out.tensors().values())
        materialise_s, classes = timed(out.block_map, device)
        result["block_map_s"] = materialise_s  # a dense tile map, which no kernel needs: for reference
        result["tiles"] = class_counts(classes)
    else:
        tensors = [t for t in out.as_tuple() if isinstance(t, torch.Tensor)]
        result["metadata_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
        exact = flex_classes(out)
        result["tiles"] = class_counts(exact)
        del out
        kern = case.kernel()
        plan = kern.plan(length, length, block=(BLOCK, BLOCK), device=device, **inputs)
        result["attnc_plan_vs_flex"] = plan_against_exact(plan.block_map(), exact)
    return result


def worker_main(spec_json: str) -> None:
    spec = WorkerSpec(**json.loads(spec_json))
    result = run_worker(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def launch_worker(spec: WorkerSpec, cold_compile: bool, timeout_s: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter; a crash, kill or timeout becomes the case's status."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec.__dict__)]
    env = dict(os.environ)
    cache_dir = None
    if cold_compile and spec.method == "flex":  # a fresh compile cache: warmup_s is a cold compile
        cache_dir = tempfile.mkdtemp(prefix="plan_cost_inductor_")
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as err:
        return {
            "status": "timeout",
            "reason": f"no result after {timeout_s:.0f} s",
            # TimeoutExpired carries bytes whatever `text` says.
            "stderr_tail": bytes(err.stderr or b"")[-2000:].decode("utf-8", "replace"),
        }
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX) and proc.returncode == 0:
            return {"status": "ok", "worker_wall_s": wall, **json.loads(line[len(RESULT_PREFIX) :])}
    if proc.returncode < 0:
        reason = f"killed by signal {-proc.returncode}" + (
            " (out of memory?)" if proc.returncode == -9 else ""
        )
    else:
        reason = f"exit status {proc.returncode}"
    stderr = proc.stderr.strip().splitlines()
    last = stderr[-1] if stderr else ""
    if re.search(r"OutOfMemoryError|out of memory|DefaultCPUAllocator", proc.stderr):
        reason += "; out of memory"
    return {
        "status": "crashed",
        "reason": f"{reason}: {last}" if last else reason,
        "worker_wall_s": wall,
        "stderr_tail": proc.stderr[-2000:],
    }


# ---- the sweep -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    budget_s: float
    max_mem_gib: float


def projection(previous: dict[str, Any] | None, length: int) -> dict[str, float] | None:
    """The previous length's median time and peak memory scaled by (length ratio)^2."""
    if previous is None:
        return None
    scale = (length / previous["length"]) ** 2
    return {
        "from_length": previous["length"],
        "call_s": previous["median_s"] * scale,
        "peak_mib": previous["peak_mib"] * scale,
    }


def skip_reason(projected: dict[str, float] | None, limits: Limits) -> str | None:
    if projected is None:
        return None
    # The warm-up and one timed call are the least a case can do.
    if 2 * projected["call_s"] > limits.budget_s:
        return (
            f"projected {projected['call_s']:.1f} s per call (x2 for warm-up + 1 rep) > budget "
            f"{limits.budget_s:.0f} s"
        )
    if projected["peak_mib"] > limits.max_mem_gib * 1024:
        return f"projected peak {projected['peak_mib'] / 1024:.1f} GiB > {limits.max_mem_gib:.1f} GiB"
    return None


def sweep(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    limits = Limits(args.budget_s, args.max_mem_gib)
    records = []
    for pattern in args.patterns:
        for method in args.methods:
            previous: dict[str, Any] | None = None
            for length in args.lengths:
                record: dict[str, Any] = {
                    "pattern": pattern,
                    "length": length,
                    "method": method,
                    "params": Case(pattern, length).params,
                }
                projected = projection(previous, length)
                reason = skip_reason(projected, limits)
                if reason is not None:
                    record |= {"status": "skipped", "reason": reason, "projection": projected}
                else:
                    spec = WorkerSpec(
                        method,
                        pattern,
                        length,
                        str(device),
                        args.reps,
                        args.min_time_s,
                        args.budget_s,
                        args.threads,
                    )
                    timeout = args.case_timeout_s or max(600.0, 4 * args.budget_s)
                    load_before = os.getloadavg()[0]
                    record |= launch_worker(spec, args.cold_compile, timeout)
                    # Other processes on the machine distort CPU timings: keep the evidence.
                    record["load_avg_1min"] = [load_before, os.getloadavg()[0]]
                    if projected is not None:
                        record["projection"] = projected
                    if record["status"] == "ok":
                        previous = record
                print(describe(record), flush=True)
                records.append(record)
    return records


def describe(record: dict[str, Any]) -> str:
    head = f"{record['method']:5} {record['pattern']:16} L={record['length']:8}"
    if record["status"] != "ok":
        return f"{head} {record['status'].upper()}: {record['reason']}"
    return (
        f"{head} median {record['median_s'] * 1e3:10.3f} ms over {record['reps']:3} reps, "
        f"peak {record['peak_mib']:8.1f} MiB, warm-up {record['warmup_s']:7.2f} s, "
        f"worker {record['worker_wall_s']:6.1f} s"
    )


# ---- report ----------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_revision() -> dict[str, Any]:
    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "attnc"))}


def speedups(records: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    ok = {(r["method"], r["pattern"], r["length"]): r for r in records if r["status"] == "ok"}
    out = {}
    for (method, pattern, length), record in ok.items():
        other = ok.get(("flex", pattern, length))
        if method == "attnc" and other is not None and record["median_s"] > 0:
            out[pattern, length] = other["median_s"] / record["median_s"]
    return out


def markdown_table(records: list[dict[str, Any]]) -> str:
    by_key = {(r["method"], r["pattern"], r["length"]): r for r in records}
    ratios = speedups(records)
    lines = [
        "| pattern | L | attnc plan (ms) | attnc peak MiB | flex compiled (ms) | flex peak MiB | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["pattern"], r["length"]) for r in records}, key=lambda k: (PATTERNS.index(k[0]), k[1]))
    for pattern, length in keys:
        cells = []
        for method in METHODS:
            record = by_key.get((method, pattern, length))
            if record is None:
                cells += ["—", "—"]
            elif record["status"] == "ok":
                cells += [f"{record['median_s'] * 1e3:.3g}", f"{record['peak_mib']:.1f}"]
            elif record["status"] == "skipped":
                cells += [f"skipped (proj. {record['projection']['call_s']:.0f} s)", "—"]
            else:
                cells += [record["status"], "—"]
        ratio = ratios.get((pattern, length))
        speedup = f"{ratio:,.0f}x" if ratio is not None and ratio >= 10 else f"{ratio:.2g}x" if ratio else "—"
        lines.append(f"| {pattern} | {length:,} | " + " | ".join(cells) + f" | {speedup} |")
    return "\n".join(lines)


def one_time_table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| pattern | L | attnc Kernel build (ms) | flex warm-up incl. compile (s) |",
        "|---|---:|---:|---:|",
    ]
    by_key = {(r["method"], r["pattern"], r["length"]): r for r in records if r["status"] == "ok"}
    keys = sorted({(r["pattern"], r["length"]) for r in records}, key=lambda k: (PATTERNS.index(k[0]), k[1]))
    for pattern, length in keys:
        attnc_run, flex_run = by_key.get(("attnc", pattern, length)), by_key.get(("flex", pattern, length))
        build = f"{attnc_run['build_s'] * 1e3:.1f}" if attnc_run else "—"
        warmup = f"{flex_run['warmup_s']:.1f}" if flex_run else "—"
        lines.append(f"| {pattern} | {length:,} | {build} | {warmup} |")
    return "\n".join(lines)


def merged(report: dict[str, Any], earlier: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """This run's cases, then the earlier result's cases this run did not repeat (same pattern, length
    and method), each marked `from_earlier` with that run's commit and date; `report` records the merge."""
    rerun = {(c["pattern"], c["length"], c["method"]) for c in report["cases"]}
    kept = [
        {**c, "from_earlier": {"attnc_git": earlier.get("attnc_git"), "date": earlier.get("date")}}
        for c in earlier.get("cases", [])
        if (c["pattern"], c["length"], c["method"]) not in rerun
    ]
    report["merged_from"] = {
        "path": str(path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path),
        "attnc_git": earlier.get("attnc_git"),
        "date": earlier.get("date"),
        "settings": earlier.get("settings"),
        "cases_kept": len(kept),
    }
    order = {(p, n): i for i, (p, n) in enumerate((p, n) for n in LENGTHS for p in PATTERNS)}
    cases = report["cases"] + kept
    return sorted(cases, key=lambda c: (order.get((c["pattern"], c["length"]), len(order)), c["method"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help="a small subset: a smoke test")
    parser.add_argument("--lengths", type=int, nargs="+", help=f"default {LENGTHS}")
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, help="default: all")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--reps", type=int, default=5, help="at least this many timed calls (default 5)")
    parser.add_argument("--min-time-s", type=float, default=0.5, help="and at least this long (default 0.5)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each case (default: torch's)")
    parser.add_argument("--budget-s", type=float, default=120.0, help="per case time budget (default 120)")
    parser.add_argument("--max-mem-gib", type=float, help="skip cases projected above (default 12 on CPU)")
    parser.add_argument(
        "--case-timeout-s", type=float, help="kill a case after (default max(600, 4 x budget))"
    )
    parser.add_argument(
        "--warm-compile-cache",
        dest="cold_compile",
        action="store_false",
        help="let Flex workers use Inductor's usual on-disk cache (default: a fresh one, cold compiles)",
    )
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the equivalence checks")
    parser.add_argument("--check-only", action="store_true", help="run the equivalence checks only")
    parser.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--label", help="appended to the result's file name (a partial rerun: with --merge)")
    parser.add_argument(
        "--merge",
        type=Path,
        help="an earlier result: its cases not rerun here are kept (marked with its commit and date)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths = args.lengths or list(QUICK_LENGTHS)
        args.patterns = args.patterns or list(QUICK_PATTERNS)
        args.cold_compile = False
    args.lengths = sorted(args.lengths or LENGTHS)
    args.patterns = args.patterns or list(PATTERNS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return 0
    import attnc

    device = torch.device(args.device)
    if args.max_mem_gib is None:
        args.max_mem_gib = (
            12.0
            if device.type == "cpu"
            else 0.8 * torch.cuda.get_device_properties(device).total_memory / 2**30
        )
    started = time.perf_counter()
    load = os.getloadavg()[0]
    if device.type == "cpu" and load > 0.5:
        # With every core's worth of torch threads, one thread descheduled by another process stalls
        # each parallel region: timings of both methods then inflate by 10-100x.
        print(
            f"warning: load average {load:.1f} before the run: other processes distort CPU timings; "
            "--threads (fewer than the idle cores) avoids the worst of it"
        )
    report: dict[str, Any] = {
        "benchmark": "plan_cost",
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "attnc": attnc.__version__,
        "attnc_git": git_revision(),
        "python": platform.python_version(),
        "load_avg_1min_at_start": load,
        "block": [BLOCK, BLOCK],
        "batch": 1,
        "heads": 1,
        "flex_api": "torch.compile(create_block_mask)(mask_mod, 1, 1, L, L, device=..., BLOCK_SIZE=128)",
        "attnc_api": "kern.plan(L, L, block=(128, 128), device=..., **inputs)",
        "settings": {
            "quick": args.quick,
            "lengths": args.lengths,
            "patterns": args.patterns,
            "methods": args.methods,
            "reps": args.reps,
            "min_time_s": args.min_time_s,
            "budget_s": args.budget_s,
            "max_mem_gib": args.max_mem_gib,
            "threads": args.threads,
            "cpus": len(os.sched_getaffinity(0)),
            "flex_compile_cache": "fresh per case" if args.cold_compile else "Inductor default (may be warm)",
        },
    }
    if args.check or args.check_only:
        report["checks"] = run_checks(device)
        failed = [c for c in report["checks"] if not c["ok"]]
        if failed:
            print(f"{len(failed)} equivalence check(s) FAILED: the two methods do not compute the same masks")
            print(json.dumps(failed, indent=1))
            return 1
        if args.check_only:
            return 0
    report["cases"] = sweep(args, device)
    if args.merge is not None:
        report["cases"] = merged(report, json.loads(args.merge.read_text(encoding="utf-8")), args.merge)
    report["speedup_flex_over_attnc"] = [
        {"pattern": p, "length": n, "speedup": s} for (p, n), s in speedups(report["cases"]).items()
    ]
    report["total_wall_s"] = time.perf_counter() - started
    # A smoke test's numbers are no result: they go to the temporary directory unless asked.
    results = Path(tempfile.gettempdir()) if args.quick else ROOT / "benchmarks" / "results"
    label = ("-quick" if args.quick else "") + (f"-{args.label}" if args.label else "")
    name = f"plan_cost-{slug(report['device'])}-{report['date']}{label}.json"
    output = args.output or results / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print()
    print(f"## plan cost on {report['device']} (torch {torch.__version__}, attnc {attnc.__version__})\n")
    print(markdown_table(report["cases"]))
    print("\nOne-time costs:\n")
    print(one_time_table(report["cases"]))
    print(f"\nwrote {output} ({report['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
